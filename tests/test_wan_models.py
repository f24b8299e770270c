"""Wan models: key maps, variant checks, the tiny model builder, the DiT/VAE loaders for every supported
file layout (official, ComfyUI incl. fp8, Wan-AI repos, diffusers folders and pipelines, both Wan2.2
experts), the VAE's conditioning inputs, and the family methods the training loop uses. CPU only, tiny
weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.wan import clip, keymap, loading, locate, tiny
from musubi_pipe.models.wan.tasks import TASKS, get_task

TINY = TASKS["tiny-t2v"]
ROOT = Path(__file__).parents[1]
EXPERT_KEYS = {"": "dit", "high_noise": "dit_high_noise", "low_noise": "dit"}


def _family():
    from musubi_pipe.models import get_family

    return get_family("wan")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Every tiny task under one root ({task name: paths}), plus tiny-t2v as diffusers folders."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {name: tiny.build_tiny(root, name) for name in tiny.TINY_TASKS}
    diffusers_root = root / "diffusers"
    paths["diffusers"] = tiny.save_tiny_diffusers(diffusers_root)
    paths["pipeline_root"] = str(diffusers_root)
    return paths


def _cfg(built: dict, files: str = "tiny-t2v", **overrides) -> dict:
    """The model config of tiny task `files` (its task and paths), with `overrides` (e.g. task=...)."""
    return {"arch": "wan", "task": files, **built[files], **overrides}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _problem(excinfo) -> tuple[str, str]:
    assert len(excinfo.value.problems) == 1
    return excinfo.value.problems[0]


def _load(path, task_name: str, expert: str = "", dtype=torch.float32):
    key = "model." + EXPERT_KEYS[expert]
    return loading.load_dit(path, TASKS[task_name], "cpu", dtype, key=key, expert=expert)


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


_VAE_KEYS = {
    # official names that pin the layouts: Wan2.1 flat lists; Wan2.2 per-level lists whose resampler
    # index follows the level's residual blocks (2 in the encoder, 3 in the decoder)
    "2.1": ["decoder.upsamples.4.shortcut.weight", "encoder.downsamples.5.time_conv.bias", "conv1.weight"],
    "2.2": ["encoder.downsamples.1.downsamples.0.shortcut.weight", "encoder.downsamples.1.downsamples.2.time_conv.weight",
            "encoder.downsamples.0.downsamples.2.resample.1.weight", "decoder.upsamples.0.upsamples.3.time_conv.weight",
            "decoder.upsamples.3.upsamples.2.residual.6.bias", "decoder.middle.1.to_qkv.weight", "conv2.weight"],
}


@pytest.mark.parametrize("task_name", ["tiny-t2v", "tiny-ti2v-5B"])
def test_vae_keymap_round_trip(task_name):
    task = TASKS[task_name]
    state = AutoencoderKLWan(**task.vae_config).state_dict()
    official = keymap.vae_to_official(state, task.vae_version)
    assert set(_VAE_KEYS[task.vae_version]) <= official.keys()
    _assert_same_state(keymap.vae_to_diffusers(official, task.vae_version), state)


def test_vae22_keymap_follows_the_model_structure():
    # one residual block per level: the resamplers move to index 1 (encoder) and 2 (decoder)
    config = {**TASKS["tiny-ti2v-5B"].vae_config, "num_res_blocks": 1}
    state = AutoencoderKLWan(**config).state_dict()
    official = keymap.vae_to_official(state, "2.2")
    assert "encoder.downsamples.1.downsamples.1.time_conv.weight" in official
    assert "decoder.upsamples.0.upsamples.2.resample.1.weight" in official
    assert not any(k.startswith("decoder.upsamples.3.upsamples.2.resample") for k in official)  # last level: none
    _assert_same_state(keymap.vae_to_diffusers(official, "2.2"), state)


def test_vae_keymap_rejects_wrong_layouts():
    task = TASKS["tiny-ti2v-5B"]
    official = keymap.vae_to_official(AutoencoderKLWan(**task.vae_config).state_dict(), "2.2")
    moved = {k.replace("encoder.downsamples.1.downsamples.2.", "encoder.downsamples.1.downsamples.5."): v
             for k, v in official.items()}
    with pytest.raises(ValueError, match=r"encoder\.downsamples\.1\.downsamples\.5\."):
        keymap.vae_to_diffusers(moved, "2.2")
    wan21 = keymap.vae_to_official(AutoencoderKLWan(**TINY.vae_config).state_dict(), "2.1")
    with pytest.raises(ValueError, match="Wan2.2"):
        keymap.vae_to_diffusers(wan21, "2.2")
    with pytest.raises(ValueError, match="version"):
        keymap.vae_to_official({}, "2.3")


def test_keymap_names_an_unknown_key():
    with pytest.raises(ValueError, match="blocks.0.mystery.weight"):
        keymap.dit_to_official({"blocks.0.mystery.weight": torch.zeros(1)})


# --- variant detection and checks -----------------------------------------------------------------


def test_dit_variants_from_signatures():
    def variants(name):
        return locate.dit_variants(TASKS[name].dit_signature())

    assert variants("t2v-14B") == variants("t2v-A14B") == ["t2v-14B", "t2v-A14B"]
    assert variants("t2v-1.3B") == ["t2v-1.3B"]
    # same shapes except the CLIP projection: Wan2.1 I2V has img_emb, Wan2.2 I2V-A14B does not
    assert variants("i2v-14B") == ["i2v-14B"] and variants("i2v-A14B") == ["i2v-A14B"]
    assert variants("ti2v-5B") == ["ti2v-5B"]
    assert variants("tiny-t2v") == ["tiny-t2v", "tiny-t2v-A14B"]


def test_dit_signature_read_from_official_shapes():
    state = WanTransformer3DModel(**TASKS["tiny-i2v"].dit_config).state_dict()
    shapes = {k: tuple(v.shape) for k, v in keymap.dit_to_official(state).items()}
    assert locate.dit_signature_from_shapes(shapes) == TASKS["tiny-i2v"].dit_signature()
    no_clip = {k: s for k, s in shapes.items() if not k.startswith("img_emb.")}
    assert locate.dit_signature_from_shapes(no_clip) == TASKS["tiny-i2v-A14B"].dit_signature()
    assert locate.dit_signature_from_shapes({"encoder.conv1.weight": (8, 3, 3, 3, 3)}) is None


def _signature_message(found: str, task: str) -> str:
    with pytest.raises(ConfigError) as e:
        locate.check_dit_signature(TASKS[found].dit_signature(), TASKS[task], Path("/m/x.safetensors"), "model.dit")
    key, message = _problem(e)
    assert key == "model.dit" and "/m/x.safetensors" in message
    return message


def test_dit_mismatch_messages_name_the_variants():
    message = _signature_message("t2v-14B", "t2v-1.3B")
    assert "a DiT of t2v-14B or t2v-A14B (dim 5120, 40 layers" in message
    assert "model.task=t2v-1.3B needs dim 1536, 30 layers" in message
    assert "set model.task to one of t2v-14B, t2v-A14B" in message
    message = _signature_message("t2v-1.3B", "t2v-A14B")
    assert "a DiT of t2v-1.3B (dim 1536" in message and "needs dim 5120" in message
    message = _signature_message("i2v-14B", "i2v-A14B")
    assert "a DiT of i2v-14B" in message and "has img_emb" in message and "set model.task=i2v-14B" in message
    message = _signature_message("i2v-A14B", "i2v-14B")
    assert "a DiT of i2v-A14B" in message and "has no img_emb" in message and "CLIP image_dim 1280" in message
    assert "a DiT of ti2v-5B (dim 3072" in _signature_message("ti2v-5B", "t2v-A14B")


def test_check_dit_on_files_of_other_tasks(built):
    i2v_dit = built["tiny-i2v"]["dit"]
    for check in (lambda: locate.check_dit(i2v_dit, TASKS["tiny-i2v-A14B"], "model.dit", "low_noise"),
                  lambda: _load(i2v_dit, "tiny-i2v-A14B", "low_noise")):
        with pytest.raises(ConfigError) as e:
            check()
        key, message = _problem(e)
        assert key == "model.dit" and i2v_dit in message and "a DiT of tiny-i2v " in message and "has img_emb" in message
    expert = built["tiny-i2v-A14B"]["dit_high_noise"]
    with pytest.raises(ConfigError) as e:
        locate.check_dit(expert, TASKS["tiny-i2v"])
    assert "a DiT of tiny-i2v-A14B" in _problem(e)[1] and "has no img_emb" in _problem(e)[1]
    with pytest.raises(ConfigError) as e:  # a diffusers folder is checked from its config.json
        locate.check_dit(built["pipeline_root"], TASKS["t2v-14B"])
    assert "a DiT of tiny-t2v or tiny-t2v-A14B (dim 128" in _problem(e)[1]
    with pytest.raises(ConfigError, match="is not a Wan DiT"):
        locate.check_dit(built["tiny-t2v"]["vae"], TINY)


def test_check_vae_versions_both_ways(built):
    wan22 = built["tiny-ti2v-5B"]["vae"]  # a pipeline root: checked from vae/config.json
    with pytest.raises(ConfigError) as e:
        locate.check_vae(wan22, TINY)
    key, message = _problem(e)
    assert key == "model.vae" and "is the Wan2.2 VAE (48 latent channels) but model.task=tiny-t2v needs the Wan2.1 VAE" in message
    assert "Wan2.1_VAE.pth / wan_2.1_vae.safetensors" in message
    wan21 = built["tiny-t2v"]["vae"]
    with pytest.raises(ConfigError) as e:
        locate.check_vae(wan21, TASKS["tiny-ti2v-5B"])
    key, message = _problem(e)
    assert key == "model.vae" and wan21 in message
    assert "is the Wan2.1 VAE (16 latent channels) but model.task=tiny-ti2v-5B needs the Wan2.2 VAE (Wan2.2_VAE.pth" in message
    # a .pth is not read here; the loader reports the same
    pth = built["tiny-i2v-A14B"]["vae"]
    assert locate.check_vae(pth, TASKS["tiny-ti2v-5B"]).path == Path(pth)
    with pytest.raises(ConfigError, match="is the Wan2.1 VAE .16 latent channels. but model.task=tiny-ti2v-5B"):
        loading.load_vae(pth, TASKS["tiny-ti2v-5B"], "cpu", torch.float32)
    with pytest.raises(ConfigError, match="is the Wan2.2 VAE .48 latent channels. but model.task=tiny-t2v"):
        loading.load_vae(wan22, TINY, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="is not a Wan VAE"):
        locate.check_vae(built["tiny-t2v"]["dit"], TINY)
    # the real-size message
    with pytest.raises(ConfigError) as e:
        locate.check_vae_variant({"z_dim": 48, "base_dim": 160}, TASKS["t2v-14B"], Path("X"), "model.vae")
    assert _problem(e)[1] == ("X is the Wan2.2 VAE (48 latent channels) but model.task=t2v-14B needs the Wan2.1 VAE "
                              "(Wan2.1_VAE.pth / wan_2.1_vae.safetensors); point model.vae at it")


def test_vae_of_another_width_is_a_config_error(built):
    with pytest.raises(ConfigError) as e:
        _family().load_vae(_cfg(built, task="t2v-1.3B"), "cpu", torch.float32)
    key, message = _problem(e)
    assert key == "model.vae" and "model.task=t2v-1.3B" in message and "8 channels wide (a tiny test VAE)" in message
    assert len(message) < 500


def test_checks_do_not_import_torch(built):
    """check_dit/check_vae run in config validation: torch-free, with the key in every message."""
    code = f"""
