"""LoRA layout conversion (network.formats, tools/convert.py) on a tiny diffusers Wan transformer.

Round trips between musubi, comfy and diffusers, the same ΔW in every layout, exact key names, the
foreign layouts read (diffusion-pipe, ai-toolkit, Wan-Fun), ComfyUI's key matching and alpha rule
(emulated from lora-formats.md 1.2-1.4), diffusers' load_lora_weights with zero unmatched keys and the
same output, the errors, and the CLI.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import capture_diffusers_messages
from musubi_pipe.errors import UserError
from musubi_pipe.models import get_family
from musubi_pipe.models.wan import names
from musubi_pipe.network import formats
from musubi_pipe.network.factory import network_from_weights
from musubi_pipe.network.formats import FORMATS, convert_file, delta_weights, read_lora, write_lora
from musubi_pipe.network.lora import LoRANetwork, lora_name
from musubi_pipe.network.lora_file import load_lora_file, model_hashes, save_lora_file
from musubi_pipe.network.lycoris import LoHaNetwork, LoKrNetwork
from musubi_pipe.tools import convert as convert_tool

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

DIM, ALPHA = 4, 2.0  # alpha != rank, so baking really scales
BAD_MESSAGES = ("unexpected keys", "missing keys", "No LoRA keys associated", "inconsistency")
PAIRS = list(itertools.permutations(FORMATS, 2))


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    return model.eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }


def targets(model) -> dict:
    return get_family("wan").lora_targets(model)


def randomized(network: LoRANetwork, seed: int = 3) -> LoRANetwork:
    """Every parameter random and nonzero (LoRA up, LoHa w2_a and LoKr w2_b start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return network


def lora_network(model, only: list[str] | None = None, alpha: float = ALPHA) -> LoRANetwork:
    selected = {o: m for o, m in targets(model).items() if only is None or o in only}
    return randomized(LoRANetwork(selected, DIM, alpha))


def network_deltas(network: LoRANetwork) -> dict[str, torch.Tensor]:
    return {o: network.loras[lora_name(o)].delta_weight() for o in network.official_names}


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=key)


