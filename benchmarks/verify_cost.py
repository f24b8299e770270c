"""Benchmark: what checking stored files against their recorded digests costs (pipeline.verify=digest).

    python benchmarks/verify_cost.py [--megabytes 512] [--rounds 3]
    python benchmarks/verify_cost.py --quick      # 16 MB, one round of the demo: checks it runs (tests/test_benchmarks.py)

Every run checks each stored file it uses once (item entries and stage outputs; pipeline/store.py). This
prints, measured in one run:
  - the checking rate over item entries of Wan latent size (MB/s, one core), and what it makes of a real
    cache: seconds per 1000 cached 81-frame 832x480 Wan latents (16 x 21 x 60 x 104 float32 = 8.4 MB each);
  - a fully cached demo run with verify=digest against verify=size (the ratio of their wall times), rounds
    alternating so drifts in machine speed hit both alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

WAN_LATENT_BYTES = 16 * 21 * 60 * 104 * 4


def hash_rate(root: Path, megabytes: int) -> float:
    """MB/s of item_problem over freshly written item entries of ~8 MB each."""
    import torch

    from musubi_pipe.pipeline.items import item_problem, write_item

    count = max(1, megabytes * 2**20 // WAN_LATENT_BYTES)
    paths = []
    for i in range(count):
        path = root / f"item{i}.safetensors"
        write_item(path, {"latents": torch.randn(WAN_LATENT_BYTES // 4)})
        paths.append(path)
    total = sum(p.stat().st_size for p in paths)
    started = time.perf_counter()
    assert all(item_problem(p) is None for p in paths)
    return total / 2**20 / (time.perf_counter() - started)


def warm_runs(root: Path, rounds: int) -> dict[str, float]:
    """Wall seconds of fully cached demo runs per verify mode (summed over rounds)."""
    from musubi_pipe.config import compose
    from musubi_pipe.runner import run

    base = ["+recipe=demo", f"paths.root={root}", "runtime.progress=false", "training.max_train_steps=4",
            "sampling.steps=2", "runtime.log_with=none"]
    run(compose(base), root / "runs" / "cold")
    totals = {"digest": 0.0, "size": 0.0}
    for r in range(rounds):
        for mode in totals:
            started = time.perf_counter()
            record = run(compose(base + [f"pipeline.verify={mode}"]), root / "runs" / f"{mode}{r}")
            totals[mode] += time.perf_counter() - started
            assert all(s["status"] == "cached" for s in record["stages"])
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.rounds = 16, 1
    with tempfile.TemporaryDirectory() as tmp:
        rate = hash_rate(Path(tmp), args.megabytes)
        totals = warm_runs(Path(tmp) / "demo", args.rounds)
    print(f"digest check rate:        {rate:.0f} MB/s (one core)")
    print(f"1000 cached Wan latents:  {1000 * WAN_LATENT_BYTES / 2**20 / rate:.1f} s per run (8.4 MB each)")
    print(f"cached demo run, digest:  {totals['digest'] / args.rounds:.2f} s")
    print(f"cached demo run, size:    {totals['size'] / args.rounds:.2f} s")
    print(f"digest / size:            {totals['digest'] / totals['size']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
