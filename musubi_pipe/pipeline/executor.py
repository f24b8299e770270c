"""Plan and execute a chain of stages against the store.

`plan(job, stages)` computes every stage's input document and fingerprint (upstream first) and says,
for each, whether a valid artifact exists and, if not, why it will run. `execute(job, plan, ...)`
then runs the selected stages: cached ones are reused, the others run in a private temp directory
under a per-key lock and are published atomically. Modes: auto (default), force (recompute),
frozen (fail instead of computing).
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from musubi_pipe.errors import UserError, storage_errors
from musubi_pipe.pipeline.fingerprint import diff_documents, fingerprint
from musubi_pipe.pipeline.stage import Job, Stage, StageContext, select_key

MODES = ("auto", "force", "frozen")


@dataclass
class PlannedStage:
    stage: Stage
    doc: dict
    fingerprint: str
    selected: bool
    cached: bool
    reason: str
    artifact: Path | None = None
    record: dict = field(default_factory=dict)


def lookup(job: Job, stage: Stage, fp: str, verify: str) -> tuple[dict | None, str | None]:
    """(manifest, None) for a usable artifact; (None, why) when the store has it but it cannot be used.

    Besides the store's own checks (manifest, output sizes), a stage's `check` may reject an artifact,
    e.g. an item index whose entries were removed from the store.
    """
    manifest = job.store.lookup(stage.name, fp, verify=verify)
    if manifest is None or stage.check is None:
        return manifest, None
    problem = stage.check(job, job.store.entry_dir(stage.name, fp))
    return (None, problem) if problem else (manifest, None)


def build_document(job: Job, stage: Stage, upstream_fps: dict[str, str]) -> dict:
    """Return the stage's input document: name, version, declared config, upstream fps, inputs."""
    doc = {
        "stage": stage.name,
        "version": stage.version,
        "config": {key: select_key(job.cfg, key) for key in stage.keys},
        "upstream": {name: upstream_fps[name] for name in stage.upstream},
    }
    doc.update(stage.inputs(job))
    return doc


def plan(job: Job, stages: list[Stage], selected: list[str], mode: str = "auto", verify: str = "size"):
    """Return a PlannedStage per stage, in order, with fingerprints and run/cached reasons."""
    fps: dict[str, str] = {}
    planned = []
    needed = _needed(stages, selected)
    for stage in stages:
        if stage.name not in needed:  # neither selected nor feeding a selected stage: nothing to plan
            planned.append(PlannedStage(stage, {}, "", False, False, "not needed"))
            continue
        doc = build_document(job, stage, fps)
        fp = fingerprint(doc)
        fps[stage.name] = fp
        manifest, problem = lookup(job, stage, fp, verify)
        is_selected = stage.name in selected
        cached = manifest is not None and mode != "force"
        if cached:
            reason = "cached"
        elif mode == "force":
            reason = "pipeline.mode=force"
        else:
            reason = problem or explain(job.store.last_inputs(stage.name, _run_name(job)), doc, _run_name(job))
        artifact = job.store.entry_dir(stage.name, fp) if manifest is not None else None
        planned.append(PlannedStage(stage, doc, fp, is_selected, cached, reason, artifact))
    return planned


def _needed(stages: list[Stage], selected: list[str]) -> set[str]:
    """The selected stages and every stage they consume, directly or not."""
    by_name = {s.name: s for s in stages}
    needed, todo = set(), [name for name in selected if name in by_name]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].upstream)
    return needed


def _run_name(job: Job) -> str | None:
    return job.cfg.get("name")


def explain(last: dict | None, doc: dict, name: str | None = None) -> str:
    """Say why a stage will run: the difference between the input document of the last run of the same
    name (recipes set it) and this one, or that this is the first."""
    if last is None:
        return f"new: no earlier artifact of this stage for run name {name!r}" if name else \
            "no earlier artifact of this stage"
    last, doc = dict(last), dict(doc)
    parts = []
    last_items, new_items = set(last.pop("items", [])), set(doc.pop("items", []))
    if new_items - last_items:
        n = len(new_items - last_items)
        parts.append(f"{n} new item{'s' if n != 1 else ''}")
    if last_items - new_items:
        n = len(last_items - new_items)
        parts.append(f"{n} item{'s' if n != 1 else ''} removed")
    parts.extend(diff_documents(last.pop("config", {}), doc.pop("config", {})))
    for name in sorted(set(last.pop("upstream", {}).items()) ^ set(doc.pop("upstream", {}).items())):
        if f"{name[0]} output changed" not in parts:
            parts.append(f"{name[0]} output changed")
    parts.extend(diff_documents(last, doc))
    if not parts:
        return "artifact missing or invalid"
    shown = parts[:6] + ([f"... and {len(parts) - 6} more"] if len(parts) > 6 else [])
    return "; ".join(shown)


def format_plan(planned: list[PlannedStage]) -> str:
    """Return the plan as text: one line per stage with `cached` / `will run` and the reason."""
    lines = []
    for p in planned:
        if not p.selected:
            status = "not selected"
        else:
            status = "cached" if p.cached else "will run"
        line = f"{p.stage.name:<14} {status:<12} {p.fingerprint[:12] or '-'}"
        if p.selected and not p.cached:
            line += f"  {p.stage.name}: {p.reason}"
        lines.append(line)
    return "\n".join(lines)