import json, sys
from musubi_pipe.errors import ConfigError
from musubi_pipe.models.wan.locate import check_dit, check_vae
from musubi_pipe.models.wan.tasks import TASKS
built = json.loads(sys.argv[1])
for name in {list(tiny.TINY_TASKS)!r}:
    task, paths = TASKS[name], built[name]
    for expert in task.experts:
        key = "dit_high_noise" if expert == "high_noise" else "dit"
        check_dit(paths[key], task, "model." + key, expert)
    check_vae(paths["vae"], task)
messages = []
for check in (lambda: check_dit(built["tiny-t2v"]["dit"], TASKS["t2v-1.3B"]),
              lambda: check_dit(built["tiny-t2v-A14B"]["dit_high_noise"], TASKS["tiny-i2v-A14B"], "model.dit_high_noise", "high_noise"),
              lambda: check_vae(built["tiny-ti2v-5B"]["vae"], TASKS["tiny-t2v"])):
    try:
        check()
    except ConfigError as e:
        messages += e.problems
assert "torch" not in sys.modules, "torch was imported"
print(json.dumps(messages))
"""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(built)], check=True, cwd=ROOT, capture_output=True,
                         text=True).stdout
    problems = json.loads(out)
    assert [k for k, _ in problems] == ["model.dit", "model.dit_high_noise", "model.vae"]
    assert "a DiT of tiny-t2v or tiny-t2v-A14B" in problems[0][1] and "model.task=t2v-1.3B" in problems[0][1]
    assert "in_channels 16" in problems[1][1] and "in_channels 36" in problems[1][1]
    assert "Wan2.2 VAE (48 latent channels)" in problems[2][1]


# --- tiny models ----------------------------------------------------------------------------------


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


_TINY_KEYS = {
    "tiny-t2v": {"dit", "vae", "t5", "t5_tokenizer"},
    "tiny-i2v": {"dit", "vae", "t5", "t5_tokenizer", "clip"},
    "tiny-t2v-A14B": {"dit", "dit_high_noise", "vae", "t5", "t5_tokenizer"},
    "tiny-i2v-A14B": {"dit", "dit_high_noise", "vae", "t5", "t5_tokenizer"},
    "tiny-ti2v-5B": {"dit", "vae", "t5", "t5_tokenizer"},
}


def test_tiny_builds_are_byte_deterministic(tmp_path):
    for name in tiny.TINY_TASKS:
        paths = tiny.build_tiny(tmp_path / "a", name)
        assert set(paths) == _TINY_KEYS[name] and all(Path(p).exists() for p in paths.values())
        tiny.build_tiny(tmp_path / "b", name)
    assert _file_bytes(tmp_path / "a") == _file_bytes(tmp_path / "b")
    assert not list((tmp_path / "a").rglob("*.tmp"))
    # up-to-date files are left alone
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    for name in tiny.TINY_TASKS:
        tiny.build_tiny(tmp_path / "a", name)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def _header(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_tiny_files_use_the_formats_users_download(built):
    t2v = built["tiny-t2v"]
    assert "head.modulation" in load_file(t2v["dit"])
    assert "decoder.middle.0.residual.0.gamma" in load_file(t2v["vae"])
    assert "token_embedding.weight" in torch.load(t2v["t5"], weights_only=True)
    i2v = built["tiny-i2v"]
    assert {"img_emb.proj.0.weight", "blocks.0.cross_attn.k_img.weight"} <= load_file(i2v["dit"]).keys()
    assert "visual.patch_embedding.weight" in torch.load(i2v["clip"], weights_only=True)
    comfy = built["tiny-t2v-A14B"]
    assert Path(comfy["dit"]).name.endswith("_fp8_e4m3fn.safetensors")
    high, low, t5 = _header(comfy["dit_high_noise"]), _header(comfy["dit"]), _header(comfy["t5"])
    assert "model.diffusion_model.head.modulation" in high and set(high.values()) == {"F16"}
    assert low["model.diffusion_model.blocks.0.self_attn.q.weight"] == "F8_E4M3"
    assert low["model.diffusion_model.blocks.0.self_attn.q.bias"] == "F16"
    assert "shared.weight" in t5 and set(t5.values()) == {"F16"}
    repo = Path(built["tiny-i2v-A14B"]["dit"]).parent
    for expert in ("high_noise_model", "low_noise_model"):
        assert json.loads((repo / expert / "config.json").read_text())["_class_name"] == "WanModel"
        assert len(list((repo / expert).glob("diffusion_pytorch_model-0000?-of-00002.safetensors"))) == 2
    assert "decoder.middle.0.residual.0.gamma" in torch.load(built["tiny-i2v-A14B"]["vae"], weights_only=True)
    pipeline = Path(built["tiny-ti2v-5B"]["dit"])
    assert all((pipeline / part / "config.json").is_file() for part in ("transformer", "vae", "text_encoder"))
    assert (pipeline / "tokenizer" / "tokenizer.json").is_file()


def test_every_tiny_dit_loads_with_its_task(built):
    for name in tiny.TINY_TASKS:
        task = TASKS[name]
        states = []
        for expert in task.experts:
            dit = _load(built[name][EXPERT_KEYS[expert]], name, expert)
            assert dit._wan_task is task and not dit.training
            assert not any(p.requires_grad for p in dit.parameters())
            states.append(dit.state_dict())
        if len(states) == 2:  # the experts are different models
            assert not torch.equal(states[0]["proj_out.weight"], states[1]["proj_out.weight"])


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
    (folder / "config.json").write_text('{"_class_name": "WanModel", "dim": 128}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(Path(official_file).read_bytes())
    return folder


def test_dit_loads_identically_from_every_layout(built, tmp_path):
    official = built["tiny-t2v"]["dit"]
    state = load_file(official)
    sources = [_write_shards(official, tmp_path / "shards"), _official_repo_folder(official, tmp_path / "repo"),
               built["diffusers"]["dit"], built["pipeline_root"]]
    for i, prefix in enumerate(keymap.OFFICIAL_PREFIXES):
        comfy = tmp_path / f"comfy{i}.safetensors"
        save_file({prefix + k: v for k, v in state.items()}, comfy)
        sources.append(comfy)
    torch.save(state, tmp_path / "wan_tiny_dit.pth")
    sources.append(tmp_path / "wan_tiny_dit.pth")
    reference = loading.load_dit(official, TINY, "cpu", torch.float32)
    for source in sources:
        _assert_same_state(loading.load_dit(source, TINY, "cpu", torch.float32).state_dict(), reference.state_dict())
    assert _family().weight_files(_cfg(built, dit=str(sources[0])), "dit") == sorted(sources[0].parent.glob("*.safetensors"))


def test_missing_shard_is_named(built, tmp_path):
    shard = _write_shards(built["tiny-t2v"]["dit"], tmp_path / "shards")
    missing = shard.with_name("wan-00001-of-00002.safetensors")
    missing.unlink()
    with pytest.raises(ConfigError) as e:
        loading.load_dit(shard, TINY, "cpu", torch.float32)
    assert e.value.problems[0][0] == "model.dit" and str(missing) in e.value.problems[0][1]


def test_fp8_expert_loads_upcast(built):
    paths = built["tiny-t2v-A14B"]
    file_state = load_file(paths["dit"])
    assert any(v.dtype == torch.float8_e4m3fn for v in file_state.values())
    upcast = keymap.dit_to_diffusers({k: v.float() for k, v in file_state.items()})
    _assert_same_state(_load(paths["dit"], "tiny-t2v-A14B", "low_noise").state_dict(), upcast)
    bf16 = _load(paths["dit"], "tiny-t2v-A14B", "low_noise", dtype=torch.bfloat16)
    assert bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules
    assert torch.equal(bf16.blocks[0].attn1.to_q.weight.float(), upcast["blocks.0.attn1.to_q.weight"])


@pytest.mark.parametrize("marker", ["scaled_fp8", "blocks.0.self_attn.q.scale_weight"])
def test_fp8_scaled_is_rejected(built, tmp_path, marker):
    state = load_file(built["tiny-t2v-A14B"]["dit"])
    state["model.diffusion_model." + marker] = torch.ones(1)
    path = tmp_path / "wan2.2_t2v_low_noise_tiny_fp8_scaled.safetensors"
    save_file(state, path)
    task = TASKS["tiny-t2v-A14B"]
    for check in (lambda: locate.check_dit(path, task, "model.dit", "low_noise"),
                  lambda: _load(path, "tiny-t2v-A14B", "low_noise")):
        with pytest.raises(ConfigError) as e:
            check()
        key, message = _problem(e)
        assert key == "model.dit" and str(path) in message and "fp8_scaled" in message and "fp8_e4m3fn" in message


def test_pipeline_root_picks_transformer_per_expert(built, tmp_path):
    """A Wan2.2 A14B diffusers pipeline: transformer/ = high-noise expert, transformer_2/ = low-noise."""
    paths = built["tiny-t2v-A14B"]
    high, low = _load(paths["dit_high_noise"], "tiny-t2v-A14B", "high_noise"), _load(paths["dit"], "tiny-t2v-A14B", "low_noise")
    high.save_pretrained(tmp_path / "transformer")
    low.save_pretrained(tmp_path / "transformer_2")
    for expert, reference in (("high_noise", high), ("low_noise", low), ("", high)):
        task = "tiny-t2v-A14B" if expert else "tiny-t2v"
        _assert_same_state(_load(tmp_path, task, expert).state_dict(), reference.state_dict())
    # a single-DiT pipeline has no low-noise expert
    with pytest.raises(ConfigError) as e:
        _load(built["pipeline_root"], "tiny-t2v-A14B", "low_noise")
    assert _problem(e)[0] == "model.dit" and "transformer_2/" in _problem(e)[1] and "low-noise" in _problem(e)[1]


def test_official_repo_root_picks_expert_folder(built):
    paths = built["tiny-i2v-A14B"]
    repo = Path(paths["dit"]).parent
    for expert, folder in (("high_noise", paths["dit_high_noise"]), ("low_noise", paths["dit"])):
        _assert_same_state(_load(repo, "tiny-i2v-A14B", expert).state_dict(),
                           _load(folder, "tiny-i2v-A14B", expert).state_dict())
        assert locate.locate_dit(repo, expert=expert).path == Path(folder)
    with pytest.raises(ConfigError) as e:
        locate.locate_dit(repo, "model.dit")
    assert "high_noise_model/ and low_noise_model/" in _problem(e)[1]
    # the VAE is found at the repo root too
    assert locate.locate_vae(repo).path == Path(paths["vae"])


def test_vae_loads_identically_from_file_and_folder(built, tmp_path):
    wan21 = built["tiny-t2v"]["vae"]
    reference = loading.load_vae(wan21, TINY, "cpu", torch.float32).vae.state_dict()
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(load_file(wan21), pth)
    for source in (pth, built["diffusers"]["vae"], built["pipeline_root"]):
        _assert_same_state(loading.load_vae(source, TINY, "cpu", torch.float32).vae.state_dict(), reference)
    # Wan2.2: the diffusers folder vs the official Wan2.2_VAE.pth / .safetensors written with our key map
    task = TASKS["tiny-ti2v-5B"]
    reference = loading.load_vae(built["tiny-ti2v-5B"]["vae"], task, "cpu", torch.float32).vae.state_dict()
    official = keymap.vae_to_official(reference, "2.2")
    torch.save(official, tmp_path / "Wan2.2_VAE.pth")
    save_file(official, tmp_path / "wan2.2_vae.safetensors")
    for source in (tmp_path / "Wan2.2_VAE.pth", tmp_path / "wan2.2_vae.safetensors"):
        _assert_same_state(loading.load_vae(source, task, "cpu", torch.float32).vae.state_dict(), reference)


@pytest.mark.parametrize("task_name,channels,stride", [("tiny-t2v", 16, 8), ("tiny-ti2v-5B", 48, 16)])
def test_vae_encode_decode_shapes(built, task_name, channels, stride):
    vae = loading.load_vae(built[task_name]["vae"], TASKS[task_name], "cpu", torch.float32)
    assert vae.latent_channels == channels and vae.dtype == torch.float32
    pixels = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (1, channels, 2, 32 // stride, 32 // stride)
    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 5, 32, 32)
    assert decoded.min() >= -1 and decoded.max() <= 1


# --- conditioning inputs --------------------------------------------------------------------------


def _diffusers_image_condition(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """[mask, first-frame latents] exactly as diffusers' WanImageToVideoPipeline.prepare_latents builds them."""
    pipe = SimpleNamespace(vae=vae.vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                           config=SimpleNamespace(expand_timesteps=False))
    _, height, width = image.shape[1:]
    return WanImageToVideoPipeline.prepare_latents(pipe, image, 1, 16, height, width, frames, torch.float32, "cpu")[1]


