"""HunyuanVideo LoRA files: official module names on the diffusers model (fused img_attn_qkv / txt_attn_qkv /
linear1 trained as one module), the default layout that ComfyUI and musubi-tuner load, and the diffusers
layout that diffusers' HunyuanVideo loader takes with zero unmatched keys and the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import capture_diffusers_messages
from musubi_pipe.errors import UserError
from musubi_pipe.models import get_family
from musubi_pipe.models.hunyuan_video.names import DOUBLE_LINEARS, SINGLE_LINEARS
from musubi_pipe.network.factory import network_from_weights
from musubi_pipe.network.formats import convert_file, delta_weights, in_format, read_lora, read_lora_file, write_lora
from musubi_pipe.network.fused import FusedLinear
from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.network.lora_file import save_lora_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

FAMILY = get_family("hunyuan_video")
BAD_MESSAGES = ("unexpected keys", "missing keys", "No LoRA keys associated", "inconsistency")
DIM, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=8,
        pooled_projection_dim=6, rope_axes_dim=(4, 14, 14), guidance_embeds=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 2, 4, 4, generator=g), "timestep": torch.tensor([400.0]),
            "encoder_hidden_states": torch.randn(1, 5, 8, generator=g),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
            "pooled_projections": torch.randn(1, 6, generator=g), "guidance": torch.tensor([6000.0])}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def trained(model, only=None, seed=3) -> LoRANetwork:
    targets = FAMILY.lora_targets(model)
    if only:
        targets = {k: v for k, v in targets.items() if k in only}
    network = LoRANetwork(targets, DIM, ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return network


def test_targets_are_the_official_block_linears(dit):
    targets = FAMILY.lora_targets(dit)
    expected = {f"double_blocks.{i}.{s}" for i in range(2) for s in DOUBLE_LINEARS}
    expected |= {f"single_blocks.{i}.{s}" for i in range(2) for s in SINGLE_LINEARS}
    assert set(targets) == expected
    qkv, linear1 = targets["double_blocks.0.img_attn_qkv"], targets["single_blocks.1.linear1"]
    assert isinstance(qkv, FusedLinear) and (qkv.in_features, qkv.out_features) == (64, 192)
    assert isinstance(linear1, FusedLinear) and linear1.out_features == 3 * 64 + 4 * 64
    assert linear1.groups == [(0, 1, 2), (3,)]
    assert targets["double_blocks.1.img_mlp.fc1"] is dit.transformer_blocks[1].ff.net[0].proj


def test_fused_lora_equals_a_lora_on_the_official_fused_weight(dit, inputs):
    """ΔW of img_attn_qkv is [3·hidden, hidden]; merging it row-split into to_q/k/v is what the hooks compute."""
    model = copy.deepcopy(dit)
    network = trained(model)
    network.apply_to()
    hooked = run(model, inputs)
    assert not torch.allclose(hooked, run(dit, inputs), atol=1e-4)
    assert network.loras["lora_unet_double_blocks_0_img_attn_qkv"].lora_up.weight.shape == (192, DIM)
    merged = copy.deepcopy(dit)
    mnet = trained(merged)
    mnet.merge_into_base()
    torch.testing.assert_close(run(merged, inputs), hooked, rtol=0, atol=1e-4)


def test_default_layout_is_official_names_with_alpha(dit):
    tensors, metadata = in_format(trained(dit).lora_state_dict(), FAMILY.lora_naming.default_save_format)
    assert metadata == {"ss_lora_format": "official"}
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight" in tensors
    assert "diffusion_model.single_blocks.1.modulation.linear.lora_up.weight" in tensors
    assert tensors["diffusion_model.double_blocks.1.txt_mlp.fc2.alpha"].item() == ALPHA
    assert all(k.startswith("diffusion_model.") for k in tensors)


def comfy_stems(dit) -> set[str]:
    """ComfyUI's HunyuanVideo LoRA stems (lora-formats.md 1.2): its model keys (official names with
    `_mod.lin`, `_attn.qkv`, `mlp.0` spellings) as lora_unet_<comfy name_>, and the official names mapped back,
    under diffusion_model. and transformer."""
    official = set(FAMILY.lora_targets(dit))
    comfy = {o.replace("_mod.linear", "_mod.lin").replace("_attn_qkv", "_attn.qkv").replace("_attn_proj", "_attn.proj")
             .replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.2").replace("modulation.linear", "modulation.lin")
             for o in official}
    return ({f"lora_unet_{c.replace('.', '_')}" for c in comfy} | {f"diffusion_model.{o}" for o in official}
            | {f"transformer.{o}" for o in official})


def comfy_unloaded(tensors: dict, stems: set[str]) -> list[str]:
    suffixes = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha")
    return sorted(k for k in tensors if not any(k == f"{s}.{x}" for s in stems for x in suffixes))


def test_comfyui_loads_the_default_file_but_not_musubis_underscored_one(dit):
    """The reason the default is `official`: ComfyUI matches lora_unet_ HunyuanVideo names only where its own
    spelling coincides (attn_qkv, attn_proj, linear1/2), so a musubi file's mlp/modulation keys do not load."""
    network = trained(dit)
    stems = comfy_stems(dit)
    official, _ = in_format(network.lora_state_dict(), "official")
    assert comfy_unloaded(official, stems) == []
    musubi = network.lora_state_dict()
    missed = comfy_unloaded(musubi, stems)
    assert missed and all(("mlp_fc" in k or "mod_linear" in k or "modulation_linear" in k) for k in missed)


