"""Every benchmark runs in its quick mode, so none can rot unnoticed (the full runs are for GPUs and patience).

Each script is run as a user runs it (a subprocess from the repository root) and must exit 0 and print its
result lines; the numbers of a quick run measure nothing, so only their presence and form are checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[1]
# script -> (arguments of its quick mode, regular expressions its output must contain)
QUICK = {
    "train_overhead.py": (["--quick"], [r"bare PyTorch loop:\s+[\d.]+ steps/s", r"ours / bare:\s+[\d.]+"]),
    "warm_vs_cold.py": (["--quick"], [r"warm / cold:\s+[\d.]+",
                                       r"stages: \[('cached'(, )?)+\]"]),
    "loader_throughput.py": (["--quick"], [r"workers=1:\s+[\d.]+ items/s", r"speed-up:\s+[\d.]+x"]),
    "memory_presets.py": (["--quick"], [r"\| tiny-t2v \| 5 \| 12gb \| - \| [\d.]+ \|"]),
    "verify_cost.py": (["--quick"], [r"digest check rate:\s+\d+ MB/s", r"digest / size:\s+[\d.]+"]),
    "wan_train_memory.py": (["--quick"], [r"\| tiny-t2v \| 64x64 \| 5 \| - \| [\d.]+ \|",
                                           r"\| tiny-i2v \| 64x64 \| 5 \| - \| [\d.]+ \|"]),
}


def test_every_benchmark_has_a_quick_run():
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")) == sorted(QUICK)


@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_mode_runs(script, tmp_path):
    args, expected = QUICK[script]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for pattern in expected:
        assert re.search(pattern, out.stdout), f"{script}: no line matching {pattern!r} in:\n{out.stdout}"