def assert_same_deltas(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for module in a:
        torch.testing.assert_close(a[module], b[module], rtol=1e-5, atol=1e-6, msg=module)


# -- layouts ------------------------------------------------------------------------------------
def test_exact_key_names(base_model):
    canonical, source = read_lora(lora_network(base_model).lora_state_dict())
    assert source == "musubi"
    expected = {
        "musubi": ["lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight",
                   "lora_unet_blocks_0_self_attn_q.alpha"],
        "comfy": ["diffusion_model.blocks.0.self_attn.q.lora_A.weight",
                  "diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
        "diffusers": ["transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_B.weight"],
    }
    for to, keys in expected.items():
        out = write_lora(canonical, to)
        assert sorted(k for k in out if "blocks.0.self_attn.q." in k or "blocks_0_self_attn_q." in k
                      or "blocks.0.attn1.to_q." in k) == sorted(keys)
        assert len(out) == 20 * (3 if to == "musubi" else 2)  # 2 blocks x 10 linears
    assert "transformer.blocks.1.ffn.net.0.proj.lora_B.weight" in write_lora(canonical, "diffusers")
    assert not [k for k in write_lora(canonical, "comfy") if k.endswith(".alpha")]


def test_musubi_layout_is_the_trainers_own(base_model):
    tensors = lora_network(base_model).lora_state_dict()
    assert_same_tensors(write_lora(read_lora(tensors)[0], "musubi"), tensors)


def test_baked_alpha_is_sqrt_of_scale_on_both_matrices(base_model):
    tensors = lora_network(base_model).lora_state_dict()
    comfy = write_lora(read_lora(tensors)[0], "comfy")
    factor = math.sqrt(ALPHA / DIM)
    down = tensors["lora_unet_blocks_1_ffn_2.lora_down.weight"]
    up = tensors["lora_unet_blocks_1_ffn_2.lora_up.weight"]
    torch.testing.assert_close(comfy["diffusion_model.blocks.1.ffn.2.lora_A.weight"], down * factor)
    torch.testing.assert_close(comfy["diffusion_model.blocks.1.ffn.2.lora_B.weight"], up * factor)


@pytest.mark.parametrize("a,b", PAIRS)
def test_file_round_trip_restores_tensors_and_alpha(base_model, tmp_path, a, b):
    network = lora_network(base_model)
    original = tmp_path / "original.safetensors"
    save_lora_file(original, network.lora_state_dict(), {"ss_network_dim": str(DIM), "ss_network_alpha": str(ALPHA)})
    convert_file(original, tmp_path / "a.safetensors", a)
    convert_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors", b)
    convert_file(tmp_path / "b.safetensors", tmp_path / "a2.safetensors", a)
    assert_same_tensors(load_file(tmp_path / "a2.safetensors"), load_file(tmp_path / "a.safetensors"))
    back, _ = read_lora(*load_lora_file(tmp_path / "a2.safetensors"))
    assert {entry["alpha"] for entry in back.values()} == {ALPHA}  # alpha restored, not rank
    assert_same_deltas(delta_weights(back), network_deltas(network))


@pytest.mark.parametrize("a,b", PAIRS)
def test_tensor_round_trip_keeps_the_update(base_model, a, b):
    """Without metadata a baked alpha reads back as alpha = rank: other tensors, same ΔW."""
    network = lora_network(base_model)
    canonical = read_lora(network.lora_state_dict())[0]
    tensors_a = write_lora(canonical, a)
    tensors_b = write_lora(read_lora(tensors_a)[0], b)
    back_a = write_lora(read_lora(tensors_b)[0], a)
    assert set(back_a) == set(tensors_a)
    assert_same_deltas(delta_weights(read_lora(back_a)[0]), network_deltas(network))
    if FORMATS[a].bake_alpha:  # baked layouts carry everything in A and B: exactly the same tensors
        assert_same_tensors(back_a, tensors_a)


@pytest.mark.parametrize("to", list(FORMATS))
def test_delta_is_the_same_in_every_format(base_model, to):
    network = lora_network(base_model)
    canonical, _ = read_lora(write_lora(read_lora(network.lora_state_dict())[0], to))
    assert_same_deltas(delta_weights(canonical), network_deltas(network))


# -- foreign layouts ----------------------------------------------------------------------------
def foreign_files(network: LoRANetwork) -> dict[str, tuple[str, dict]]:
    """Files other trainers write for the same update, each with the source format read_lora must report."""
    sd = network.lora_state_dict()
    factor = math.sqrt(ALPHA / DIM)
    pipe, toolkit, toolkit_t, kohya_comfy, fun = {}, {}, {}, {}, {}
    for official in network.official_names:
        down, up = sd[f"{lora_name(official)}.lora_down.weight"], sd[f"{lora_name(official)}.lora_up.weight"]
        diffusers_name = names.diffusers_module_name(official)
        pipe[f"diffusion_model.{official}.lora_A.weight"] = down * factor  # diffusion-pipe: no alpha
        pipe[f"diffusion_model.{official}.lora_B.weight"] = up * factor
        for out, prefix in ((toolkit, "diffusion_model."), (toolkit_t, "transformer.")):
            out[f"{prefix}{diffusers_name}.lora_A.weight"] = down
            out[f"{prefix}{diffusers_name}.lora_B.weight"] = up
            out[f"{prefix}{diffusers_name}.alpha"] = torch.tensor(ALPHA)
        kohya_comfy[f"diffusion_model.{official}.lora_down.weight"] = down
        kohya_comfy[f"diffusion_model.{official}.lora_up.weight"] = up
        kohya_comfy[f"diffusion_model.{official}.alpha"] = torch.tensor(ALPHA)
    for key, value in sd.items():
        fun[key.replace("lora_unet_", "lora_unet__", 1)] = value
    return {"diffusion-pipe": ("comfy", pipe), "ai-toolkit": ("ai-toolkit", toolkit),
            "ai-toolkit transformer.": ("ai-toolkit", toolkit_t), "comfy lora_down": ("official", kohya_comfy),
            "wan-fun": ("wan-fun", fun)}


@pytest.mark.parametrize("style", ["diffusion-pipe", "ai-toolkit", "ai-toolkit transformer.", "comfy lora_down",
                                   "wan-fun"])
def test_reads_foreign_layouts(base_model, style):
    network = lora_network(base_model)
    expected_format, tensors = foreign_files(network)[style]
    canonical, source_format = read_lora(tensors)
    assert source_format == expected_format
    assert set(canonical) == set(network.official_names)
    assert_same_deltas(delta_weights(canonical), network_deltas(network))
    musubi = write_lora(canonical, "musubi")
    assert set(musubi) == set(network.lora_state_dict())


def test_diffusers_saved_lora_alpha_is_read_from_its_metadata(base_model, inputs, tmp_path):
    """A LoRA trained and saved by diffusers/PEFT keeps lora_alpha in its header, not in the tensors."""
    trained = copy.deepcopy(base_model)
    config = peft.LoraConfig(r=DIM, lora_alpha=8, target_modules=["to_q", "to_out.0", "ffn.net.2"],
                             init_lora_weights=False)
    trained.add_adapter(config)
    diffusers.WanPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=peft.utils.get_peft_model_state_dict(trained),
        transformer_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    convert_file(tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "musubi.safetensors", "musubi")
    tensors, _ = load_lora_file(tmp_path / "musubi.safetensors")
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}
    assert "lora_unet_blocks_1_self_attn_o.lora_down.weight" in tensors
    ours = copy.deepcopy(base_model)
    network_from_weights(targets(ours), tensors).apply_to()
    torch.testing.assert_close(run(ours, inputs), run(trained, inputs), rtol=0, atol=1e-5)


def test_non_block_modules_pass_through_musubi_and_comfy(base_model):
    network = lora_network(base_model, only=["blocks.0.self_attn.q"])
    canonical = read_lora(network.lora_state_dict())[0]
    g = torch.Generator().manual_seed(5)
    canonical["head.head"] = {"kind": "lora", "down": torch.randn(DIM, 32, generator=g),
                              "up": torch.randn(64, DIM, generator=g), "alpha": 1.0}
    musubi = write_lora(canonical, "musubi")
    assert "lora_unet_head_head.lora_down.weight" in musubi
    comfy = write_lora(read_lora(musubi)[0], "comfy")
    assert "diffusion_model.head.head.lora_A.weight" in comfy
    assert_same_deltas(delta_weights(read_lora(comfy)[0]), delta_weights(canonical))
    with pytest.raises(UserError, match=r"head\.head.*no diffusers name.*comfy"):
        write_lora(canonical, "diffusers")


# -- what other tools load ----------------------------------------------------------------------
def comfy_key_map(model) -> set[str]:
    """ComfyUI's LoRA stems for a Wan model (lora-formats.md 1.2): diffusion_model.<path>, lora_unet_<path_>."""
    from musubi_pipe.models.wan.keymap import dit_to_official

    stems = {k.removesuffix(".weight") for k in dit_to_official(model.state_dict()) if k.endswith(".weight")}
    return {f"diffusion_model.{s}" for s in stems} | {f"lora_unet_{s.replace('.', '_')}" for s in stems}


def comfy_deltas(tensors: dict, stems: set[str]) -> dict[str, torch.Tensor]:
    """ΔW per stem as ComfyUI computes it (1.3-1.4): every key consumed, scale alpha/rank, no alpha -> 1."""
    by_stem: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem = next((s for s in stems if key.startswith(s + ".")), None)
        assert stem is not None, f"lora key not loaded: {key}"
        by_stem.setdefault(stem, {})[key[len(stem) + 1:]] = value.float()
    deltas = {}
    for stem, t in by_stem.items():
        if "lora_A.weight" in t or "lora_down.weight" in t:
            down = t.get("lora_A.weight", t.get("lora_down.weight"))
            up = t.get("lora_B.weight", t.get("lora_up.weight"))
            deltas[stem] = up @ down * (t["alpha"].item() / down.shape[0] if "alpha" in t else 1.0)
        elif "hada_w1_a" in t:
            scale = t["alpha"].item() / t["hada_w1_b"].shape[0]
            deltas[stem] = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
        else:
            scale = t["alpha"].item() / t["lokr_w2_b"].shape[0]
            deltas[stem] = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * scale
    return deltas


def lycoris_networks(model) -> dict[str, LoRANetwork]:
    return {"loha": randomized(LoHaNetwork(targets(model), DIM, ALPHA)),
            "lokr": randomized(LoKrNetwork(targets(model), 2, 1.0, factor=4))}


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("to", ["musubi", "comfy"])
def test_comfyui_matches_every_key_with_the_same_delta(base_model, caplog, kind, to):
    network = lora_network(base_model) if kind == "lora" else lycoris_networks(base_model)[kind]
    canonical, _ = read_lora(network.lora_state_dict())
    assert {e["kind"] for e in canonical.values()} == {kind}
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        tensors = write_lora(canonical, to)
    warned = [r for r in caplog.records if "diffusers does not load LoHa or LoKr" in r.getMessage()]
    assert len(warned) == (1 if to == "comfy" and kind != "lora" else 0)
    deltas = comfy_deltas(tensors, comfy_key_map(base_model))
    prefix = "lora_unet_" if to == "musubi" else "diffusion_model."
    by_official = {o: deltas[lora_name(o) if to == "musubi" else prefix + o] for o in network.official_names}
    assert_same_deltas(by_official, network_deltas(network))
    assert_same_deltas(delta_weights(read_lora(tensors)[0]), network_deltas(network))


def diffusers_pipeline(transformer):
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)


