"""LoRA network and file format on a tiny diffusers Wan transformer: keys, init, save/load, merge, diffusers parity."""

from __future__ import annotations

import copy
import hashlib
import os

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from conftest import capture_diffusers_messages
from musubi_pipe.errors import UserError
from musubi_pipe.models.wan import names
from musubi_pipe.network import lora_file
from musubi_pipe.network.lora import LoRANetwork, lora_name, official_name
from musubi_pipe.network.lora_file import build_metadata, load_lora_file, save_lora_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

NUM_LAYERS = 2
BLOCK_MODULES = [
    "self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o",
    "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o",
    "ffn_0", "ffn_2",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_model() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=NUM_LAYERS,
        rope_max_seq_len=32,
    )
    return model.eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }


def targets_of(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        names.official_module_name(n): m
        for n, m in model.named_modules()
        if names.official_module_name(n) and isinstance(m, nn.Linear)
    }


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def randomize_up(network: LoRANetwork, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)


def trained_network(model: nn.Module, dim: int = 4, alpha: float = 2.0) -> LoRANetwork:
    torch.manual_seed(3)
    network = LoRANetwork(targets_of(model), network_dim=dim, network_alpha=alpha)
    randomize_up(network)
    return network


def test_state_dict_keys_shapes_and_alpha(base_model):
    model = copy.deepcopy(base_model)
    assert len(targets_of(model)) == 20
    network = LoRANetwork(targets_of(model), network_dim=4, network_alpha=2.0)
    sd = network.lora_state_dict()
    expected = {
        f"lora_unet_blocks_{i}_{m}.{s}"
        for i in range(NUM_LAYERS)
        for m in BLOCK_MODULES
        for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(sd) == expected and len(sd) == 60
    for official, linear in targets_of(model).items():
        stem = lora_name(official)
        assert sd[f"{stem}.lora_down.weight"].shape == (4, linear.in_features)
        assert sd[f"{stem}.lora_up.weight"].shape == (linear.out_features, 4)
        assert sd[f"{stem}.alpha"].shape == () and sd[f"{stem}.alpha"].item() == 2.0
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in sd.values())
    assert all(t.dtype == torch.bfloat16 for t in network.lora_state_dict(torch.bfloat16).values())


def test_zero_init_and_restore(base_model, inputs):
    model = copy.deepcopy(base_model)
    reference = run(model, inputs)
    base_keys = set(model.state_dict())
    network = LoRANetwork(targets_of(model), network_dim=4, network_alpha=1.0)
    network.apply_to()
    assert torch.equal(run(model, inputs), reference)
    assert set(model.state_dict()) == base_keys  # the base model's tree is untouched
    randomize_up(network)
    assert not torch.allclose(run(model, inputs), reference)
    network.restore()
    assert all("forward" not in m.__dict__ for m in targets_of(model).values())
    assert torch.equal(run(model, inputs), reference)
    network.apply_to()
    network.set_multiplier(0.0)
    assert torch.equal(run(model, inputs), reference)


def test_save_load_round_trip(base_model, inputs, tmp_path):
    model = copy.deepcopy(base_model)
    network = trained_network(model)
    network.apply_to()
    expected = run(model, inputs)

    path = tmp_path / "out" / "lora.safetensors"
    metadata = build_metadata(
        arch="wan",
        modelspec_arch="wan2.1",
        network_module="musubi_pipe.network.lora",
        network_dim=4,
        network_alpha=2.0,
        base_model="/models/wan2.1_t2v_1.3B_bf16.safetensors",
        steps=10,
        epoch=1,
        seed=42,
        learning_rate=1e-4,
        extra={"ss_training_fingerprint": "abc123"},
    )
    save_lora_file(path, network.lora_state_dict(), metadata)
    assert os.listdir(path.parent) == ["lora.safetensors"]  # no temp file left behind

    fresh = copy.deepcopy(base_model)
    loaded_network = LoRANetwork(targets_of(fresh), network_dim=4, network_alpha=7.0)
    tensors, meta = load_lora_file(path)
    loaded_network.load_lora_state_dict(tensors, source=str(path))
    loaded_network.apply_to()
    assert torch.equal(run(fresh, inputs), expected)  # alpha (and scale) came from the file, not the constructor

    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "wan" and meta["ss_sd_model_name"] == "wan2.1_t2v_1.3B_bf16.safetensors"
    assert meta["ss_steps"] == "10" and meta["ss_seed"] == "42" and meta["ss_training_fingerprint"] == "abc123"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"] == "wan2.1/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Wan-Video/Wan2.1"
    assert {"ss_training_finished_at", "modelspec.title", "modelspec.date"} <= set(meta)

    # Independent recomputation of sd-scripts' hash: tensors + ss_* metadata only, payload after the header.
    blob = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header_len :]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000 : 0x110000]).hexdigest()[:8]