def musubi_tuner_reads(tensors: dict) -> dict:
    """musubi-tuner's loading of a `diffusion_model.` file (convert_lora.convert_from_diffusers, contract 5.3):
    the key body with '.' -> '_' under lora_unet_, lora_down/lora_up/alpha suffixes restored, alpha kept
    (added as the rank only where missing)."""
    out = {}
    for key, value in tensors.items():
        body = key.split(".", 1)[1]
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if body.endswith(suffix):
                out["lora_unet_" + body[: -len(suffix)].replace(".", "_") + suffix] = value
    return out


def test_musubi_tuner_reads_the_default_file_back_to_its_own_names(dit):
    network = trained(dit)
    official, _ = in_format(network.lora_state_dict(), "official")
    assert musubi_tuner_reads(official).keys() == network.lora_state_dict().keys()
    for key, value in musubi_tuner_reads(official).items():
        torch.testing.assert_close(value, network.lora_state_dict()[key], rtol=0, atol=0)


def test_every_layout_round_trips_to_the_same_deltas(dit, tmp_path):
    network = trained(dit)
    source = tmp_path / "musubi.safetensors"
    save_lora_file(source, network.lora_state_dict(), {"ss_base_model_version": "hunyuan_video"})
    reference = delta_weights(read_lora(network.lora_state_dict())[0])
    for to in FAMILY.lora_naming.save_formats:
        path = tmp_path / f"{to}.safetensors"
        convert_file(source, path, to)
        tensors, _ = read_lora_file(path)
        assert tensors.keys() == network.lora_state_dict().keys(), to
        for module, delta in delta_weights(read_lora(tensors)[0]).items():
            torch.testing.assert_close(delta, reference[module], rtol=1e-5, atol=1e-6)


def test_network_loads_from_any_layout_with_the_same_outputs(dit, inputs, tmp_path):
    network = trained(dit)
    path = tmp_path / "official.safetensors"
    tensors, metadata = in_format(network.lora_state_dict(), "official")
    save_lora_file(path, tensors, metadata)
    model_a, model_b = copy.deepcopy(dit), copy.deepcopy(dit)
    trained(model_a).apply_to()
    loaded, _ = read_lora_file(path)
    network_from_weights(FAMILY.lora_targets(model_b), loaded).apply_to()
    torch.testing.assert_close(run(model_b, inputs), run(model_a, inputs), rtol=0, atol=1e-6)


# diffusers splits single_blocks.N.linear1's lora_B at the real model's hidden size (3072, hard-coded), so
# on this tiny model it is left out; every other module, fused qkv included, is checked.
ALL_BUT_LINEAR1 = sorted({f"double_blocks.{i}.{s}" for i in range(2) for s in DOUBLE_LINEARS}
                         | {f"single_blocks.{i}.{s}" for i in range(2) for s in SINGLE_LINEARS if s != "linear1"})


@pytest.mark.parametrize("only", [ALL_BUT_LINEAR1, ["double_blocks.0.img_attn_qkv", "single_blocks.1.linear2",
                                                    "double_blocks.1.txt_mod.linear"]])
