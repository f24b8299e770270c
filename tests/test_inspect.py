"""`python -m musubi_pipe.tools inspect`: format, ranks, ΔW norms, targets, --model, --verify, --json.

LoRA/LoHa/LoKr files are written by save_lora_file from networks over the tiny Wan DiT's targets (built once per
session); ComfyUI and diffusers files are written by hand. Everything runs on the CPU in seconds.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi_pipe.errors import UserError
from musubi_pipe.network.lora import LoRANetwork, lora_name
from musubi_pipe.network.lora_file import build_metadata, save_lora_file
from musubi_pipe.network.lycoris import LoHaNetwork, LoKrNetwork
from musubi_pipe.tools import inspect_lora as tool
from musubi_pipe.tools.inspect_lora import format_report, inspect_lora

REPO = Path(__file__).resolve().parents[1]
PER_BLOCK = "self_attn q,k,v,o; cross_attn q,k,v,o; ffn 0,2"


@pytest.fixture(scope="session")
def tiny(models_dir):
    """(DiT file, {official name: nn.Linear}) of the tiny T2V DiT, built and loaded once."""
    from musubi_pipe.models import get_family

    fam = get_family("wan")
    paths = fam.build_tiny(models_dir, "tiny-t2v")
    dit = fam.load_dit({"arch": "wan", "task": "tiny-t2v", "dit": paths["dit"]}, "cpu", torch.float32)
    return Path(paths["dit"]), dit, fam.lora_targets(dit)


def _randomise(network: LoRANetwork, seed: int = 0) -> LoRANetwork:
    """Non-zero weights everywhere (up/w2 start at zero), so every ΔW norm is a real test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return network


def _save(network: LoRANetwork, path: Path, kind: str = "networks.lora_wan", **extra) -> Path:
    metadata = build_metadata(
        arch="wan", modelspec_arch="wan2.1", network_module=kind, network_dim=network.network_dim,
        network_alpha=2.0, base_model="wan_tiny_dit.safetensors", steps=10, epoch=1, seed=0, learning_rate=1e-4,
        extra=extra,
    )
    save_lora_file(path, network.lora_state_dict(), metadata)
    return path


@pytest.fixture(scope="session")
def lora_file(tiny, tmp_path_factory):
    """(path, network): a rank-4 alpha-2 LoRA over every target of the tiny DiT."""
    _, _, targets = tiny
    network = _randomise(LoRANetwork(targets, 4, 2.0))
    path = _save(network, tmp_path_factory.mktemp("lora") / "lora.safetensors", ss_datasets="[" + "x" * 400 + "]")
    return path, network


