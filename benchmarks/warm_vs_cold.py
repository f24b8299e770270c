"""Benchmark: a cold demo run against the same command again (every stage cached), in one go.

    python benchmarks/warm_vs_cold.py [extra overrides...]
    python benchmarks/warm_vs_cold.py --quick     # 5 training steps, 2 sampling steps (tests/test_benchmarks.py)

Runs `python -m musubi_pipe +recipe=demo` as a user would, in a fresh outputs root: first cold
(building the tiny model, caching, training, sampling), then warm. Prints both wall times, the
ratio (the goal is <= 0.10) and the time of `--cfg job`. Exits 1 if the warm run computed anything.
--quick shortens the demo so the benchmark's code runs in the test suite; its ratio means little.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "musubi_pipe", *args], check=True, capture_output=True)
    return time.perf_counter() - started


QUICK = ["training.max_train_steps=5", "training.save_every_n_steps=null", "sampling.steps=2"]


def main() -> int:
    extra = sys.argv[1:]
    if "--quick" in extra:
        extra = [*QUICK, *(a for a in extra if a != "--quick")]
    with tempfile.TemporaryDirectory() as root:
        args = ["+recipe=demo", f"paths.root={root}", "runtime.progress=false", *extra]
        cold = timed(args)
        warm = timed(args)
        cfg_job = timed([*args, "--cfg", "job"])
        runs = sorted(Path(root, "runs").glob("*/run.json"), key=lambda p: p.stat().st_mtime)
        statuses = [s["status"] for s in json.loads(runs[-1].read_text())["stages"]]
    print(f"cold run:     {cold:7.2f} s")
    print(f"warm run:     {warm:7.2f} s   stages: {statuses}")
    print(f"warm / cold:  {warm / cold:7.3f}   (goal <= 0.10)")
    print(f"--cfg job:    {cfg_job:7.2f} s   (goal < 2 s)")
    return 0 if statuses and all(s == "cached" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
