"""Run one composed config: validate -> plan -> execute -> run record.

`run(cfg, run_dir)` is what `python -m musubi_pipe` calls for each (multi)run job, and what tests
call in-process. It returns the run record also written to `<run_dir>/run.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from musubi_pipe.config.validate import validate
from musubi_pipe.errors import Terminated, UserError, storage_errors
from musubi_pipe.pipeline.distributed import current
from musubi_pipe.pipeline.executor import execute, format_plan, plan
from musubi_pipe.pipeline.fingerprint import DigestCache
from musubi_pipe.pipeline.stage import Job
from musubi_pipe.pipeline.store import Store

log = logging.getLogger("musubi_pipe")
RUN_RECORD_VERSION = 1
RUN_LOG = "run.log"


def resolve(cfg: DictConfig) -> dict:
    """Return the config as a resolved plain dict without the hydra node."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    return container


SPEC_FILE = "spec.yaml"


def run(cfg: DictConfig | dict, run_dir: str | os.PathLike, overrides: list[str] = (), spec: dict | None = None) -> dict:
    """Validate, plan and execute one run; write and return its run record.

    The record is written when the run starts (status "running", with the stages it plans), after each
    stage, and at the end ("ok" or "dry_run"); a run that fails or is interrupted records "failed" or
    "interrupted" and its error before the exception goes on. `<run_dir>/run.log` holds the plan, each
    stage's result, warnings and the error. `overrides` are the command line's (validation names those
    a musubi-tuner dataset file would silently replace). `spec` (the command line's run as a run spec,
    config/spec.py) is written as `<run_dir>/spec.yaml`: `python -m musubi_pipe <run_dir>/spec.yaml` reruns it.
    """
    started = time.time()
    dist = current()
    container = cfg if isinstance(cfg, dict) else resolve(cfg)
    run_dir = Path(dist.broadcast(str(Path(run_dir).resolve())))  # one run directory, the main process's
    record = _header(container, run_dir, started, dry_run=bool(container["pipeline"]["dry_run"]))
    if dist.main:
        with storage_errors("starting the run", run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_config(run_dir, container)
            if spec is not None:
                from musubi_pipe.config.spec import write_spec

                write_spec(spec, run_dir / SPEC_FILE, header="The run spec of this run: python -m musubi_pipe "
                           f"{run_dir / SPEC_FILE} [key=value ...]")
            _write_record(dist, run_dir, record)  # status "running": even a SIGKILLed run leaves its record
    with _run_log(run_dir if dist.main else None, container):
        try:
            return _run(container, run_dir, dist, record, started, list(overrides))
        except BaseException as err:
            for stage in record.get("stages", []):
                if stage["status"] == "pending":  # the stage that was running
                    stage["status"] = "failed"
                    break
            record.update(status="interrupted" if isinstance(err, KeyboardInterrupt | Terminated) else "failed",
                          error=f"{type(err).__name__}: {err}" if not isinstance(err, UserError) else str(err),
                          seconds=round(time.time() - started, 3))
            # into run.log only: the console gets the error once, from whoever catches it (__main__ prints it)
            _record_log.error("run %s: %s", record["status"], record["error"] or type(err).__name__)
            with contextlib.suppress(OSError):  # the disk may be what failed; the error is raised either way
                _write_record(dist, run_dir, record)
            raise


def _run(container: dict, run_dir: Path, dist, record: dict, started: float, overrides: list[str]) -> dict:
    from musubi_pipe.stages import all_stages

    # the main process first: it builds embedded assets (demo data, tiny models) the others then read
    _main_first(dist, lambda: validate(container, overrides))
    if dist.main:
        _write_config(run_dir, container)  # validation reads a musubi-tuner dataset file into the config
    verify = container["pipeline"]["verify"]
    with storage_errors("opening the cache", Path(container["paths"]["cache"])):
        store = Store(container["paths"]["cache"], verify=verify)
    digests = DigestCache(store.root / "digests.json", trust_stat=verify != "full")
    job = Job(cfg=container, store=store, digests=digests, run_dir=run_dir, dist=dist)
    if container["dataset"]["preview"]:
        return _preview(job, record) if dist.main else {}
    pipeline = container["pipeline"]
    planned = plan(job, all_stages(), pipeline["stages"], mode=pipeline["mode"], verify=verify)
    for p, cached in zip(planned, dist.broadcast([p.cached for p in planned])):
        p.cached = cached  # every process must make the same decisions
    digests.save()
    if dist.main:
        say(f"plan ({run_dir.name}):\n{format_plan(planned)}")
    if pipeline["dry_run"]:
        record["plan"] = [
            {"name": p.stage.name, "selected": p.selected, "cached": p.cached, "fingerprint": p.fingerprint, "reason": p.reason}
            for p in planned
        ]
        record["status"] = "dry_run"
        _write_record(dist, run_dir, record)
        return record
    # until each stage is done, the record names the artifact it will use, so `tools gc` keeps its inputs
    record["stages"] = [{"name": p.stage.name, "status": "pending", "fingerprint": p.fingerprint,
                         "artifact": str(store.entry_dir(p.stage.name, p.fingerprint))} for p in planned if p.selected]
    _write_record(dist, run_dir, record)

    def on_stage(stage_record: dict) -> None:
        record["stages"] = [stage_record if s["name"] == stage_record["name"] else s for s in record["stages"]]
        if dist.main:
            _announce(stage_record)
            _write_record(dist, run_dir, record)

    record["stages"] = execute(job, planned, mode=pipeline["mode"], verify=verify, on_stage=on_stage)
    record["moved_aside"] = store.moved_aside  # stored files found corrupt this run (recomputed)
    if not dist.main:
        return record
    record.update(_collect_outputs(record["stages"], run_dir))
    record["status"] = "ok"
    record["seconds"] = round(time.time() - started, 3)
    _write_record(dist, run_dir, record)
    _say_outputs(record, run_dir)
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


def _header(container: dict, run_dir: Path, started: float, dry_run: bool) -> dict:
    return {
        "version": RUN_RECORD_VERSION,
        "name": container["name"],
        "status": "running",
        "error": None,
        "pid": os.getpid(),
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.yaml"),
        "log": str(run_dir / RUN_LOG),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "dry_run": dry_run,
    }


def _preview(job: Job, record: dict) -> dict:
    """dataset.preview=true: draw what training will see (no model is loaded), record it, run nothing."""
    from musubi_pipe.data.preview import write_preview
    from musubi_pipe.stages.common import dataset_scan

    items, skips = dataset_scan(job)
    written = write_preview(items, skips, job.run_dir / "preview", max_items=job.cfg["dataset"]["preview_max_items"])
    record.update(dry_run=True, status="dry_run")
    record["preview"] = {key: [str(p) for p in value] if isinstance(value, list) else value
                         for key, value in written.items()} | {"items_skipped": len(skips)}
    record["preview"].update({key: str(record["preview"][key]) for key in ("clips", "skipped")})
    _write_record(job.dist, job.run_dir, record)
    say(f"preview: {len(items)} items ({len(skips)} skipped); sheets:")
    for sheet in written["sheets"]:
        say(f"  {sheet}")
    say(f"clip list: {written['clips']}")
    return record


def _announce(stage_record: dict) -> None:
    extra = ""
    if "items_total" in stage_record:
        extra = f" ({stage_record['items_computed']}/{stage_record['items_total']} items computed)"
    say(f"{stage_record['name']}: {stage_record['status']} in {stage_record['seconds']:.1f}s{extra}")


def _say_outputs(record: dict, run_dir: Path) -> None:
    """The end of a run: where its record is and the links to what it made (the store paths behind them)."""
    say(f"run folder: {run_dir}")
    for kind in ("lora", "samples"):
        if record[kind]:
            say(f"  {kind}/: " + ", ".join(Path(p).name for p in record[kind]))


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


def _write_record(dist, run_dir: Path, record: dict) -> None:
    if not dist.main:
        return
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run_dir / "run.json")


# -- what the user sees, and the run log ----------------------------------------------------------
_record_log = logging.getLogger("musubi_pipe.run_log")  # lines printed to the console, copied to run.log only
_record_log.propagate = False


def say(message: str) -> None:
    """Print a line of the run's story (plan, stage results, outputs) and keep it in the run log."""
    print(message, flush=True)
    _record_log.info(message)


@contextlib.contextmanager
def _run_log(run_dir: Path | None, container: dict):
    """Copy musubi_pipe's log records (warnings, dataset lines, the error) and `say` lines to <run_dir>/run.log."""
    if run_dir is None:
        yield
        return
    handler = logging.FileHandler(run_dir / RUN_LOG, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("musubi_pipe")
    old_level = logger.level
    logger.setLevel(str(container.get("runtime", {}).get("log_level", "INFO")).upper())
    for target in (logger, _record_log):
        target.addHandler(handler)
    _record_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        for target in (logger, _record_log):
            target.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