def _vae_for(built, task_name):
    task = TASKS[task_name]
    encoder = clip.load_clip(built[task_name]["clip"], task, "cpu", torch.float32) if task.clip_config else None
    return loading.load_vae(built[task_name]["vae"], task, "cpu", torch.float32, clip=encoder)


@pytest.mark.parametrize("task_name", ["tiny-t2v", "tiny-i2v", "tiny-i2v-A14B", "tiny-ti2v-5B"])
def test_encode_item_and_condition(built, task_name):
    task = TASKS[task_name]
    vae = _vae_for(built, task_name)
    c, s = task.latent_channels, task.vae_stride[1]
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    item = vae.encode_item(video)
    expected = {"latents": (1, c, 3, 32 // s, 48 // s)}
    if task.conditioning == "image":
        expected["latents_image"] = (1, 20, 3, 4, 6)
    if task.clip_config:
        expected["clip"] = (1, 5, 32)  # (28 / 14)^2 + 1 tokens of the tiny CLIP
    assert {k: tuple(v.shape) for k, v in item.items()} == expected
    assert all(v.dtype == torch.float32 for v in item.values())
    torch.testing.assert_close(item["latents"], vae.encode(video))
    condition = vae.encode_condition(video[:, :, :1], 13)
    if task.conditioning == "image":
        mask = item["latents_image"][:, :4]
        assert (mask[:, :, 0] == 1).all() and (mask[:, :, 1:] == 0).all()
        torch.testing.assert_close(item["latents_image"], _diffusers_image_condition(vae, video[:, :, 0], 9))
        assert condition["latents_image"].shape == (1, 20, 4, 4, 6)
        torch.testing.assert_close(condition["latents_image"], _diffusers_image_condition(vae, video[:, :, 0], 13))
        if task.clip_config:
            torch.testing.assert_close(item["clip"], vae.clip.encode(video[:, :, 0]))
            torch.testing.assert_close(condition["clip"], item["clip"])
        assert set(condition) == ({"latents_image", "clip"} if task.clip_config else {"latents_image"})
    elif task.conditioning == "first_frame":
        assert set(condition) == {"first_frame"} and condition["first_frame"].shape == (1, c, 1, 2, 3)
        torch.testing.assert_close(condition["first_frame"], vae.encode(video[:, :, :1]))
    else:
        assert condition == {}


def test_encode_item_of_an_image(built):
    vae = _vae_for(built, "tiny-i2v")
    item = vae.encode_item(torch.zeros(1, 3, 1, 32, 32))
    assert item["latents"].shape == (1, 16, 1, 4, 4) and item["latents_image"].shape == (1, 20, 1, 4, 4)
    assert (item["latents_image"][:, :4] == 1).all()


# --- family methods -------------------------------------------------------------------------------


def test_check_config_accepts_every_tiny_task(built):
    for name in tiny.TINY_TASKS:
        assert _family().check_config(_cfg(built, name)) == [], name


def test_shape_mismatch_names_both_variants(built):
    with pytest.raises(ConfigError) as e:
        _family().load_dit(_cfg(built, task="t2v-1.3B"), "cpu", torch.float32)
    key, message = _problem(e)
    assert key == "model.dit"
    assert "tiny-t2v" in message and "t2v-1.3B" in message and "dim 128" in message and "dim 1536" in message
    with pytest.raises(ConfigError, match="t2v-14B"):
        loading.load_dit(built["diffusers"]["dit"], TASKS["t2v-14B"], "cpu", torch.float32)


@pytest.mark.parametrize("key", ["dit", "vae", "t5", "t5_tokenizer"])
def test_missing_files_name_the_key(built, tmp_path, key):
    family = _family()
    cfg = _cfg(built, **{key: str(tmp_path / "nowhere")})
    problems = family.check_config(cfg)
    assert [k for k, _ in problems] == [f"model.{key}"] and "does not exist" in problems[0][1]
    loader = {"dit": family.load_dit, "vae": family.load_vae}.get(key, family.load_text_encoder)
    with pytest.raises(ConfigError) as e:
        loader(cfg, "cpu", torch.float32)
    assert e.value.problems[0][0] == f"model.{key}"


def test_check_config_reports_unset_and_unknown(built):
    family = _family()
    problems = dict(family.check_config(_cfg(built, task="t2v-99B")))
    assert set(problems) == {"model.task"} and "'tiny-t2v'" in problems["model.task"]
    problems = dict(family.check_config(_cfg(built, vae="???", t5=None)))
    assert set(problems) == {"model.vae", "model.t5"} and "not set" in problems["model.vae"]
    with pytest.raises(ConfigError, match="model.task"):
        get_task("nope")


def test_text_encoder_trims_to_token_count(built):
    encoder = _family().load_text_encoder(_cfg(built), "cpu", torch.float32)
    texts = ["a red ball moving on a white background", "cat", "zyxwv " * 600]
    embeds = encoder.encode(texts)
    counts = [min(len(encoder.tokenizer(t).input_ids), TINY.text_len) for t in texts]
    assert [e["embedding"].shape for e in embeds] == [(n, 32) for n in counts]
    assert counts[2] == TINY.text_len  # truncated


def test_weight_files(built):
    family, cfg = _family(), _cfg(built)
    assert family.weight_files(cfg, "vae") == [Path(built["tiny-t2v"]["vae"])]
    text = family.weight_files(cfg, "text")
    assert Path(built["tiny-t2v"]["t5"]) in text and Path(built["tiny-t2v"]["t5_tokenizer"], "tokenizer.json") in text
    a14b = _cfg(built, "tiny-t2v-A14B")
    assert family.weight_files(a14b, "dit", "high_noise") == [Path(built["tiny-t2v-A14B"]["dit_high_noise"])]
    assert family.weight_files(a14b, "dit", "low_noise") == [Path(built["tiny-t2v-A14B"]["dit"])]


def test_lora_targets_use_official_names(built):
    family = _family()
    targets = family.lora_targets(family.load_dit(_cfg(built), "cpu", torch.float32))
    kinds = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    assert set(targets) == {f"blocks.{i}.{kind}" for i in range(2) for kind in kinds}
    assert all(isinstance(m, torch.nn.Linear) for m in targets.values())


def test_predict_returns_latent_shape(built):
    family = _family()
    dit = family.load_dit(_cfg(built), "cpu", torch.float32)
    latents = torch.randn(2, 16, 2, 4, 4)
    embeds = [{"embedding": torch.randn(5, 32)}, {"embedding": torch.randn(9, 32)}]
    out = family.predict(dit, latents, torch.tensor([100.0, 900.0]), embeds)
    assert out.shape == latents.shape
    assert out.abs().mean() > 0  # proj_out is not zero-initialised


def test_family_import_does_not_import_torch():
    code = "import musubi_pipe.models.wan.family, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