def test_diffusers_loads_its_layout_with_zero_unmatched_keys_and_same_output(dit, inputs, tmp_path, only):
    network = trained(copy.deepcopy(dit), only=only)
    path = tmp_path / "diffusers.safetensors"
    tensors, metadata = in_format(network.lora_state_dict(), "diffusers")
    assert not [k for k in tensors if k.endswith(".alpha")] and all(k.startswith("transformer.") for k in tensors)
    save_lora_file(path, tensors, metadata)

    ours = copy.deepcopy(dit)
    rebuilt = trained(ours, only=only)
    rebuilt.apply_to()
    theirs = copy.deepcopy(dit)
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=theirs, vae=None,
                                          scheduler=None, text_encoder_2=None, tokenizer_2=None)
    converted = diffusers.HunyuanVideoPipeline.lora_state_dict(str(path))
    messages = capture_diffusers_messages(lambda: pipe.load_lora_weights(str(path), adapter_name="t"))
    for bad in BAD_MESSAGES:
        assert not [m for m in messages if bad in m], messages
    loaded = peft.utils.get_peft_model_state_dict(theirs, adapter_name="t")
    assert set(loaded) == {k.removeprefix("transformer.") for k in converted}
    torch.testing.assert_close(run(theirs, inputs), run(ours, inputs), rtol=0, atol=1e-5)


def test_diffusers_layout_needs_an_img_attn_qkv_module(dit):
    network = trained(dit, only=["double_blocks.0.img_mlp.fc1"])
    canonical, _ = read_lora(network.lora_state_dict())
    with pytest.raises(UserError, match="img_attn_qkv"):
        write_lora(canonical, "diffusers")
    assert write_lora(canonical, "official")  # the default layout takes any subset


def test_default_targets_leave_modulation_out_as_musubi_tuner_does(dit):
    from musubi_pipe.network.factory import build_network

    targets = FAMILY.lora_targets(dit)
    network = build_network(targets, {"network_dim": 4}, default_excludes=FAMILY.lora_default_excludes)
    modulation = {o for o in targets if "mod" in o}
    assert len(targets) == 26 and len(modulation) == 6
    assert set(network.official_names) == set(targets) - modulation
    readmitted = build_network(targets, {"network_dim": 4, "include_patterns": [".*(img_mod|txt_mod|modulation).*"]},
                               default_excludes=FAMILY.lora_default_excludes)
    assert set(readmitted.official_names) == set(targets)


def test_layouts_that_comfyui_or_musubi_tuner_partly_ignore(dit):
    """LoraNaming.ignored_by: what ComfyUI and musubi-tuner do with each layout (checked with their code)."""
    modules = [o for o in FAMILY.lora_targets(dit) if "mod" not in o]
    assert FAMILY.lora_naming.ignored_by("official", modules) == {"musubi-tuner": (sorted(modules), "musubi")}
    lost, fix = FAMILY.lora_naming.ignored_by("musubi", modules)["ComfyUI"]
    assert fix == "official" and len(lost) == 8 and all(".img_mlp." in m or ".txt_mlp." in m for m in lost)
    assert set(FAMILY.lora_naming.ignored_by("musubi", modules)) == {"ComfyUI"}


def test_training_guidance_is_passed_as_musubi_tuner_passes_it(dit, inputs):
    """musubi: train_guidance_scale reaches the DiT unscaled; exact: x1000 as sampling's embedded guidance does."""
    latents = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor([0.4])
    cfg = {"task": "tiny-t2v", "train_guidance_scale": 6.0}
    musubi = FAMILY.training_inputs(cfg, latents, latents, t, t * 1000 + 1, {}, None, "musubi")
    exact = FAMILY.training_inputs(cfg, latents, latents, t, t * 1000, {}, None, "exact")
    assert musubi.cond["dit_guidance"].tolist() == [6.0] and exact.cond["dit_guidance"].tolist() == [6000.0]
    text = [{"llm": inputs["encoder_hidden_states"][0], "clip_pooled": inputs["pooled_projections"][0]}]
    x, ts = inputs["hidden_states"], inputs["timestep"]
    with torch.no_grad():
        sampled = FAMILY.predict(dit, x, ts, text, {"guidance": torch.tensor([6.0])})
        trained_exact = FAMILY.predict(dit, x, ts, text, exact.cond)
        trained_musubi = FAMILY.predict(dit, x, ts, text, musubi.cond)
    assert torch.equal(sampled, trained_exact)
    assert not torch.allclose(trained_musubi, trained_exact, atol=1e-4)
