"""The memory group: presets, validation of every key, attention backends and split attention, fp8 on a real DiT."""

import importlib.util

import diffusers
import pytest
import torch
from omegaconf import OmegaConf

from musubi_pipe.config import compose
from musubi_pipe.config.validate import validate
from musubi_pipe.errors import ConfigError
from musubi_pipe.memory import load_dit
from musubi_pipe.memory.attention import split_attention, use_backend
from musubi_pipe.memory.fp8 import Fp8Linear
from musubi_pipe.memory.settings import blocks_to_swap, memory_problems
from musubi_pipe.models import get_family

WAN, HV = get_family("wan"), get_family("hunyuan_video")
PRESETS = ("none", "24gb", "16gb", "12gb")


def _compose(overrides: list) -> dict:
    return OmegaConf.to_container(compose(overrides), resolve=True)


def _cfg(*overrides, stages=("train",), arch="wan", task="tiny-t2v"):
    memory = _compose([f"memory={o.split('=', 1)[1]}" for o in overrides if o.startswith("preset=")])["memory"]
    for o in overrides:
        key, value = o.split("=", 1)
        if key != "preset":
            memory[key] = value if not value.isdigit() else int(value)
    return {"memory": memory, "pipeline": {"stages": list(stages)}, "model": {"arch": arch, "task": task}}


def _problems(*overrides, **kw):
    cfg = _cfg(*overrides, **kw)
    return memory_problems(cfg, get_family(cfg["model"]["arch"]))


def test_presets_resolve_per_model_size():
    tables = {p: _compose([f"memory={p}"])["memory"] for p in PRESETS}
    assert tables["none"]["blocks_to_swap"] == 0 and not tables["none"]["fp8_base"]
    for preset in ("24gb", "16gb", "12gb"):
        memory = tables[preset]
        assert memory["fp8_base"] and memory["fp8_scaled"] and memory["gradient_checkpointing"]
        assert set(memory) == set(tables["none"])  # every preset lists every key (none.yaml is their base)
    want = {"24gb": (20, 0, 0, 30), "16gb": (30, 10, 0, 44), "12gb": (36, 20, 10, 54)}
    for preset, counts in want.items():
        memory = tables[preset]
        got = tuple(blocks_to_swap(memory, WAN, {"task": t}) for t in ("t2v-14B", "ti2v-5B", "t2v-1.3B"))
        assert got + (blocks_to_swap(memory, HV, {"task": "t2v"}),) == counts
        # each count leaves blocks on the GPU for every model size, the tiny ones included
        for family, task in ((WAN, "t2v-A14B"), (WAN, "t2v-1.3B"), (WAN, "tiny-t2v"), (HV, "t2v"), (HV, "tiny-t2v")):
            assert 0 <= blocks_to_swap(memory, family, {"task": task}) < family.num_blocks({"task": task})
    # a number on the command line replaces the preset's table
    assert _compose(["memory=24gb", "memory.blocks_to_swap=7"])["memory"]["blocks_to_swap"] == 7


def test_model_sizes_and_block_counts():
    assert [WAN.model_size({"task": t}) for t in ("t2v-14B", "i2v-A14B", "t2v-1.3B", "ti2v-5B", "tiny-t2v")] == [
        "wan_14b", "wan_14b", "wan_1.3b", "wan_5b", "tiny"]
    assert [WAN.num_blocks({"task": t}) for t in ("t2v-14B", "t2v-1.3B", "ti2v-5B", "tiny-t2v")] == [40, 30, 30, 2]
    assert HV.num_blocks({"task": "t2v"}) == 60 and HV.model_size({"task": "skyreels-i2v"}) == "hunyuan_video"
    from musubi_pipe.models.hunyuan_video.tiny import TINY_DIT_CONFIG

    assert HV.num_blocks({"task": "tiny-t2v"}) == TINY_DIT_CONFIG["num_layers"] + TINY_DIT_CONFIG["num_single_layers"]


