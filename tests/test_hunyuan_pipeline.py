"""HunyuanVideo through the real pipeline on the tiny model written in the official formats: cache, train and
sample; LoRA files in the default and diffusers layouts; SkyReels V1 I2V inference with CFG and its negative
prompt; video-to-video strength; embedded guidance; the errors that come before anything loads."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.models import get_family
from musubi_pipe.models.hunyuan_video.tasks import SKYREELS_NEGATIVE
from tests.conftest import stage

pytestmark = pytest.mark.pipeline
_count = itertools.count()
GENERATE = ["pipeline.stages=[generate]", "dataset.datasets=[]", "sampling.steps=3"]


@pytest.fixture
def hv(tmp_path, models_dir):
    from musubi_pipe.config import compose
    from musubi_pipe.runner import run

    base = ["+recipe=hunyuan_video_tiny", f"paths.root={tmp_path}", f"paths.models={models_dir}",
            "training.max_train_steps=6", "training.save_every_n_steps=3", "sampling.steps=3",
            "runtime.progress=false"]

    def run_hv(*overrides):
        return run(compose(base + list(overrides)), tmp_path / "runs" / f"run{next(_count)}")

    return run_hv


def _media(folder: Path) -> tuple[Path, Path]:
    """A 9-frame 64x64 video and a 64x64 image, written through the real media writers."""
    import numpy as np

    from musubi_pipe.data.media import write_mp4, write_png

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    frames = np.stack([np.stack([np.roll(ramp, 7 * i)[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1),
                                 np.full((64, 64), 40 * (i % 3), np.uint8)], axis=-1) for i in range(9)])
    write_mp4(folder / "clip.mp4", frames, 24)
    write_png(folder / "start.png", frames[0])
    return folder / "clip.mp4", folder / "start.png"


def _latents(record, name="sample", index=0):
    return load_file(str(Path(stage(record, name)["artifact"]) / f"sample_{index:02d}.safetensors"))["latents"]


def _modules(lora) -> set[str]:
    return {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in load_file(str(lora)) if ".lora_" in k}


def test_cache_train_sample_and_the_lora_file(hv, caplog):
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        record = hv()
    assert [s["status"] for s in record["stages"]][:4] == ["ran", "ran", "ran", "ran"]
    lora = Path(record["lora"][0])
    with safe_open(str(lora), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    # the default layout: official names under diffusion_model., lora_down/lora_up + alpha (ComfyUI, musubi-tuner)
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight" in keys
    assert "diffusion_model.single_blocks.1.linear1.alpha" in keys
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert metadata["ss_base_model_version"] == "hunyuan_video"
    assert metadata["modelspec.architecture"] == "hunyuan-video/lora"
    assert metadata["ss_lora_format"] == "official"
    tensors = load_file(str(lora))
    assert tensors["diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight"].shape == (3 * 64, 32)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))  # it trained
    # musubi-tuner's default targets: no modulation (networks/lora.py excludes .*(img_mod|txt_mod|modulation).*)
    modules = _modules(lora)
    assert len(modules) == 20 and not [m for m in modules if "mod" in m]
    # the default layout is ComfyUI's; musubi-tuner reads none of it, and training says so with the command
    [warning] = [r.getMessage() for r in caplog.records if "unapplied" in r.getMessage()]
    assert warning.startswith("train: musubi-tuner leaves 20 of the 20 modules of hunyuan_video_tiny_lora.safetensors unapplied")
    assert "tools convert hunyuan_video_tiny_lora.safetensors hunyuan_video_tiny_lora_musubi.safetensors --to musubi" in warning
    assert sorted(Path(p).name for p in record["samples"]) == ["sample_00.png", "sample_01.mp4"]
    # each text entry holds both encoders' outputs: the LLM's hidden states (real tokens) and CLIP's pooled output
    import json

    text_dir = Path(stage(record, "cache_text")["artifact"])
    key = json.loads((text_dir / "index.json").read_text())["a red circle on a white background"]
    entry = load_file(str(text_dir.parents[1] / "items" / "text" / key[:2] / f"{key}.safetensors"))
    assert set(entry) == {"llm", "clip_pooled"}
    assert entry["llm"].shape[1] == 32 and 1 < entry["llm"].shape[0] < 20 and entry["clip_pooled"].shape == (24,)

    again = hv()
    assert {s["name"]: s["status"] for s in again["stages"]}["train"] == "cached"


def test_modulation_is_re_admitted_and_an_earlier_file_names_the_pattern(hv, caplog):
    with_mod = hv(r"network.include_patterns=['.*(img_mod|txt_mod|modulation).*']", "pipeline.stages=[cache_latents,cache_text,train]")
    modules = _modules(with_mod["lora"][0])
    assert len(modules) == 26 and "double_blocks.1.txt_mod.linear" in modules
    # a file with the modulation (what this project trained before) cannot start the default network
    with pytest.raises(UserError, match="left out by the network's exclude patterns") as info:
        hv(f"network.network_weights={with_mod['lora'][0]}", "pipeline.stages=[cache_latents,cache_text,train]")
    include = re.search(r"network\.include_patterns: \['(.+)'\]", str(info.value)).group(1).replace("\\\\", "\\")
    resumed = hv(f"network.network_weights={with_mod['lora'][0]}", f"network.include_patterns=['{include}']",
                 "pipeline.stages=[cache_latents,cache_text,train]")  # the pattern the error gives is the fix
    assert _modules(resumed["lora"][0]) == modules
    # the musubi layout: ComfyUI leaves the MLPs out, and training says which
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        hv("network.save_format=musubi", "pipeline.stages=[cache_latents,cache_text,train]")
    [warning] = [r.getMessage() for r in caplog.records if "unapplied" in r.getMessage()]
    assert "ComfyUI leaves 8 of the 20 modules" in warning and "--to official" in warning


def test_diffusers_save_format_and_loading_it_back_for_sampling(hv):
    default = hv()
    diffusers_run = hv("network.save_format=diffusers")
    lora = Path(diffusers_run["lora"][0])
    keys = set(load_file(str(lora)))
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert not [k for k in keys if k.endswith(".alpha")]
    # the same training in another layout samples the same latents (the sample stage reads any layout)
    torch.testing.assert_close(_latents(diffusers_run), _latents(default), rtol=1e-4, atol=1e-5)


def test_generate_with_the_trained_lora_matches_sample(hv):
    trained = hv()
    lora = trained["lora"][0]
    out = hv(*GENERATE, f"sampling.loras=[{{path:'{lora}'}}]", "sampling.output_type=both")
    torch.testing.assert_close(_latents(out, "generate"), _latents(trained), rtol=1e-4, atol=1e-5)


def test_embedded_guidance_changes_the_sample(hv):
    prompt = "sampling.prompts=[{prompt:'a blue ball',frames:1,seed:5}]"
    six = hv(*GENERATE, prompt, "sampling.output_type=latent")
    one = hv(*GENERATE, prompt, "sampling.output_type=latent", "sampling.embedded_guidance_scale=1.0")
    default = hv(*GENERATE, prompt, "sampling.output_type=latent", "sampling.embedded_guidance_scale=6.0")
    assert torch.equal(_latents(six, "generate"), _latents(default, "generate"))  # 6.0 is the default
    assert not torch.allclose(_latents(six, "generate"), _latents(one, "generate"))


def test_video_to_video_strength(hv, tmp_path):
    video, _ = _media(tmp_path / "media")
    base = [*GENERATE, "sampling.output_type=latent",
            f"sampling.prompts=[{{prompt:'a blue ball',frames:5,seed:5,video:'{video}'}}]"]
    keep = hv(*base, "sampling.strength=0.0")
    full = hv(*base, "sampling.strength=1.0")
    half = hv(*base, "sampling.strength=0.5")
    plain = hv(*GENERATE, "sampling.output_type=latent", "sampling.prompts=[{prompt:'a blue ball',frames:5,seed:5}]")
    # strength 1 ignores the video: plain text-to-video; strength 0 returns the video's own latents
    torch.testing.assert_close(_latents(full, "generate"), _latents(plain, "generate"), rtol=0, atol=1e-6)
    assert not torch.allclose(_latents(keep, "generate"), _latents(plain, "generate"), atol=1e-3)
    assert not torch.allclose(_latents(half, "generate"), _latents(keep, "generate"), atol=1e-4)
    with pytest.raises(ConfigError, match="strength.*is 1.5"):
        hv(*base, "sampling.strength=1.5")


def test_skyreels_i2v_inference_with_cfg_and_its_negative_prompt(hv, tmp_path):
    _, image = _media(tmp_path / "media")
    defaults = get_family("hunyuan_video").sampling_defaults({"task": "tiny-skyreels-i2v"})
    assert (defaults["guidance_scale"], defaults["embedded_guidance_scale"]) == (6.0, 1.0)
    assert defaults["negative_prompt"] == SKYREELS_NEGATIVE
    sky = ["model=hunyuan_video_tiny_skyreels_i2v", *GENERATE, "sampling.output_type=latent",
           f"sampling.prompts=[{{prompt:'a cat',frames:5,seed:2,image:'{image}'}}]"]
    record = hv(*sky)
    latents = _latents(record, "generate")
    assert latents.shape == (16, 2, 8, 8)
    # the image latents are a posterior sample, drawn from the prompt's seed: the same on every run
    again = hv(*sky, "pipeline.mode=force")
    assert torch.equal(_latents(again, "generate"), latents)
    # CFG with the negative prompt: without CFG, or with another negative prompt, the sample changes
    no_cfg = hv(*sky, "sampling.guidance_scale=1.0")
    assert not torch.allclose(_latents(no_cfg, "generate"), latents)
    other_negative = hv(*sky, "sampling.negative_prompt=''")
    assert not torch.allclose(_latents(other_negative, "generate"), latents)
    with pytest.raises(ConfigError, match="inference only"):
        hv("model=hunyuan_video_tiny_skyreels_i2v")
    with pytest.raises(ConfigError, match=r"prompts\[0\]\.image.*is not set"):
        hv("model=hunyuan_video_tiny_skyreels_i2v", *GENERATE, "sampling.prompts=[{prompt:'a cat',frames:5}]")


def test_config_errors_before_loading(hv):
    with pytest.raises(ConfigError, match="model.dit_in_channels.*32"):
        hv("model.dit_in_channels=32")
    with pytest.raises(ConfigError, match="network.loraid.*Wan"):
        hv("network.loraid=1")
    with pytest.raises(ConfigError, match="save_format"):
        hv("network.save_format=diffusers", "network.network_module=loha")


def test_wan_rejects_embedded_guidance(demo):
    with pytest.raises(ConfigError, match="embedded_guidance_scale.*no embedded guidance"):
        demo("sampling.embedded_guidance_scale=3.0")
