"""Run one composed config: validate -> plan -> execute -> run record.

`run(cfg, run_dir)` is what `python -m musubi_pipe` calls for each (multi)run job, and what tests
call in-process. It returns the run record also written to `<run_dir>/run.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from musubi_pipe.config.validate import validate
from musubi_pipe.errors import UserError
from musubi_pipe.pipeline.distributed import current
from musubi_pipe.pipeline.executor import execute, format_plan, plan
from musubi_pipe.pipeline.fingerprint import DigestCache
from musubi_pipe.pipeline.stage import Job
from musubi_pipe.pipeline.store import Store

log = logging.getLogger("musubi_pipe")
RUN_RECORD_VERSION = 1


def resolve(cfg: DictConfig) -> dict:
    """Return the config as a resolved plain dict without the hydra node."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    return container


def run(cfg: DictConfig | dict, run_dir: str | os.PathLike) -> dict:
    """Validate, plan and execute one run; write and return its run record."""
    from musubi_pipe.stages import all_stages

    started = time.time()
    dist = current()
    container = cfg if isinstance(cfg, dict) else resolve(cfg)
    run_dir = Path(dist.broadcast(str(Path(run_dir).resolve())))  # one run directory, the main process's
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, container)
    # the main process first: it builds embedded assets (demo data, tiny models) the others then read
    _main_first(dist, lambda: validate(container))
    if dist.main:
        _write_config(run_dir, container)  # validation reads a musubi-tuner dataset file into the config
    verify = container["pipeline"]["verify"]
    store = Store(container["paths"]["cache"], verify=verify)
    digests = DigestCache(store.root / "digests.json", trust_stat=verify != "full")
    job = Job(cfg=container, store=store, digests=digests, run_dir=run_dir, dist=dist)
    if container["dataset"]["preview"]:
        return _preview(job, started) if dist.main else {}
    pipeline = container["pipeline"]
    planned = plan(job, all_stages(), pipeline["stages"], mode=pipeline["mode"], verify=pipeline["verify"])
    for p, cached in zip(planned, dist.broadcast([p.cached for p in planned])):
        p.cached = cached  # every process must make the same decisions
    digests.save()
    if dist.main:
        print(f"plan ({run_dir.name}):\n{format_plan(planned)}", flush=True)
    record = _header(job, started, dry_run=bool(pipeline["dry_run"]))
    if pipeline["dry_run"]:
        record["plan"] = [
            {"name": p.stage.name, "selected": p.selected, "cached": p.cached, "fingerprint": p.fingerprint, "reason": p.reason}
            for p in planned
        ]
        _write_record(job, record)
        return record
    record["stages"] = execute(job, planned, mode=pipeline["mode"], verify=pipeline["verify"],
                               on_stage=_announce if dist.main else None)
    if not dist.main:
        return record
    record.update(_collect_outputs(record["stages"], run_dir))
    record["moved_aside"] = store.moved_aside  # stored files found corrupt this run (recomputed)
    record["seconds"] = round(time.time() - started, 3)
    _write_record(job, record)
    for kind in ("lora", "samples"):
        for path in record[kind]:
            print(f"{kind}: {path}")
    return record


def _main_first(dist, action) -> None:
    """Run `action` on the main process, then on the others (which stop too if it failed there)."""
    if not dist.active:
        action()
        return
    failed = False
    if dist.main:
        try:
            action()
        except BaseException:
            dist.broadcast(True)
            raise
    failed = dist.broadcast(failed)
    if failed:
        raise UserError("the main process stopped (its output says why)")
    if not dist.main:
        action()


def _write_config(run_dir: Path, container: dict) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))


def _header(job: Job, started: float, dry_run: bool) -> dict:
    return {
        "version": RUN_RECORD_VERSION,
        "name": job.cfg["name"],
        "run_dir": str(job.run_dir),
        "config": str(job.run_dir / "config.yaml"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "dry_run": dry_run,
    }


def _preview(job: Job, started: float) -> dict:
    """dataset.preview=true: draw what training will see (no model is loaded), record it, run nothing."""
    from musubi_pipe.data.preview import write_preview
    from musubi_pipe.stages.common import dataset_scan

    items, skips = dataset_scan(job)
    written = write_preview(items, skips, job.run_dir / "preview", max_items=job.cfg["dataset"]["preview_max_items"])
    record = _header(job, started, dry_run=True)
    record["preview"] = {key: [str(p) for p in value] if isinstance(value, list) else value
                         for key, value in written.items()} | {"items_skipped": len(skips)}
    record["preview"].update({key: str(record["preview"][key]) for key in ("clips", "skipped")})
    _write_record(job, record)
    print(f"preview: {len(items)} items ({len(skips)} skipped); sheets:", flush=True)
    for sheet in written["sheets"]:
        print(f"  {sheet}")
    print(f"clip list: {written['clips']}", flush=True)
    return record


def _announce(stage_record: dict) -> None:
    extra = ""
    if "items_total" in stage_record:
        extra = f" ({stage_record['items_computed']}/{stage_record['items_total']} items computed)"
    print(f"{stage_record['name']}: {stage_record['status']} in {stage_record['seconds']:.1f}s{extra}", flush=True)


def _collect_outputs(stage_records: list[dict], run_dir: Path) -> dict:
    """Return absolute output paths per kind and link them into the run directory."""
    found: dict[str, list[str]] = {"lora": [], "samples": []}
    for rec in stage_records:
        for kind, names in rec.get("outputs", {}).items():
            for name in names:
                target = Path(rec["artifact"]) / name
                found.setdefault(kind, []).append(str(target))
                link = run_dir / kind / name
                link.parent.mkdir(exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(target)
    return found


def _write_record(job: Job, record: dict) -> None:
    if not job.dist.main:
        return
    tmp = job.run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, job.run_dir / "run.json")