def test_memory_problems_name_the_key_and_the_fix():
    assert _problems("preset=24gb") == []
    assert _problems("preset=12gb", stages=("generate",), arch="hunyuan_video", task="tiny-t2v") == []
    [(key, message)] = _problems("fp8_scaled=1")
    assert key == "memory.fp8_scaled" and "memory.fp8_base=true" in message
    [(key, message)] = _problems("blocks_to_swap=2", "gradient_checkpointing=1")
    assert key == "memory.blocks_to_swap" and "1..1" in message and "2 blocks" in message
    [(key, message)] = _problems("blocks_to_swap=1")
    assert "memory.gradient_checkpointing=true" in message
    assert _problems("blocks_to_swap=1", stages=("sample",)) == []  # inference swaps without checkpointing
    [(key, message)] = _problems("gradient_checkpointing_cpu_offload=1")
    assert key == "memory.gradient_checkpointing_cpu_offload"
    [(key, message)] = _problems("preset=24gb", "blocks_to_swap=1", "compile=1", "compile_mode=reduce-overhead")
    assert key == "memory.compile_mode" and "CUDA graphs" in message
    cfg = _cfg("preset=24gb")
    cfg["memory"]["blocks_to_swap"] = {"wan_14b": 20}
    [(key, message)] = memory_problems(cfg, WAN)
    assert "'tiny'" in message and "memory.blocks_to_swap=<number>" in message
    cfg["memory"]["blocks_to_swap"] = "lots"
    assert memory_problems(cfg, WAN)[0][0] == "memory.blocks_to_swap"


def test_attention_backends_checked_before_loading(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name))
    [(key, message)] = _problems("attention=flash")
    assert key == "memory.attention" and "flash_attn package" in message and "pip install flash-attn" in message
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "sageattention" else real(name))
    [(key, message)] = _problems("attention=sage")
    assert key == "memory.attention" and "inference only" in message
    assert _problems("sampling_attention=sage") == []  # sage for sampling while training with sdpa
    assert _problems("attention=sage", stages=("generate",)) == []


def test_validate_reports_memory_problems_with_the_rest(tmp_path):
    cfg = _compose(["+recipe=demo", f"paths.root={tmp_path}", "memory.fp8_scaled=true"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert ("memory.fp8_scaled" in str(e.value)) and "fp8_base" in str(e.value)


def _tiny_wan(layers=2):
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                           in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                           num_layers=layers, rope_max_seq_len=32).eval()


def test_split_attention_equals_batched_wan():
    model = _tiny_wan()
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(3, 16, 2, 8, 8, generator=g), "timestep": torch.tensor([100, 500, 900]),
              "encoder_hidden_states": torch.randn(3, 8, 32, generator=g)}
    with torch.no_grad():
        batched = model(**inputs, return_dict=False)[0]
        assert split_attention(model) == 4  # self- and cross-attention of 2 blocks
        assert split_attention(model) == 0  # idempotent
        split = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(split, batched, atol=1e-5, rtol=1e-5)


def test_split_attention_equals_batched_hunyuan_with_mask():
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=24, rope_axes_dim=(4, 6, 6), guidance_embeds=True).eval()
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0  # the second prompt is shorter: its padding must stay masked per sample
    inputs = {"hidden_states": torch.randn(2, 4, 1, 8, 8, generator=g), "timestep": torch.tensor([300, 700]),
              "encoder_hidden_states": torch.randn(2, 6, 32, generator=g), "encoder_attention_mask": mask,
              "pooled_projections": torch.randn(2, 24, generator=g), "guidance": torch.tensor([6000.0, 6000.0])}
    with torch.no_grad():
        batched = model(**inputs, return_dict=False)[0]
        assert split_attention(model) > 0
        split = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(split, batched, atol=1e-5, rtol=1e-5)


def test_sdpa_backend_changes_nothing():
    model = _tiny_wan()
    use_backend(model, "sdpa")
    assert all(getattr(getattr(m, "processor", None), "_attention_backend", None) is None for m in model.modules())


