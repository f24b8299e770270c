"""Wan family: key maps, the tiny model builder, loaders for every supported file layout, and the
family methods the training loop uses (lora_targets, predict). CPU only, tiny weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from musubi_pipe.errors import ConfigError
from musubi_pipe.models import get_family
from musubi_pipe.models.wan import keymap, loading, tiny
from musubi_pipe.models.wan.tasks import TASKS, get_task

TINY = TASKS["tiny-t2v"]
FAMILY = get_family("wan")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    paths = tiny.build_tiny(root)
    paths["comfy"] = tiny.build_tiny(root, comfy_prefix=True)["dit"]
    diffusers_root = root / "diffusers"
    paths["diffusers"] = tiny.save_tiny_diffusers(diffusers_root)
    paths["pipeline_root"] = str(diffusers_root)
    return paths


def _cfg(built: dict, **overrides) -> dict:
    cfg = {"arch": "wan", "task": "tiny-t2v"}
    cfg.update({k: built[k] for k in ("dit", "vae", "t5", "t5_tokenizer")})
    cfg.update(overrides)
    return cfg


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- key maps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"image_dim": 24, "added_kv_proj_dim": 32}], ids=["t2v", "i2v"])
def test_dit_keymap_round_trip(extra):
    state = WanTransformer3DModel(**TINY.dit_config, **extra).state_dict()
    official = keymap.dit_to_official(state)
    assert "blocks.0.norm3.weight" in official and "head.modulation" in official
    _assert_same_state(keymap.dit_to_diffusers(official), state)


def test_dit_keymap_accepts_comfy_prefixes():
    state = WanTransformer3DModel(**TINY.dit_config).state_dict()
    official = keymap.dit_to_official(state)
    for prefix in keymap.OFFICIAL_PREFIXES:
        _assert_same_state(keymap.dit_to_diffusers({prefix + k: v for k, v in official.items()}), state)


def test_vae_keymap_round_trip():
    state = AutoencoderKLWan(**TINY.vae_config).state_dict()
    official = keymap.vae_to_official(state)
    assert "decoder.upsamples.4.shortcut.weight" in official and "encoder.downsamples.5.time_conv.bias" in official
    _assert_same_state(keymap.vae_to_diffusers(official), state)


def test_keymap_names_an_unknown_key():
    with pytest.raises(ValueError, match="blocks.0.mystery.weight"):
        keymap.dit_to_official({"blocks.0.mystery.weight": torch.zeros(1)})


# --- tiny model -----------------------------------------------------------------------------------


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_tiny_is_byte_deterministic(tmp_path):
    paths = tiny.build_tiny(tmp_path / "a")
    tiny.build_tiny(tmp_path / "b")
    assert set(paths) == {"dit", "vae", "t5", "t5_tokenizer"}
    assert _file_bytes(tmp_path / "a") == _file_bytes(tmp_path / "b")
    # up-to-date files are left alone
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    tiny.build_tiny(tmp_path / "a")
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_tiny_files_use_official_names(built):
    assert "head.modulation" in load_file(built["dit"])
    assert "model.diffusion_model.head.modulation" in load_file(built["comfy"])
    assert "decoder.middle.0.residual.0.gamma" in load_file(built["vae"])


# --- loaders --------------------------------------------------------------------------------------


def _write_shards(official_file: str, folder: Path) -> Path:
    state = load_file(official_file)
    keys = sorted(state)
    half = len(keys) // 2
    folder.mkdir()
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        save_file({k: state[k] for k in part}, folder / f"wan-{i:05d}-of-00002.safetensors")
    return folder / "wan-00002-of-00002.safetensors"


def _official_repo_folder(official_file: str, folder: Path) -> Path:
    """The layout of the Wan-AI/Wan2.1-T2V-* repos: official-key safetensors + a "WanModel" config.json."""
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "WanModel", "dim": 32}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(Path(official_file).read_bytes())
    return folder


def test_dit_loads_identically_from_every_layout(built, tmp_path):
    shard = _write_shards(built["dit"], tmp_path / "shards")
    pth = tmp_path / "wan_tiny_dit.pth"
    torch.save(load_file(built["dit"]), pth)
    repo = _official_repo_folder(built["dit"], tmp_path / "repo")
    sources = [built["comfy"], shard, pth, repo, built["diffusers"]["dit"], built["pipeline_root"]]
    reference = loading.load_dit(built["dit"], TINY, "cpu", torch.float32)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    for source in sources:
        _assert_same_state(loading.load_dit(source, TINY, "cpu", torch.float32).state_dict(), reference.state_dict())
    assert FAMILY.weight_files(_cfg(built, dit=str(shard)), "dit") == sorted(shard.parent.glob("*.safetensors"))


def test_missing_shard_is_named(built, tmp_path):
    shard = _write_shards(built["dit"], tmp_path / "shards")
    missing = shard.with_name("wan-00001-of-00002.safetensors")
    missing.unlink()
    with pytest.raises(ConfigError) as e:
        loading.load_dit(shard, TINY, "cpu", torch.float32)
    assert e.value.problems[0][0] == "model.dit" and str(missing) in e.value.problems[0][1]


def test_vae_loads_identically_from_file_and_folder(built, tmp_path):
    reference = loading.load_vae(built["vae"], TINY, "cpu", torch.float32).vae.state_dict()
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(load_file(built["vae"]), pth)
    for source in (pth, built["diffusers"]["vae"], built["pipeline_root"]):
        _assert_same_state(loading.load_vae(source, TINY, "cpu", torch.float32).vae.state_dict(), reference)


def test_vae_encode_decode_shapes(built):
    vae = FAMILY.load_vae(_cfg(built), "cpu", torch.float32)
    assert vae.latent_channels == 16 and vae.dtype == torch.float32
    pixels = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (1, 16, 2, 4, 4)
    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 5, 32, 32)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_text_encoder_trims_to_token_count(built):
    encoder = FAMILY.load_text_encoder(_cfg(built), "cpu", torch.float32)
    texts = ["a red ball moving on a white background", "cat", "zyxwv " * 40]
    embeds = encoder.encode(texts)
    counts = [min(len(encoder.tokenizer(t).input_ids), TINY.text_len) for t in texts]
    assert [e.shape for e in embeds] == [(n, 32) for n in counts]
    assert counts[2] == TINY.text_len  # truncated


def test_shape_mismatch_names_both_variants(built):
    with pytest.raises(ConfigError) as e:
        FAMILY.load_dit(_cfg(built, task="t2v-1.3B"), "cpu", torch.float32)
    key, message = e.value.problems[0]
    assert key == "model.dit"
    assert "tiny-t2v" in message and "t2v-1.3B" in message and "dim 128" in message and "dim 1536" in message
    with pytest.raises(ConfigError, match="t2v-14B"):
        loading.load_dit(built["diffusers"]["dit"], TASKS["t2v-14B"], "cpu", torch.float32)


def test_vae_of_another_task_is_a_config_error(built):
    with pytest.raises(ConfigError) as e:
        FAMILY.load_vae(_cfg(built, task="t2v-1.3B"), "cpu", torch.float32)
    key, message = e.value.problems[0]
    assert key == "model.vae" and "model.task=t2v-1.3B" in message and "tensors of other shapes" in message
    assert len(message) < 500


@pytest.mark.parametrize("key", ["dit", "vae", "t5", "t5_tokenizer"])
def test_missing_files_name_the_key(built, tmp_path, key):
    cfg = _cfg(built, **{key: str(tmp_path / "nowhere")})
    problems = FAMILY.check_config(cfg)
    assert [k for k, _ in problems] == [f"model.{key}"] and "does not exist" in problems[0][1]
    loader = {"dit": FAMILY.load_dit, "vae": FAMILY.load_vae}.get(key, FAMILY.load_text_encoder)
    with pytest.raises(ConfigError) as e:
        loader(cfg, "cpu", torch.float32)
    assert e.value.problems[0][0] == f"model.{key}"


def test_check_config_reports_unset_and_unknown(built):
    assert FAMILY.check_config(_cfg(built)) == []
    problems = dict(FAMILY.check_config(_cfg(built, task="t2v-99B", vae="???", t5=None)))
    assert set(problems) == {"model.task", "model.vae", "model.t5"}
    assert "tiny-t2v" in problems["model.task"] and "not set" in problems["model.vae"]
    with pytest.raises(ConfigError, match="model.task"):
        get_task("nope")


def test_weight_files_and_identity(built):
    cfg = _cfg(built)
    assert FAMILY.weight_files(cfg, "vae") == [Path(built["vae"])]
    text = FAMILY.weight_files(cfg, "text")
    assert Path(built["t5"], "model.safetensors") in text and Path(built["t5_tokenizer"], "tokenizer.json") in text
    assert FAMILY.encoder_identity(cfg, "text") == {"arch": "wan", "task": "tiny-t2v", "part": "text"}


# --- family methods used in training --------------------------------------------------------------


def test_lora_targets_use_official_names(built):
    targets = FAMILY.lora_targets(FAMILY.load_dit(_cfg(built), "cpu", torch.float32))
    kinds = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    assert set(targets) == {f"blocks.{i}.{kind}" for i in range(2) for kind in kinds}
    assert all(isinstance(m, torch.nn.Linear) for m in targets.values())


def test_predict_returns_latent_shape(built):
    dit = FAMILY.load_dit(_cfg(built), "cpu", torch.float32)
    latents = torch.randn(2, 16, 2, 4, 4)
    embeds = [torch.randn(5, 32), torch.randn(9, 32)]
    out = FAMILY.predict(dit, latents, torch.tensor([100.0, 900.0]), embeds)
    assert out.shape == latents.shape
    assert out.abs().mean() > 0  # proj_out is not zero-initialised


def test_family_import_does_not_import_torch():
    code = "import musubi_pipe.models.wan.family, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