@pytest.mark.parametrize("to,only", [
    ("diffusers", None),
    ("comfy", None),
    ("comfy", ["blocks.1.self_attn.q", "blocks.1.cross_attn.v", "blocks.0.ffn.2"]),  # a partial LoRA
    ("diffusers", ["blocks.0.cross_attn.o"]),
])  # fmt: skip
def test_diffusers_loads_with_zero_unmatched_keys_and_same_output(base_model, inputs, tmp_path, to, only):
    network = lora_network(copy.deepcopy(base_model), only=only)
    source = tmp_path / "musubi.safetensors"
    save_lora_file(source, network.lora_state_dict(), {"ss_network_alpha": str(ALPHA)})
    path = tmp_path / f"{to}.safetensors"
    convert_file(source, path, to)

    ours = copy.deepcopy(base_model)
    rebuilt = LoRANetwork({o: m for o, m in targets(ours).items() if o in network.official_names}, DIM, ALPHA)
    rebuilt.load_lora_state_dict(network.lora_state_dict())
    rebuilt.apply_to()
    theirs = copy.deepcopy(base_model)
    converted = diffusers.WanPipeline.lora_state_dict(str(path))
    messages = capture_diffusers_messages(
        lambda: diffusers_pipeline(theirs).load_lora_weights(str(path), adapter_name="t")
    )
    for bad in BAD_MESSAGES:
        assert not [m for m in messages if bad in m], messages
    loaded = peft.utils.get_peft_model_state_dict(theirs, adapter_name="t")
    assert set(loaded) == {k.removeprefix("transformer.") for k in converted}
    assert len(loaded) == 2 * len(network.official_names)
    torch.testing.assert_close(run(theirs, inputs), run(ours, inputs), rtol=0, atol=1e-5)
    assert not torch.allclose(run(ours, inputs), run(base_model, inputs), atol=1e-3)  # the LoRA matters


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_to_diffusers_is_refused(base_model, tmp_path, kind):
    network = lycoris_networks(base_model)[kind]
    canonical, _ = read_lora(network.lora_state_dict())
    with pytest.raises(UserError, match="diffusers loads no LoHa or LoKr.*comfy"):
        write_lora(canonical, "diffusers")
    source = tmp_path / "lycoris.safetensors"
    save_lora_file(source, network.lora_state_dict(), {})
    with pytest.raises(UserError, match=str(source)):
        convert_file(source, tmp_path / "out.safetensors", "diffusers")
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_keys_are_named(base_model):
    tensors = lora_network(base_model).lora_state_dict()
    bad = {**tensors, "lora_unet_blocks_0_self_attn_q.dora_scale": torch.ones(32), "foo.bar": torch.ones(1),
           "lora_unet_blocks_0_norm3.lora_down.weight": torch.ones(DIM, 32)}
    with pytest.raises(UserError) as info:
        read_lora(bad, source="x.safetensors")
    message = str(info.value)
    assert message.startswith("x.safetensors: 3 of")
    for key in ("lora_unet_blocks_0_self_attn_q.dora_scale", "foo.bar", "lora_unet_blocks_0_norm3.lora_down.weight"):
        assert key in message