@pytest.fixture(scope="module")
def tiny_wan_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    paths = WAN.build_tiny(root, "tiny-t2v")
    return {"arch": "wan", "task": "tiny-t2v", **{k.removeprefix("model."): v for k, v in paths.items()}}


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_base_on_the_tiny_dit(tiny_wan_model, scaled):
    memory = _compose(["memory=none"])["memory"]
    plain = load_dit(WAN, tiny_wan_model, memory, "cpu", torch.bfloat16)
    memory.update(fp8_base=True, fp8_scaled=scaled)
    dit = load_dit(WAN, tiny_wan_model, memory, "cpu", torch.bfloat16)
    fp8 = {n for n, m in dit.named_modules() if isinstance(m, Fp8Linear)}
    linears = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    assert fp8 == {n for n in linears if n.startswith("blocks.")} and len(fp8) == 2 * 10
    for name, param in dit.named_parameters():  # modulation, norms, embeddings and head stay in bf16
        expected = torch.float8_e4m3fn if name.removesuffix(".weight") in fp8 else torch.bfloat16
        assert param.dtype == expected or param.dtype == torch.float32, name
    assert dit.blocks[0].scale_shift_table.dtype == plain.blocks[0].scale_shift_table.dtype
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 1, 8, 8, generator=g, dtype=torch.bfloat16)
    text = [{"embedding": torch.randn(5, 32, generator=g, dtype=torch.bfloat16)}]
    with torch.no_grad():
        want = WAN.predict(plain, x, torch.tensor([500.0]), text).float()
        got = WAN.predict(dit, x, torch.tensor([500.0]), text).float()
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.08


def test_backends_go_through_diffusers_dispatcher(monkeypatch):
    model = _tiny_wan()
    calls = []
    monkeypatch.setattr(model, "set_attention_backend", calls.append)
    for name in ("flash", "flash3", "sage", "xformers", "sdpa"):
        use_backend(model, name)
    assert calls == ["flash", "_flash_3", "sage", "xformers"]  # sdpa on a model without a backend: nothing to set


def test_training_and_sampling_pick_their_attention(monkeypatch, tiny_wan_model):
    import musubi_pipe.memory.attention as attention

    chosen = []
    monkeypatch.setattr(attention, "use_backend", lambda dit, name: chosen.append(name))
    memory = dict(_compose(["memory=none"])["memory"], attention="xformers", sampling_attention="sage")
    load_dit(WAN, tiny_wan_model, memory, "cpu", torch.float32, training=True)
    load_dit(WAN, tiny_wan_model, memory, "cpu", torch.float32)
    assert chosen == ["xformers", "sage"]


def test_hunyuan_fp8_layers_leave_modulation_alone():
    from musubi_pipe.memory.fp8 import quantize_linears

    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=24, rope_axes_dim=(4, 6, 6))
    include, exclude = HV.fp8_layers
    quantize_linears(model, include=include, exclude=exclude, scaled=True)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                 "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.proj_mlp",
                 "single_transformer_blocks.0.proj_out"):
        assert name in fp8, name
    # modulation (AdaLayerNormZero's linear), the token refiner and the embedders stay in the model's dtype
    assert not any("norm" in n or n.startswith(("context_embedder", "time_text_embed", "x_embedder")) for n in fp8)
    assert "transformer_blocks.0.norm1.linear" in dict(model.named_modules())


def test_before_quantize_sees_the_exact_weights(tiny_wan_model):
    """generate merges LoRAs in before_quantize: the merge must see the weights as loaded, and fp8 must
    then store the merged weights (merging into fp8 weights would ignore their scales)."""
    memory = dict(_compose(["memory=none"])["memory"], fp8_base=True, fp8_scaled=True)
    plain = load_dit(WAN, tiny_wan_model, _compose(["memory=none"])["memory"], "cpu", torch.bfloat16)
    base = plain.blocks[0].attn1.to_q.weight.float()
    delta = torch.linspace(-0.5, 0.5, base.numel()).reshape(base.shape)
    seen = []

    def merge(dit):
        weight = dit.blocks[0].attn1.to_q.weight
        seen.append(weight.dtype)
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))

    dit = load_dit(WAN, tiny_wan_model, memory, "cpu", torch.bfloat16, before_quantize=merge)
    layer = dit.blocks[0].attn1.to_q
    assert seen == [torch.bfloat16] and isinstance(layer, Fp8Linear)
    from musubi_pipe.memory.fp8 import dequantize_weight

    stored = dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
    merged = base + delta.to(torch.bfloat16).float()
    # within fp8's relative rounding (2^-4) of the merged weights, far from the unmerged ones
    assert ((stored - merged).abs() <= merged.abs() * 2**-4 + 1e-3).all()
    assert (stored - base).abs().max() > 0.4
