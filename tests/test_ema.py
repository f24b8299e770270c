"""Post-hoc EMA of LoRA checkpoints (musubi_pipe.network.ema, `python -m musubi_pipe.tools ema`).

Each tiny checkpoint holds constant tensors (lora_down = c, lora_up = 2c for the file's constant
c), so every expected average is a short hand computation over the constants.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musubi_pipe.errors import UserError
from musubi_pipe.network.ema import (
    collect_checkpoints,
    ema_betas,
    ema_weights,
    order_checkpoints,
    post_hoc_ema,
    power_ema_gamma,
)
from musubi_pipe.network.lora_file import load_lora_file, model_hashes, save_lora_file
from musubi_pipe.tools import ema as ema_tool

REPO = Path(__file__).resolve().parents[1]
MODULE = "lora_unet_blocks_0_self_attn_q"
DOWN, UP, ALPHA = f"{MODULE}.lora_down.weight", f"{MODULE}.lora_up.weight", f"{MODULE}.alpha"


def _write(path: Path, value: float, step: int | None, *, dtype=torch.float32, alpha: float = 1.0,
           extra_tensors: dict | None = None, **metadata) -> Path:
    tensors = {
        DOWN: torch.full((2, 8), value, dtype=dtype),
        UP: torch.full((8, 2), 2 * value, dtype=dtype),
        ALPHA: torch.tensor(alpha, dtype=dtype),
        f"{MODULE}.counter": torch.tensor([int(value)], dtype=torch.int64),
        **(extra_tensors or {}),
    }
    meta = {"ss_network_module": "networks.lora_wan", "ss_base_model_version": "wan", "ss_epoch": "0",
            "modelspec.title": f"file {value}"}
    if step is not None:
        meta["ss_steps"] = str(step)
    meta.update(metadata)
    save_lora_file(path, tensors, {k: v for k, v in meta.items() if v is not None})
    return path


@pytest.fixture
def run4(tmp_path) -> list[Path]:
    """Four checkpoints of one run: constants 1, 2, 3, 4 at steps 100 .. 400."""
    return [_write(tmp_path / f"lora-step{100 * c:08d}.safetensors", c, 100 * c) for c in (1, 2, 3, 4)]


def _value(tensors) -> float:
    down = tensors[DOWN].float()
    assert torch.allclose(tensors[UP].float(), 2 * down.flatten()[0])
    assert torch.all(down == down.flatten()[0])
    return float(down.flatten()[0])


# -- schedules ---------------------------------------------------------------------------------
def test_constant_and_linear_betas():
    assert ema_betas(4, 0.9) == [0.9, 0.9, 0.9]
    assert ema_betas(4, 0.8, 0.9) == pytest.approx([0.8, 0.85, 0.9])
    assert ema_betas(2, 0.8, 0.9) == [0.8]  # a single merge uses beta
    with pytest.raises(UserError, match="at least two"):
        ema_betas(1)
    with pytest.raises(UserError, match="beta2=1.5"):
        ema_betas(3, 0.9, 1.5)


def test_power_gamma_solves_the_cubic():
    gamma = power_ema_gamma(0.2)
    s = 0.2 ** -2
    assert gamma**3 + 7 * gamma**2 + (16 - s) * gamma + (12 - s) == pytest.approx(0, abs=1e-9)
    assert gamma == pytest.approx(1.826214, abs=1e-5)
    assert gamma == max(r.real for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r.imag) < 1e-12)
    # γ = 1 exactly when sigma_rel² = (γ+1)/((γ+2)²(γ+3)) = 2/36
    assert power_ema_gamma((2 / 36) ** 0.5) == pytest.approx(1.0)
    assert power_ema_gamma(12 ** -0.5) == pytest.approx(0.0, abs=1e-9)
    for bad in (0.0, 0.3, 0.5, -0.1):
        with pytest.raises(UserError, match="sigma_rel"):
            power_ema_gamma(bad)


def test_power_betas_start_at_zero():
    gamma = power_ema_gamma(0.2)
    betas = ema_betas(4, sigma_rel=0.2)
    assert betas == pytest.approx([0.0, 0.5 ** (gamma + 1), (2 / 3) ** (gamma + 1)])
    # γ = 0 (sigma_rel = 1/√12) is the plain mean of files 2..N; the first file gets nothing
    assert ema_weights(ema_betas(5, sigma_rel=12 ** -0.5)) == pytest.approx([0, 0.25, 0.25, 0.25, 0.25])


def test_weights_sum_to_one():
    weights = ema_weights([0.8, 0.85, 0.9])
    assert sum(weights) == pytest.approx(1.0)
    assert weights[-1] == pytest.approx(0.1)
    assert weights[0] == pytest.approx(0.8 * 0.85 * 0.9)


# -- averages ----------------------------------------------------------------------------------
def test_constant_beta_average(run4):
    tensors, _ = post_hoc_ema(run4, beta=0.9)
    # 1 -> 0.9·1 + 0.1·2 = 1.1 -> 0.9·1.1 + 0.1·3 = 1.29 -> 0.9·1.29 + 0.1·4 = 1.561
    assert _value(tensors) == pytest.approx(1.561, abs=1e-6)
    assert tensors[ALPHA].item() == 1.0
    assert tensors[f"{MODULE}.counter"].tolist() == [1]  # non-float: the first file's
    assert tensors[DOWN].dtype == torch.float32


def test_linear_beta_average(run4):
    tensors, metadata = post_hoc_ema(run4, beta=0.8, beta2=0.9)
    # betas 0.8, 0.85, 0.9: 1 -> 1.2 -> 0.85·1.2 + 0.15·3 = 1.47 -> 0.9·1.47 + 0.1·4 = 1.723
    assert _value(tensors) == pytest.approx(1.723, abs=1e-6)
    record = json.loads(metadata["ss_ema"])
    assert record["method"] == "linear" and record["beta"] == 0.8 and record["beta2"] == 0.9
    assert record["betas"] == pytest.approx([0.8, 0.85, 0.9])


def test_power_ema_average(run4, tmp_path):
    gamma = power_ema_gamma(0.2)
    b2, b3 = 0.5 ** (gamma + 1), (2 / 3) ** (gamma + 1)
    expected = (2 * b2 + 3 * (1 - b2)) * b3 + 4 * (1 - b3)  # β_1 = 0: the state starts from file 2
    tensors, metadata = post_hoc_ema(run4, sigma_rel=0.2)
    assert _value(tensors) == pytest.approx(expected, abs=1e-5)
    record = json.loads(metadata["ss_ema"])
    assert record["method"] == "power" and record["sigma_rel"] == 0.2 and record["gamma"] == pytest.approx(gamma)
    assert "beta" not in record
    # the first file's values do not matter
    other_first = _write(tmp_path / "other" / "first.safetensors", 50, 100)
    tensors2, _ = post_hoc_ema([other_first, *run4[1:]], sigma_rel=0.2)
    assert torch.equal(tensors2[DOWN], tensors[DOWN])


def test_bf16_in_bf16_out(tmp_path):
    paths = [_write(tmp_path / f"b{c}.safetensors", c, 10 * c, dtype=torch.bfloat16) for c in (1, 2, 3)]
    tensors, _ = post_hoc_ema(paths, beta=0.5)
    assert tensors[DOWN].dtype == tensors[UP].dtype == tensors[ALPHA].dtype == torch.bfloat16
    assert _value(tensors) == 2.25  # 1 -> 1.5 -> 2.25, exact in bf16


def test_mixed_dtypes_follow_the_first_file(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1, 1, dtype=torch.bfloat16)
    b = _write(tmp_path / "b.safetensors", 3, 2, dtype=torch.float32)
    tensors, _ = post_hoc_ema([a, b], beta=0.5)
    assert tensors[DOWN].dtype == torch.bfloat16 and _value(tensors) == 2.0


# -- order -------------------------------------------------------------------------------------
def test_order_by_steps_not_mtime_or_arguments(run4):
    now = 1_700_000_000
    for i, path in enumerate(run4):  # the newest file on disk is the oldest checkpoint
        os.utime(path, (now - 100 * i, now - 100 * i))
    shuffled = [run4[2], run4[0], run4[3], run4[1]]
    assert order_checkpoints(shuffled) == [(p, 100 * c) for p, c in zip(run4, (1, 2, 3, 4))]
    expected, _ = post_hoc_ema(run4, beta=0.9)
    tensors, metadata = post_hoc_ema(shuffled, beta=0.9)
    assert torch.equal(tensors[DOWN], expected[DOWN])
    assert json.loads(metadata["ss_ema"])["steps"] == [100, 200, 300, 400]


def test_no_sort_keeps_the_given_order(run4):
    tensors, metadata = post_hoc_ema(list(reversed(run4)), beta=0.5, sort=False)
    # 4 -> 3.5 -> 2.75 -> 1.875
    assert _value(tensors) == pytest.approx(1.875)
    record = json.loads(metadata["ss_ema"])
    assert record["order_by"] == "arguments" and record["steps"] == [400, 300, 200, 100]
    assert metadata["modelspec.title"] == "file 1"  # the last file given


def test_epoch_fallback_and_missing_step(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1, None, ss_epoch="3")
    b = _write(tmp_path / "b.safetensors", 2, 500, ss_epoch="1")
    assert order_checkpoints([a, b]) == [(b, 1), (a, 3)]
    _, metadata = post_hoc_ema([a, b], beta=0.5)
    assert json.loads(metadata["ss_ema"])["order_by"] == "ss_epoch"
    assert "ss_steps" not in metadata  # a's (the last) has none, and an epoch is no step
    c = _write(tmp_path / "c.safetensors", 3, None, ss_epoch=None)
    with pytest.raises(UserError, match=r"c\.safetensors.*--no_sort"):
        order_checkpoints([b, c])


def test_duplicate_steps(run4, tmp_path):
    twin = _write(tmp_path / "twin.safetensors", 7, 200)
    with pytest.raises(UserError, match="ss_steps=200"):
        order_checkpoints([*run4, twin])
    with pytest.raises(UserError, match="given twice"):
        post_hoc_ema([run4[0], run4[1], run4[0]])


# -- refusals ----------------------------------------------------------------------------------
def test_alpha_mismatch(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1, 1, alpha=1.0)
    b = _write(tmp_path / "b.safetensors", 2, 2, alpha=4.0)
    with pytest.raises(UserError, match=rf"{ALPHA}.*a\.safetensors.*b\.safetensors"):
        post_hoc_ema([a, b])


def test_key_mismatch(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1, 1)
    extra = {"lora_unet_blocks_1_ffn_0.lora_down.weight": torch.ones(2, 8)}
    b = _write(tmp_path / "b.safetensors", 2, 2, extra_tensors=extra)
    with pytest.raises(UserError, match=r"only in b\.safetensors: lora_unet_blocks_1_ffn_0\.lora_down\.weight"):
        post_hoc_ema([a, b])


def test_shape_mismatch(tmp_path):
    a = _write(tmp_path / "a.safetensors", 1, 1)
    b = _write(tmp_path / "b.safetensors", 2, 2, extra_tensors={DOWN: torch.ones(4, 8)})
    with pytest.raises(UserError, match=r"shape \[2, 8\].*\[4, 8\]"):
        post_hoc_ema([a, b])


@pytest.mark.parametrize("key, first, second, message", [
    ("ss_loraid", "ids=0-3", "ids=4-7", "different LORAID ids or allocations"),
    ("ss_loraid", "ids=0-3", None, "different LORAID ids or allocations"),
    ("ss_network_module", "networks.lora_wan", "lycoris.kohya", "different network kinds"),
    ("ss_experts", "high_noise", "low_noise", "different Wan2.2 experts"),
])
def test_identity_mismatch(tmp_path, key, first, second, message):
    a = _write(tmp_path / "a.safetensors", 1, 1, **{key: first})
    b = _write(tmp_path / "b.safetensors", 2, 2, **{key: second})
    with pytest.raises(UserError, match=message):
        post_hoc_ema([a, b])


# -- metadata and file -------------------------------------------------------------------------
def test_metadata_and_hashes(run4, tmp_path):
    tensors, metadata = post_hoc_ema(run4, beta=0.9)
    assert not any(k.startswith("sshs_") for k in metadata)
    out = tmp_path / "ema.safetensors"
    save_lora_file(out, tensors, metadata)
    loaded, meta = load_lora_file(out)
    assert meta["modelspec.title"] == "file 4" and meta["ss_steps"] == "400"
    record = json.loads(meta["ss_ema"])
    assert record["method"] == "constant" and record["beta"] == 0.9
    assert record["steps"] == [100, 200, 300, 400]
    assert record["files"] == [p.name for p in run4]
    assert sum(record["weights"]) == pytest.approx(1.0)
    plain = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(loaded, plain)
    _, last_meta = load_lora_file(run4[-1])
    assert meta["sshs_model_hash"] != last_meta["sshs_model_hash"]


def test_folder_expansion(run4, tmp_path):
    final = _write(tmp_path / "lora.safetensors", 4, 400)  # the final LoRA: same tensors as the step-400 file
    _write(tmp_path / "converted.safetensors", 9, None)
    files, notes = collect_checkpoints([tmp_path], exclude=[tmp_path / "out.safetensors"])
    assert files == run4
    assert any("lora.safetensors" in n and "same step and tensors" in n for n in notes)
    assert any("converted.safetensors" in n and "no ss_steps" in n for n in notes)
    assert final.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no LoRA file with ss_steps"):
        collect_checkpoints([empty])


def test_a_runs_checkpoint_folder_brings_its_final_lora(tmp_path):
    """The run folder's lora_checkpoints/ (what docs/tools.md shows) misses the last steps without lora/."""
    run = tmp_path / "runs" / "20261203_120000_demo"
    (run / "lora_checkpoints").mkdir(parents=True)
    (run / "lora").mkdir()
    (run / "run.json").write_text("{}")
    checkpoints = [_write(run / "lora_checkpoints" / f"l-step{100 * c:08d}.safetensors", c, 100 * c) for c in (1, 2)]
    final = _write(run / "lora" / "l.safetensors", 3, 250)  # the final step is not a checkpoint step
    files, notes = collect_checkpoints([run / "lora_checkpoints"])
    assert files == [*checkpoints, final] and "added the run's final LoRA" in notes[0]
    assert collect_checkpoints([run])[0] == [*checkpoints, final]  # the run folder itself
    twin = _write(run / "lora_checkpoints" / "l-step00000250.safetensors", 3, 250)  # final step saved too
    files, notes = collect_checkpoints([run])
    assert files == [*checkpoints, twin] and any("same step and tensors" in n for n in notes)