def _cli(capsys, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    tool.add_arguments(parser)
    status = tool.main(parser.parse_args([str(a) for a in argv]))
    return status, capsys.readouterr().out


def _norms_match(report: dict, network: LoRANetwork) -> None:
    by_module = {m["module"]: m for m in report["modules"]}
    for official in network.official_names:
        expected = network.loras[lora_name(official)].delta_weight().norm().item()
        assert by_module[official]["delta_norm"] == pytest.approx(expected, rel=1e-4), official


# -- what the file holds ---------------------------------------------------------------------
def test_lora_ranks_alphas_norms(lora_file):
    path, network = lora_file
    report = inspect_lora(path)
    assert report["format"]["name"] == "musubi"
    assert "lora_down/lora_up/alpha" in report["format"]["description"]
    assert report["network"]["type"] == "lora" and report["network"]["modules"] == 20
    assert report["network"]["ranks"] == {"4": 20} and report["network"]["alphas"] == {"2": 20}
    for m in report["modules"]:
        assert (m["rank"], m["alpha"], m["scale"]) == (4, 2.0, 0.5)
        assert m["name"] == lora_name(m["module"])
    by_module = {m["module"]: m for m in report["modules"]}
    assert by_module["blocks.0.ffn.0"]["shape"] == [256, 128]
    assert by_module["blocks.0.ffn.2"]["shape"] == [128, 256]
    _norms_match(report, network)
    assert report["problems"] == [] and report["unrecognised_keys"] == []
    assert report["model"] is None and report["verify"] is None and report["exit_status"] == 0


def test_targeted_blocks(tiny, lora_file, tmp_path):
    report = inspect_lora(lora_file[0])
    assert report["targets"]["text"] == f"blocks 0-1 (2 blocks), per block: {PER_BLOCK}"
    assert report["targets"]["outside_blocks"] == []
    _, _, targets = tiny
    subset = {o: m for o, m in targets.items() if o.startswith("blocks.1.ffn") or o == "blocks.0.self_attn.q"}
    report = inspect_lora(_save(_randomise(LoRANetwork(subset, 2, 1.0)), tmp_path / "subset.safetensors"))
    assert report["targets"]["text"] == "blocks 0-1 (2 blocks); blocks 0: self_attn q; blocks 1: ffn 0,2"


def test_ranges_and_submodules():
    assert tool.ranges([0, 1, 2, 5, 7, 8, 9]) == "0-2, 5, 7-9"
    assert tool.ranges([3]) == "3"
    assert tool.describe_submodules(["self_attn.q", "self_attn.k", "ffn.0"]) == "self_attn q,k; ffn 0"
    text = tool.summarise_targets(["head.head", *(f"blocks.{i}.ffn.0" for i in range(40))])
    assert text["text"] == "blocks 0-39 (40 blocks), per block: ffn 0" and text["outside_blocks"] == ["head.head"]


def test_text_report(lora_file):
    text = format_report(inspect_lora(lora_file[0]))
    assert "musubi-tuner / sd-scripts" in text
    assert "LoRA, 20 modules, rank 4, alpha 2, scale 0.5, float32" in text
    assert f"targets:   blocks 0-1 (2 blocks), per block: {PER_BLOCK}" in text
    assert "ss_network_module" in text and "modelspec.architecture" in text
    datasets = next(line for line in text.splitlines() if line.strip().startswith("ss_datasets"))
    assert "(402 chars; --json shows all)" in datasets and len(datasets) < 200
    assert text.index("modelspec.architecture") < text.index("ss_base_model_version")  # sorted
    assert "blocks.1.ffn.2" in text


def test_loha_and_lokr(tiny, tmp_path):
    _, _, targets = tiny
    for cls, kind in ((LoHaNetwork, "loha"), (LoKrNetwork, "lokr")):
        network = _randomise(cls(targets, 4, 2.0))
        report = inspect_lora(_save(network, tmp_path / f"{kind}.safetensors", f"networks.{kind}"))
        assert report["network"]["type"] == kind
        assert report["format"]["name"] == "musubi"
        assert {m["rank"] for m in report["modules"]} == {4}
        assert {m["scale"] for m in report["modules"]} == {0.5}
        assert {tuple(m["shape"]) for m in report["modules"]} == {(128, 128), (256, 128), (128, 256)}
        _norms_match(report, network)
        assert report["problems"] == []
        assert tool.KIND_TITLES[kind] in format_report(report)


def test_lokr_full_w2_has_no_rank(tiny, tmp_path):
    _, _, targets = tiny
    network = _randomise(LoKrNetwork({"blocks.0.self_attn.q": targets["blocks.0.self_attn.q"]}, 16, None))
    report = inspect_lora(_save(network, tmp_path / "full.safetensors", "networks.lokr"))
    (module,) = report["modules"]
    assert module["rank"] is None and module["scale"] == 1.0
    _norms_match(report, network)


def test_comfy_file(tiny, tmp_path):
    gen = torch.Generator().manual_seed(1)
    down, up = torch.randn(8, 128, generator=gen), torch.randn(128, 8, generator=gen)
    path = tmp_path / "comfy.safetensors"
    save_file({
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
        "diffusion_model.blocks.1.ffn.0.lora_A.weight": torch.randn(8, 128, generator=gen),
        "diffusion_model.blocks.1.ffn.0.lora_B.weight": torch.randn(256, 8, generator=gen),
    }, path)
    report = inspect_lora(path, model=tiny[0])
    assert report["format"]["name"] == "comfy" and report["format"]["source_format"] == "comfy"
    assert "lora_A/lora_B" in report["format"]["suffixes"]
    q, ffn = report["modules"]
    assert q["module"] == "blocks.0.self_attn.q" and (q["rank"], q["alpha"], q["scale"]) == (8, 4.0, 0.5)
    assert q["delta_norm"] == pytest.approx((up @ down * 0.5).norm().item(), rel=1e-5)
    assert ffn["alpha"] is None and ffn["scale"] == 1.0  # ComfyUI: no alpha key -> scale 1
    assert report["targets"]["text"] == "blocks 0-1 (2 blocks); blocks 0: self_attn q; blocks 1: ffn 0"
    assert report["model"]["ok"] and report["exit_status"] == 0


def test_diffusers_file(tmp_path):
    path = tmp_path / "diffusers.safetensors"
    save_file({"transformer.blocks.3.attn2.to_out.0.lora_A.weight": torch.ones(2, 16),
               "transformer.blocks.3.attn2.to_out.0.lora_B.weight": torch.ones(16, 2)}, path)
    report = inspect_lora(path)
    assert report["format"]["name"] == "diffusers" and report["format"]["source_format"] == "diffusers"
    (module,) = report["modules"]
    assert module["module"] == "blocks.3.cross_attn.o" and module["rank"] == 2
    assert module["delta_norm"] == pytest.approx(2.0 * 16)  # every entry of up @ down is 2
    # a PEFT lora_adapter_metadata header sets the alpha diffusers applies
    save_file(load_file(path), path, {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 1})})
    report = inspect_lora(path)
    (module,) = report["modules"]
    assert (module["alpha"], module["scale"]) == (1.0, 0.5)
    assert module["delta_norm"] == pytest.approx(16.0)
    assert any("lora_adapter_metadata" in n for n in report["notes"])


