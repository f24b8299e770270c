"""Run folders that are unique even for runs started in the same second.

`hydra.run.dir` and `hydra.sweep.dir` are `${musubi_run_dir:${paths.runs},NAME}`: the resolver claims
`<runs>/<YYYYmmdd_HHMMSS>_<NAME>` by creating it (mkdir fails if another run has it), else `..._2`,
`..._3`, ... The value is cached in the config (Hydra copies the cache into each job of a sweep), so one
run resolves to one folder. The other processes of a multi-process run (RANK > 0) claim nothing:
they use the main process's folder (runner.py broadcasts it).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

RESOLVER = "musubi_run_dir"


def claim_run_dir(runs: str, name: str) -> str:
    """Create and return a new folder `<runs>/<stamp>_<name>[_N]` that no other run has."""
    base = Path(runs) / f"{time.strftime('%Y%m%d_%H%M%S')}_{name}"
    if os.environ.get("RANK", "0") != "0":
        return str(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise AssertionError("unreachable")


def register_run_dir_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, claim_run_dir, use_cache=True)