@pytest.mark.parametrize("mutate,needle", [
    (lambda sd: sd.pop("lora_unet_blocks_0_ffn_0.lora_up.weight"), "no lora up"),
    (lambda sd: sd.update({"diffusion_model.blocks.5.ffn.0.lora_A.weight": torch.ones(DIM, 32)}), "mixes key prefixes"),
    (lambda sd: sd.update({"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.ones(DIM, 32)}), "both give down"),
    (lambda sd: sd.update({"lora_unet_blocks_0_ffn_0.hada_w1_a": torch.ones(64, DIM)}), "LoHa and LoRA"),
])  # fmt: skip
def test_malformed_files_are_refused(base_model, mutate, needle):
    tensors = lora_network(base_model).lora_state_dict()
    mutate(tensors)
    with pytest.raises(UserError, match=needle):
        read_lora(tensors)


# -- files and CLI ------------------------------------------------------------------------------
def test_convert_file_metadata_and_hashes(base_model, tmp_path):
    source = tmp_path / "in.safetensors"
    save_lora_file(source, lora_network(base_model).lora_state_dict(), {"ss_network_dim": "4", "modelspec.title": "t"})
    convert_file(source, tmp_path / "out.safetensors", "comfy")
    tensors, metadata = load_lora_file(tmp_path / "out.safetensors")
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.title"] == "t"
    assert metadata["ss_lora_format"] == "comfy" and json.loads(metadata[formats.BAKED_ALPHA_KEY]) == ALPHA
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == model_hashes(tensors, metadata)
    convert_file(tmp_path / "out.safetensors", tmp_path / "back.safetensors", "musubi")
    _, back = load_lora_file(tmp_path / "back.safetensors")
    assert formats.BAKED_ALPHA_KEY not in back and back["ss_lora_format"] == "musubi"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    convert_tool.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_converts_and_reports(base_model, tmp_path, capsys):
    source = tmp_path / "in.safetensors"
    save_lora_file(source, lora_network(base_model).lora_state_dict(), {})
    out = tmp_path / "out.safetensors"
    assert convert_tool.main(parse([str(source), str(out), "--to", "diffusers", "--dtype", "bfloat16"])) == 0
    printed = capsys.readouterr().out
    assert "musubi -> diffusers, 20 modules (20 LoRA)" in printed and str(out) in printed
    tensors = load_file(out)
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert all(k.startswith("transformer.blocks.") for k in tensors)
    with pytest.raises(SystemExit):
        parse([str(source), str(out), "--to", "kohya"])
    with pytest.raises(UserError, match="not found"):
        convert_tool.main(parse([str(tmp_path / "missing.safetensors"), str(out), "--to", "comfy"]))


def test_cli_module_imports_no_torch():
    code = "import sys, musubi_pipe.tools.convert as c; assert 'torch' not in sys.modules; print(c.HELP)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "convert" in result.stdout