def test_ai_toolkit_file(tmp_path):
    path = tmp_path / "ai_toolkit.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.net.0.proj.lora_A.weight": torch.ones(2, 16),
               "diffusion_model.blocks.0.ffn.net.0.proj.lora_B.weight": torch.ones(32, 2)}, path)
    report = inspect_lora(path)
    assert report["format"]["name"] == "diffusers" and "ai-toolkit" in report["format"]["description"]
    assert report["modules"][0]["module"] == "blocks.0.ffn.0"


def test_converted_file_has_baked_alpha(lora_file, tmp_path):
    from musubi_pipe.network.formats import convert_file

    path, network = lora_file
    comfy = tmp_path / "converted.safetensors"
    convert_file(path, comfy, "comfy")
    report = inspect_lora(comfy)
    assert report["format"]["name"] == "comfy"
    assert {(m["alpha"], m["scale"]) for m in report["modules"]} == {(None, 1.0)}
    _norms_match(report, network)  # baking keeps ΔW
    assert any("baked" in n for n in report["notes"])


def test_alpha_zero_reads_as_rank(tmp_path):
    path = tmp_path / "alpha0.safetensors"
    save_file({"lora_unet_blocks_0_ffn_2.lora_down.weight": torch.ones(2, 16),
               "lora_unet_blocks_0_ffn_2.lora_up.weight": torch.ones(16, 2),
               "lora_unet_blocks_0_ffn_2.alpha": torch.tensor(0.0)}, path)
    report = inspect_lora(path)
    assert report["modules"][0]["scale"] == 1.0
    assert any("alpha is 0" in p for p in report["problems"])


def test_incomplete_module_is_a_problem(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lora_up.weight": torch.ones(16, 2),
               "lora_unet_blocks_0_ffn_2.lora_down.weight": torch.ones(2, 16),
               "lora_unet_blocks_0_ffn_2.lora_up.weight": torch.ones(16, 2),
               "something_else": torch.ones(1)}, path)
    report = inspect_lora(path)
    assert any("blocks.0.ffn.0" in p and "lora_down.weight" in p for p in report["problems"])
    assert report["unrecognised_keys"] == ["something_else"]
    assert report["format"]["source_format"] is None  # the converter refuses this file
    assert report["exit_status"] == 0
    assert "problem:   blocks.0.ffn.0: has lora_up.weight but no lora_down.weight" in format_report(report)


# -- --model ---------------------------------------------------------------------------------
def test_model_all_match(tiny, lora_file, capsys):
    status, out = _cli(capsys, lora_file[0], "--model", tiny[0])
    assert status == 0
    assert "OK: all 20 modules match a Linear of the model" in out
    assert "tiny-t2v" in out


def test_model_comfy_and_diffusers_layouts(tiny, lora_file, tmp_path):
    dit_file, dit, _ = tiny
    comfy = tmp_path / "wan_tiny_comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(dit_file).items()}, comfy)
    report = inspect_lora(lora_file[0], model=comfy)
    assert report["model"]["layout"] == "ComfyUI file" and report["model"]["ok"]
    folder = tmp_path / "diffusers_dit"
    dit.save_pretrained(folder)
    report = inspect_lora(lora_file[0], model=folder)
    assert report["model"]["layout"] == "diffusers folder" and report["model"]["ok"]
    assert report["model"]["matched"] == 20


