"""What a stage declares, and the context it runs in.

A stage is a `Stage` value: a verb name, a hand-bumped version, the upstream stages it consumes,
the config keys it depends on, a function that returns the rest of its input document (file
digests, item keys) and the function that does the work. The executor, not the stage, decides
whether it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from musubi_pipe.pipeline.distributed import Dist


def select_key(cfg: dict, dotted: str):
    """Return the value at a dotted key of a nested dict, or None when absent."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class Job:
    """Plan-time state shared by all stages of one run: resolved config, store, digests, memo."""

    cfg: dict
    store: Any
    digests: Any
    run_dir: Path
    memo: dict = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)  # this process among the run's processes (see pipeline.distributed)

    def cached(self, key: str, compute: Callable[[], Any]):
        """Compute a plan-time value once per run (e.g. the dataset scan)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as the executor sees it.

    inputs(job) -> dict merged into the input document (e.g. {"files": {...}, "items": [...]}).
    run(ctx) -> dict of stats (items_total, items_computed, ...) recorded in run.json and the manifest.
    check(job, artifact_dir) -> None, or why a stored artifact cannot be used (then it is recomputed).
    report(job, stats) -> dict of facts about this run's inputs (e.g. skipped media) recorded in
    run.json whether the stage ran or was cached (`stats` are the run's, or the stored ones).
    """

    name: str
    version: int
    upstream: tuple[str, ...]
    keys: tuple[str, ...]
    inputs: Callable[[Job], dict]
    run: Callable[["StageContext"], dict]
    item_kind: str | None = None
    report: Callable[[Job, dict], dict] | None = None
    check: Callable[[Job, Path], str | None] | None = None


@dataclass
class StageContext:
    """Everything a running stage may touch: its declared config, inputs and a private output dir."""

    job: Job
    stage: Stage
    fingerprint: str
    inputs: dict
    out_dir: Path
    upstream_dirs: dict[str, Path]
    force: bool = False

    @property
    def cfg(self) -> dict:
        """The resolved values of the stage's declared keys, nested as in the config."""
        view: dict = {}
        for dotted in self.stage.keys:
            value = select_key(self.job.cfg, dotted)
            node = view
            parts = dotted.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return view

    @property
    def runtime(self) -> dict:
        """Placement-only settings (device, workers, progress): they never enter a fingerprint."""
        return self.job.cfg.get("runtime", {})

    def partial_dir(self) -> Path:
        """Resumable state for this fingerprint (survives a killed run; removed on publish)."""
        return self.job.store.partial_dir(self.stage.name, self.fingerprint)