def test_legacy_hash_reads_64k_at_1mib(tmp_path):
    tensors = {"w": torch.arange(600_000, dtype=torch.float32)}  # 2.4 MB: the 1 MiB offset lies inside the payload
    metadata = {"ss_network_dim": "4", "modelspec.title": "not hashed"}
    save_lora_file(tmp_path / "big.safetensors", tensors, metadata)
    _, meta = load_lora_file(tmp_path / "big.safetensors")
    blob = safetensors.torch.save(tensors, {"ss_network_dim": "4"})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert meta["modelspec.title"] == "not hashed"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, {"a": torch.zeros(2)}, {})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora_file.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora_file(path, {"a": torch.ones(2)}, {})
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    assert path.read_bytes() == before


def test_merge_matches_applied(base_model, inputs):
    model = copy.deepcopy(base_model)
    network = trained_network(model)
    network.apply_to()
    applied = run(model, inputs)
    network.merge_into_base(multiplier=1.0)
    assert all("forward" not in m.__dict__ for m in targets_of(model).values())
    torch.testing.assert_close(run(model, inputs), applied, rtol=0, atol=1e-5)


def test_diffusers_message_capture_sees_a_bad_load(base_model, tmp_path):
    # Guards the zero-unmatched-keys test below against passing because nothing was captured.
    network = trained_network(copy.deepcopy(base_model))
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, network.lora_state_dict(), {})
    converted = diffusers.WanPipeline.lora_state_dict(str(path))
    del converted["transformer.blocks.0.attn1.to_q.lora_B.weight"]
    model = copy.deepcopy(base_model)
    messages = capture_diffusers_messages(
        lambda: model.load_lora_adapter(converted, prefix="transformer", adapter_name="t")
    )
    assert [m for m in messages if "missing keys" in m], messages


@pytest.mark.parametrize("alpha", [2.0, 1.0, 8.0])
def test_diffusers_loads_with_zero_unmatched_keys_and_same_output(base_model, inputs, tmp_path, alpha):
    ours = copy.deepcopy(base_model)
    network = trained_network(ours, dim=4, alpha=alpha)
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, network.lora_state_dict(), {"ss_network_dim": "4"})
    network.apply_to()
    expected = run(ours, inputs)

    theirs = copy.deepcopy(base_model)
    converted = {}

    def load():
        converted.update(diffusers.WanPipeline.lora_state_dict(str(path)))
        theirs.load_lora_adapter(dict(converted), prefix="transformer", adapter_name="t")

    messages = capture_diffusers_messages(load)
    for bad in ("unexpected keys", "missing keys", "No LoRA keys associated", "inconsistency"):
        assert not [m for m in messages if bad in m], messages
    assert all(k.startswith("transformer.") and "lora" in k for k in converted)
    loaded = peft.utils.get_peft_model_state_dict(theirs, adapter_name="t")
    assert set(loaded) == {k.removeprefix("transformer.") for k in converted}
    assert len(loaded) == 40
    assert not torch.allclose(expected, run(base_model, inputs), atol=1e-3)  # the LoRA really changes the output
    torch.testing.assert_close(run(theirs, inputs), expected, rtol=0, atol=1e-5)


def test_strict_load_errors(base_model, tmp_path):
    network = LoRANetwork(targets_of(copy.deepcopy(base_model)), network_dim=4, network_alpha=2.0)
    good = network.lora_state_dict()
    key = "lora_unet_blocks_1_ffn_2.lora_up.weight"

    extra = {**good, "lora_unet_blocks_9_ffn_2.alpha": torch.tensor(1.0)}
    missing = {k: v for k, v in good.items() if k != key}
    wrong_shape = {**good, key: torch.zeros(good[key].shape[0], 8)}
    for sd, needle in ((extra, "lora_unet_blocks_9_ffn_2.alpha"), (missing, key), (wrong_shape, key)):
        path = tmp_path / "bad.safetensors"
        save_lora_file(path, sd, {})
        tensors, _ = load_lora_file(path)
        with pytest.raises(UserError, match=needle.replace(".", r"\.")) as info:
            network.load_lora_state_dict(tensors, source=str(path))
        assert str(path) in str(info.value)
    out_features = good[key].shape[0]
    assert f"[{out_features}, 4]" in str(info.value) and f"[{out_features}, 8]" in str(info.value)


def test_load_lora_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_lora_file(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(UserError, match="garbage.safetensors"):
        load_lora_file(garbage)


def test_names_follow_comfyui_kohya_rule(base_model):
    network = LoRANetwork(targets_of(copy.deepcopy(base_model)), network_dim=4, network_alpha=4.0)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in network.lora_state_dict()}
    officials = [names.official_module_name(n) for n, m in base_model.named_modules() if isinstance(m, nn.Linear)]
    officials = [o for o in officials if o]
    assert stems == {"lora_unet_" + o.replace(".", "_") for o in officials}
    for o in officials:
        assert official_name(lora_name(o), officials) == o  # `self_attn` keeps its underscore
    with pytest.raises(UserError, match="lora_unet_blocks_7_self_attn_q"):
        official_name("lora_unet_blocks_7_self_attn_q", officials)
