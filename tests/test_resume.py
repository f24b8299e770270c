"""Exact resume: a training process killed with SIGKILL mid-run, re-run, ends bitwise where an
uninterrupted run ends (final LoRA, intermediate LoRAs, losses, counters)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import stage

pytestmark = pytest.mark.pipeline

REPO = Path(__file__).resolve().parents[1]


def _overrides(root: Path, models: Path) -> list[str]:
    return [
        "+recipe=demo",
        f"paths.root={root}",
        f"paths.models={models}",
        f"dataset.demo_dir={root.parent / 'demo_data'}",  # the same dataset paths: the same fingerprints
        "training.max_train_steps=24",
        "training.save_every_n_steps=4",
        "training.save_every_n_epochs=2",
        "training.save_last_n_states=1",
        "runtime.progress=false",
        "pipeline.stages=[cache_latents,cache_text,train]",
    ]


def _run_in_process(overrides: list[str], run_dir: Path) -> dict:
    from musubi_pipe.config import compose
    from musubi_pipe.runner import run

    return run(compose(overrides), run_dir)


def _wait_for_checkpoint(root: Path, process: subprocess.Popen, timeout: float = 240.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted((root / "cache" / "train" / ".partial").glob("*/step_*/COMPLETE"))
        if found:
            return found[0].parent
        if process.poll() is not None:
            raise AssertionError(f"training finished before a checkpoint was seen:\n{process.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, models_dir):
    clean = _run_in_process(_overrides(tmp_path / "clean", models_dir), tmp_path / "runs" / "clean")

    killed_root = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "musubi_pipe", *_overrides(killed_root, models_dir)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        checkpoint = _wait_for_checkpoint(killed_root, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not list((killed_root / "cache" / "train").glob("[0-9a-f]*"))  # nothing published
    killed = json.loads(next(killed_root.glob("runs/*/run.json")).read_text())  # SIGKILL: the last record written
    assert killed["status"] == "running" and [(s["name"], s["status"]) for s in killed["stages"]] == [
        ("cache_latents", "ran"), ("cache_text", "ran"), ("train", "pending")]

    resumed = _run_in_process(_overrides(killed_root, models_dir), tmp_path / "runs" / "resumed")
    train, reference = stage(resumed, "train"), stage(clean, "train")
    assert train["fingerprint"] == reference["fingerprint"]
    assert not (killed_root / "cache" / "train" / ".partial" / train["fingerprint"]).exists()  # dropped once published
    assert train["resumed_from_step"] >= int(checkpoint.name.split("_")[1]) > 0
    assert (train["steps"], train["epochs"], train["losses"]) == (reference["steps"], reference["epochs"],
                                                                 reference["losses"])
    # every intermediate file (steps 4, 8, ... and epochs 2, 4, ...) and the final one, bitwise
    names = [Path(p).name for p in clean["lora"] + clean["lora_checkpoints"]]
    assert names == [Path(p).name for p in resumed["lora"] + resumed["lora_checkpoints"]]
    assert "demo_lora-step00000004.safetensors" in names and "demo_lora-000002.safetensors" in names
    for a, b in zip(clean["lora"] + clean["lora_checkpoints"], resumed["lora"] + resumed["lora_checkpoints"]):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), Path(a).name
