"""Two training processes (accelerate launch, gloo on CPU): the main one publishes, the cache stages
share their items out, and the LoRA matches one process accumulating the same batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import stage

pytestmark = pytest.mark.pipeline

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_train_what_one_process_accumulates_also_sharded(tmp_path, models_dir):
    from musubi_pipe.config import compose
    from musubi_pipe.runner import run

    common = ["+recipe=demo", f"paths.models={models_dir}", "runtime.progress=false",
              "training.max_train_steps=4", "training.save_every_n_steps=2",
              "training.validation_split=0.3", "training.validate_every_n_steps=2",
              "pipeline.stages=[cache_latents,cache_text,train]"]
    common_root = [f"paths.root={tmp_path}"]
    run(compose(common + common_root + ["pipeline.stages=[cache_text]"]), tmp_path / "runs" / "setup")  # tiny model
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "musubi_pipe", *common, *common_root, f"hydra.run.dir={tmp_path / 'runs' / 'two'}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads((tmp_path / "runs" / "two" / "run.json").read_text())  # written by the main process only
    assert done.stdout.count("plan (") == 1  # one plan printed, by the main process
    assert "weights are sharded" not in done.stdout + done.stderr
    latents = stage(two, "cache_latents")
    assert (latents["status"], latents["items_total"], latents["items_computed"]) == ("ran", 5, 5)
    assert stage(two, "train")["steps"] == 4

    one = run(compose(common + common_root + ["training.gradient_accumulation_steps=2"]), tmp_path / "runs" / "one")
    assert stage(one, "cache_latents")["status"] == "cached"  # the two processes' entries, published once
    assert stage(one, "train")["fingerprint"] != stage(two, "train")["fingerprint"]  # processes are an input
    a, b = load_file(two["lora"][0]), load_file(one["lora"][0])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert stage(two, "train")["losses"] == pytest.approx(stage(one, "train")["losses"], rel=1e-4)

    # FSDP (torch.distributed.run, with ACCELERATE_USE_FSDP as `accelerate launch --use_fsdp` sets it): each
    # process holds half of the DiT's weights, validation runs on both; the caches are computed again (sharded
    # over the processes) in their own root, and the LoRA is the one the unsharded processes trained
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "musubi_pipe", *common,
               f"paths.root={tmp_path / 'fsdp'}", f"dataset.demo_dir={tmp_path / 'demo_data'}",
               f"hydra.run.dir={tmp_path / 'runs' / 'fsdp'}"]
    done = subprocess.run(command, cwd=REPO, env=dict(env, ACCELERATE_USE_FSDP="true"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "weights are sharded over 2 processes" in done.stdout + done.stderr
    fsdp_record = json.loads((tmp_path / "runs" / "fsdp" / "run.json").read_text())
    fsdp, plain = stage(fsdp_record, "train"), stage(two, "train")
    assert fsdp["fingerprint"] == plain["fingerprint"]  # sharding moves work around; it changes no number
    assert [s for s, _ in fsdp["validation_losses"]] == [2, 4]
    assert [v for _, v in fsdp["validation_losses"]] == pytest.approx([v for _, v in plain["validation_losses"]], rel=1e-4)
    a, b = load_file(fsdp_record["lora"][0]), load_file(two["lora"][0])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