def execute(job: Job, planned: list[PlannedStage], mode: str = "auto", verify: str = "size", on_stage=None):
    """Run the selected stages in order; return their run records (one dict per selected stage)."""
    if mode not in MODES:
        raise UserError(f"pipeline.mode={mode!r} is not one of {MODES}")
    by_name = {p.stage.name: p for p in planned}
    records = []
    for p in planned:
        if not p.selected:
            continue
        started = time.perf_counter()
        if p.cached:
            manifest, _ = lookup(job, p.stage, p.fingerprint, verify)
            if manifest is None:  # went bad since planning
                p.cached = False
        if p.cached:
            status, stats = "cached", _cached_stats(manifest)
        else:
            if mode == "frozen":
                raise UserError(
                    f"pipeline.mode=frozen: stage {p.stage.name} would have to run ({p.reason}); "
                    "run without pipeline.mode=frozen to compute it"
                )
            upstream_dirs = _upstream_dirs(job, p, by_name, verify)  # only a stage that runs reads them
            status, stats = _run_locked(job, p, upstream_dirs, force=(mode == "force"), verify=verify)
        job.store.remember(p.stage.name, p.doc, _run_name(job))
        p.artifact = job.store.entry_dir(p.stage.name, p.fingerprint)
        p.record = {
            "name": p.stage.name,
            "status": status,
            "fingerprint": p.fingerprint,
            "reason": "cached" if status == "cached" else p.reason,
            "artifact": str(p.artifact),
            "seconds": round(time.perf_counter() - started, 3),
            **stats,
            **(p.stage.report(job, stats) if p.stage.report else {}),
        }
        records.append(p.record)
        if on_stage:
            on_stage(p.record)
    return records


def _upstream_dirs(job: Job, p: PlannedStage, by_name: dict, verify: str) -> dict[str, Path]:
    dirs = {}
    for name in p.stage.upstream:
        up = by_name[name]
        if lookup(job, up.stage, up.fingerprint, verify)[0] is None:
            raise UserError(
                f"stage {p.stage.name} needs the output of {name}, which is not in the store for this "
                f"config; add {name} to pipeline.stages"
            )
        dirs[name] = job.store.entry_dir(name, up.fingerprint)
    return dirs


def _run_locked(job: Job, p: PlannedStage, upstream_dirs, force: bool, verify: str):
    """Compute the stage under its lock; a job that waited on the lock reuses the winner's output.

    With several processes (job.dist), the main process holds the lock and decides; all processes
    then run the stage together, each in its own directory, and only the main one publishes.
    """
    dist = job.dist
    if not dist.active:
        with job.store.lock(p.stage.name, p.fingerprint):
            return _run_or_reuse(job, p, upstream_dirs, force, verify)
    if dist.main:
        with job.store.lock(p.stage.name, p.fingerprint):
            result = _run_or_reuse(job, p, upstream_dirs, force, verify)
    else:
        result = _run_or_reuse(job, p, upstream_dirs, force, verify)
    dist.barrier()  # the others wait until the main process has published
    return result


def _run_or_reuse(job: Job, p: PlannedStage, upstream_dirs, force: bool, verify: str):
    dist = job.dist
    manifest = lookup(job, p.stage, p.fingerprint, verify)[0] if dist.main else None
    reuse = dist.broadcast(manifest is not None and not force)
    if reuse:
        manifest = manifest or lookup(job, p.stage, p.fingerprint, verify)[0]
        return "cached", _cached_stats(manifest)
    with storage_errors(f"stage {p.stage.name}", job.store.root / p.stage.name):
        tmp = job.store.new_tmp_dir(p.stage.name, p.fingerprint)
    try:
        with storage_errors(f"stage {p.stage.name}", tmp):
            return _run_and_publish(job, p, upstream_dirs, force, tmp)
    finally:  # published: gone already; failed: nothing half-written stays (its checkpoints are in .partial)
        shutil.rmtree(tmp, ignore_errors=True)


def _run_and_publish(job: Job, p: PlannedStage, upstream_dirs, force: bool, tmp: Path):
    ctx = StageContext(job, p.stage, p.fingerprint, p.doc, tmp, upstream_dirs, force=force)
    started = time.perf_counter()
    stats = p.stage.run(ctx) or {}
    if not job.dist.main:
        return "ran", stats  # the main process's output is the one published
    manifest = {
        "inputs": p.doc,
        "stats": stats,
        "seconds": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "software": _software(),
    }
    job.store.publish(p.stage.name, p.fingerprint, tmp, manifest)
    job.store.drop_partial(p.stage.name, p.fingerprint)
    return "ran", stats


def _cached_stats(manifest: dict) -> dict:
    stats = dict(manifest.get("stats", {}))
    if "items_total" in stats:
        stats["items_computed"] = 0
    return stats


def _software() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("musubi_pipe", "torch", "diffusers", "transformers", "safetensors"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