# -- command line ------------------------------------------------------------------------------
def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    ema_tool.add_arguments(parser)
    return ema_tool.main(parser.parse_args(list(argv)))


def test_cli_folder_and_rerun(run4, tmp_path, capsys):
    out = tmp_path / "lora-ema.safetensors"
    assert _cli(str(tmp_path), "--output", str(out), "--beta", "0.8", "--beta2", "0.9") == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "ordered by ss_steps" in printed
    assert all(str(p) in printed for p in run4)
    tensors, meta = load_lora_file(out)
    assert _value(tensors) == pytest.approx(1.723, abs=1e-6)
    # a second run over the same folder skips the first result (it is the output, and an EMA result)
    assert _cli(str(tmp_path), "--output_file", str(out), "--beta", "0.8", "--beta2", "0.9") == 0
    assert "skipped" in capsys.readouterr().out
    assert torch.equal(load_lora_file(out)[0][DOWN], tensors[DOWN])


def test_cli_sigma_rel_warns_and_refuses_overwrite(run4, tmp_path, capsys):
    out = tmp_path / "power.safetensors"
    assert _cli(*map(str, run4), "--output", str(out), "--sigma_rel", "0.2", "--beta", "0.9") == 0
    captured = capsys.readouterr()
    assert "overrides --beta" in captured.err and "gamma=1.8262" in captured.out
    assert json.loads(load_lora_file(out)[1]["ss_ema"])["method"] == "power"
    with pytest.raises(UserError, match="one of the checkpoints"):
        _cli(*map(str, run4), "--output", str(run4[-1]))


def test_tool_import_is_torch_free():
    code = "import sys, musubi_pipe.tools.ema as m; assert m.HELP and m.__doc__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