def _narrow_dit(dit_file: Path, path: Path, width: int = 64, drop_block: int | None = None) -> Path:
    """A fake DiT whose 128-wide axes are `width` wide (zeros), optionally without one block."""
    tensors = {}
    for key, value in load_file(dit_file).items():
        if drop_block is not None and key.startswith(f"blocks.{drop_block}."):
            continue
        tensors[key] = torch.zeros([width if d == 128 else d for d in value.shape], dtype=torch.float16)
    save_file(tensors, path)
    return path


def test_model_width_mismatch(tiny, lora_file, tmp_path, capsys):
    narrow = _narrow_dit(tiny[0], tmp_path / "narrow.safetensors")
    report = inspect_lora(lora_file[0], model=narrow)
    model = report["model"]
    assert not model["ok"] and report["exit_status"] == 1
    assert len(model["shape_mismatches"]) == 20 and model["unmatched"] == []
    q = next(s for s in model["shape_mismatches"] if s["module"] == "blocks.0.self_attn.q")
    assert q["lora_shape"] == [128, 128] and q["model_shape"] == [64, 64]
    assert "in_features 128 vs the model's 64" in q["text"]
    assert "dim 128" in model["hint"] and "dim 64" in model["hint"]
    status, out = _cli(capsys, lora_file[0], "--model", narrow)
    assert status == 1 and "MISMATCH: 0 of 20 modules match" in out and "hint:" in out
    assert "... and 10 more shape mismatches (--json lists all)" in out


def test_model_missing_blocks(tiny, lora_file, tmp_path):
    one_block = _narrow_dit(tiny[0], tmp_path / "one_block.safetensors", width=128, drop_block=1)
    report = inspect_lora(lora_file[0], model=one_block)
    unmatched = report["model"]["unmatched"]
    assert len(unmatched) == 10 and all(u["module"].startswith("blocks.1.") for u in unmatched)
    assert unmatched[0]["reason"] == "the model has 1 block (0)"
    assert report["exit_status"] == 1


def test_model_unreadable(lora_file, tmp_path):
    with pytest.raises(UserError, match="^--model: .*nope.safetensors does not exist"):
        inspect_lora(lora_file[0], model=tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="bad.safetensors"):
        inspect_lora(lora_file[0], model=bad)


# -- --verify --------------------------------------------------------------------------------
def test_verify_ok_and_tampered(lora_file, tmp_path, capsys):
    path = lora_file[0]
    status, out = _cli(capsys, path, "--verify")
    assert status == 0 and "sshs_model_hash: ok" in out and "sshs_legacy_hash: ok" in out
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = "lora_unet_blocks_0_self_attn_q.lora_up.weight"
    tensors[key] = tensors[key] + 1e-3
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, tampered, metadata)
    report = inspect_lora(tampered, verify=True)
    assert report["verify"]["sshs_model_hash"]["status"] == "mismatch"
    assert report["verify"]["sshs_model_hash"]["stored"] == metadata["sshs_model_hash"]
    assert not report["verify"]["ok"] and report["exit_status"] == 1
    status, out = _cli(capsys, tampered, "--verify")
    assert status == 1 and "MISMATCH, stored" in out


def test_verify_without_stored_hash(lora_file, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(lora_file[0]), plain)
    report = inspect_lora(plain, verify=True)
    assert report["verify"]["sshs_model_hash"]["status"] == "no stored hash"
    assert report["verify"]["ok"] and report["exit_status"] == 0
    assert "no stored hash" in format_report(report)


# -- --json, errors, import ------------------------------------------------------------------
def test_json(tiny, lora_file, capsys):
    status, out = _cli(capsys, lora_file[0], "--json", "--verify", "--model", tiny[0])
    doc = json.loads(out)
    assert status == 0 and doc["exit_status"] == 0
    assert doc["network"]["type"] == "lora" and len(doc["modules"]) == 20
    assert doc["verify"]["ok"] and doc["model"]["ok"]
    assert len(doc["metadata"]["ss_datasets"]) == 402  # not truncated


def test_unreadable_files(tiny, tmp_path):
    with pytest.raises(UserError, match="not found"):
        inspect_lora(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors"):
        inspect_lora(junk)
    with pytest.raises(UserError, match="no LoRA/LoHa/LoKr keys"):
        inspect_lora(tiny[0])  # a DiT, not a LoRA


def test_import_is_torch_free():
    code = "import sys, musubi_pipe.tools.inspect_lora as m; assert m.HELP; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
