"""Every Wan task end to end on its tiny twin: cache, train, sample; expert routing; LoRA files in diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import capture_diffusers_messages, stage
from musubi_pipe.errors import ConfigError
from musubi_pipe.models import get_family
from musubi_pipe.models.wan import family as wan_family

TASKS = {
    # model group -> (tiny task, expected LoRA files, conditioning image needed for sampling)
    "wan_tiny": ("tiny-t2v", ["demo_lora.safetensors"], False),
    "wan_tiny_i2v": ("tiny-i2v", ["demo_lora.safetensors"], True),
    "wan_tiny_t2v_a14b": ("tiny-t2v-A14B", ["demo_lora_high_noise.safetensors", "demo_lora_low_noise.safetensors"], False),
    "wan_tiny_i2v_a14b": ("tiny-i2v-A14B", ["demo_lora_high_noise.safetensors", "demo_lora_low_noise.safetensors"], True),
    "wan_tiny_ti2v_5b": ("tiny-ti2v-5B", ["demo_lora.safetensors"], False),
}


def model_of(record: dict) -> dict:
    """The resolved model group a run used (from the config.yaml its run record points at)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(record["config"]))["model"]


def _image(demo) -> str:
    return str(demo.root / "demo_data" / "images" / "red_circle.png")


@pytest.fixture
def routed(monkeypatch):
    """Record (expert, timesteps) of every DiT call, tagging each loaded DiT with its expert."""
    calls = []
    family = wan_family.FAMILY
    load_dit, predict = family.load_dit, family.predict

    def tagged_load(model_cfg, device, dtype, expert=""):
        dit = load_dit(model_cfg, device, dtype, expert=expert)
        dit._test_expert = expert
        return dit

    def recording_predict(dit, noisy, timesteps, embeds, cond=None):
        calls.append((dit._test_expert, timesteps.detach().float().cpu().flatten().tolist()))
        return predict(dit, noisy, timesteps, embeds, cond)

    monkeypatch.setattr(family, "load_dit", tagged_load)
    monkeypatch.setattr(family, "predict", recording_predict)
    return calls


@pytest.mark.parametrize("group", list(TASKS))
def test_every_task_caches_trains_and_samples(demo, group):
    task, files, needs_image = TASKS[group]
    overrides = [f"model={group}", "sampling.prompts=[{prompt: a blue ball moving from left to right, frames: 5}]"]
    if needs_image:
        overrides.append(f"sampling.image={_image(demo)}")
    record = demo(*overrides)
    assert model_of(record)["task"] == task
    assert [Path(p).name for p in record["lora"]] == files
    assert [Path(p).name for p in record["samples"]] == ["sample_00.mp4"]
    train = stage(record, "train")
    assert train["steps"] == 6 and all(math.isfinite(v) for v in train["losses"])
    latents = stage(record, "cache_latents")
    assert latents["items_computed"] == latents["items_total"] == 5
    # the sampled latents have the task's latent shape: 5 frames -> 2 latent frames
    with safe_open(str(Path(record["samples"][0]).with_suffix(".safetensors")), "pt") as f:
        shape = f.get_slice("latents").get_shape()
    stride = 16 if task == "tiny-ti2v-5B" else 8
    channels = 48 if task == "tiny-ti2v-5B" else 16
    assert shape == [channels, 2, 64 // stride, 64 // stride]


def test_i2v_items_cache_their_first_frame_conditioning(demo):
    record = demo("model=wan_tiny_i2v", "pipeline.stages=[cache_latents]")
    index = json.loads((Path(stage(record, "cache_latents")["artifact"]) / "index.json").read_text())
    video = next(r for r in index if r["kind"] == "video")
    entry = load_file(str(demo.root / "cache" / "items" / "latents" / video["entry"][:2] / f"{video['entry']}.safetensors"))
    assert set(entry) == {"latents", "latents_image", "clip"}
    assert entry["latents_image"].shape == (20, 3, 8, 8)
    mask = entry["latents_image"][:4]
    assert torch.equal(mask[:, 0], torch.ones_like(mask[:, 0])) and not mask[:, 1:].any()
    assert entry["clip"].shape == (5, 32)  # tiny CLIP: (28 / 14)^2 + 1 tokens of width 32


def test_t2v_tasks_of_both_generations_share_latents(demo):
    first = demo("model=wan_tiny", "pipeline.stages=[cache_latents,cache_text]")
    second = demo("model=wan_tiny_t2v_a14b", "pipeline.stages=[cache_latents,cache_text]")
    assert stage(first, "cache_latents")["items_computed"] == 5
    # the A14B twin ships the same tiny Wan2.1 VAE weights (in ComfyUI's file layout): nothing to re-encode
    assert stage(second, "cache_latents")["items_computed"] == 0


def test_training_and_sampling_route_timesteps_to_experts(demo, routed):
    record = demo("model=wan_tiny_t2v_a14b", "training.max_train_steps=30", "dataset.general.batch_size=2",
                  "sampling.prompts=[{prompt: a red circle on a white background, frames: 1}]", "sampling.steps=12",
                  "sampling.guidance_scale=1.0", "sampling.guidance_scale_high=1.0")
    train_calls, sample_calls = routed[:30], routed[30:]
    assert len(sample_calls) == 12
    for calls in (train_calls, sample_calls):
        high = [t for expert, ts in calls if expert == "high_noise" for t in ts]
        low = [t for expert, ts in calls if expert == "low_noise" for t in ts]
        assert high and low
        assert min(high) >= 875.0 > max(low)
    # every batch stays on one expert: all its items' timesteps on the same side
    assert all(len({t >= 875.0 for t in ts}) == 1 for _, ts in train_calls)
    steps = stage(record, "train")["expert_steps"]
    assert steps["high_noise"] + steps["low_noise"] == 30


@pytest.mark.parametrize("which", ["high", "low"])
def test_single_expert_training(demo, routed, which):
    record = demo("model=wan_tiny_t2v_a14b", f"training.experts={which}", "pipeline.stages=[cache_latents,cache_text,train]")
    assert [Path(p).name for p in record["lora"]] == [f"demo_lora_{which}_noise.safetensors"]
    timesteps = [t for _, ts in routed for t in ts]
    assert {e for e, _ in routed} == {f"{which}_noise"}
    assert all(t >= 875.0 for t in timesteps) if which == "high" else all(t < 875.0 for t in timesteps)
    with safe_open(record["lora"][0], "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_experts"] == f"{which}_noise"
    assert (metadata["ss_min_timestep"], metadata["ss_max_timestep"]) == (("875", "1000") if which == "high" else ("0", "875"))


def test_shared_expert_lora_is_one_file_for_both(demo, routed):
    record = demo("model=wan_tiny_t2v_a14b", "training.shared_expert_lora=true", "memory.offload_inactive_dit=true",
                  "sampling.prompts=[{prompt: a red circle on a white background, frames: 1}]")
    assert [Path(p).name for p in record["lora"]] == ["demo_lora.safetensors"]
    assert {e for e, _ in routed} == {"high_noise", "low_noise"}
    lora = load_file(record["lora"][0])
    assert "lora_unet_blocks_0_self_attn_q.lora_up.weight" in lora and lora["lora_unet_blocks_0_self_attn_q.lora_up.weight"].abs().sum() > 0


def test_boundary_override(demo, routed):
    demo("model=wan_tiny_t2v_a14b", "model.timestep_boundary=500", "training.experts=high",
         "pipeline.stages=[cache_latents,cache_text,train]")
    assert min(t for _, ts in routed for t in ts) >= 500.0


def test_ti2v_sample_keeps_the_given_first_frame(demo):
    record = demo("model=wan_tiny_ti2v_5b", f"sampling.image={_image(demo)}", "model.vae_dtype=float32",
                  "sampling.prompts=[{prompt: a red circle on a white background, frames: 9}]")
    sampled = load_file(str(Path(record["samples"][0]).with_suffix(".safetensors")))["latents"]
    family = get_family("wan")
    model_cfg = model_of(record)
    from musubi_pipe.stages.sample import _load_image

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the run's device (runtime.device=auto)
    vae = family.load_vae(model_cfg, device, torch.float32)
    first = vae.encode_condition(_load_image(_image(demo), 64, 64).to(device), 9)["first_frame"][0].cpu()
    torch.testing.assert_close(sampled[:, :1], first.float(), atol=1e-4, rtol=0)
    assert not torch.allclose(sampled[:, 1:2], first.float(), atol=1e-2)


@pytest.mark.parametrize("group", ["wan_tiny_i2v", "wan_tiny_t2v_a14b", "wan_tiny_i2v_a14b", "wan_tiny_ti2v_5b"])
def test_lora_files_load_in_diffusers_with_zero_unmatched_keys(demo, group):
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from peft.utils import get_peft_model_state_dict

    record = demo(f"model={group}", "pipeline.stages=[cache_latents,cache_text,train]")
    family, model_cfg = get_family("wan"), model_of(record)
    experts = [e.name for e in family.experts(model_cfg)]
    dits = {e: family.load_dit(model_cfg, "cpu", torch.float32, expert=e) for e in experts}
    pipeline_class = WanImageToVideoPipeline if "i2v" in group else WanPipeline
    pipe = pipeline_class(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                          transformer=dits[experts[0]], transformer_2=dits.get("low_noise"),
                          boundary_ratio=family.experts(model_cfg)[0].t_min if len(experts) > 1 else None)

    def load():
        for path in record["lora"]:
            low = Path(path).stem.endswith("_low_noise")
            pipe.load_lora_weights(path, adapter_name="t", load_into_transformer_2=low)

    messages = capture_diffusers_messages(load)
    for bad in ("unexpected keys", "missing keys", "No LoRA keys associated", "inconsistency"):
        assert not [m for m in messages if bad in m], messages
    for transformer in [t for t in (pipe.transformer, pipe.transformer_2) if t is not None]:
        loaded = get_peft_model_state_dict(transformer, adapter_name="t")
        per_block = 12 if group == "wan_tiny_i2v" else 10  # + cross_attn k_img, v_img on Wan2.1 I2V
        assert len(loaded) == 2 * per_block * 2


def test_validation_names_task_specific_problems(demo, tmp_path):
    with pytest.raises(ConfigError) as err:
        demo("model=wan_tiny_t2v_a14b", "model.dit_high_noise=???")
    assert "model.dit_high_noise" in str(err.value)
    with pytest.raises(ConfigError) as err:
        demo("model=wan_tiny", "training.experts=high")
    assert "training.experts" in str(err.value) and "one DiT" in str(err.value)
    with pytest.raises(ConfigError) as err:
        demo("model=wan_tiny", "sampling.guidance_scale_high=4.0")
    assert "one DiT" in dict(err.value.problems)["sampling.guidance_scale_high"]
    with pytest.raises(ConfigError) as err:
        demo("model=wan_tiny", "+model.first_frame_ratio=0.5")
    assert "ti2v-5B" in dict(err.value.problems)["model.first_frame_ratio"]
    with pytest.raises(ConfigError) as err:
        demo("model=wan_tiny_i2v_a14b")
    assert "sampling.prompts[0].image" in str(err.value)
    with pytest.raises(ConfigError) as err:
        demo("model=wan_tiny", f"sampling.image={_image(demo)}")
    assert "takes no image" in str(err.value)


def test_real_recipe_names_every_file_of_another_variant(demo, models_dir):
    """The wan22_t2v recipe given the tiny twin's files fails at validation, naming each key and both variants."""
    from musubi_pipe.config import compose
    from musubi_pipe.config.validate import validate
    from musubi_pipe.runner import resolve

    paths = get_family("wan").build_tiny(models_dir / "wan_tiny", "tiny-t2v-A14B")
    images = demo.root / "images"
    images.mkdir()
    cfg = resolve(compose(["+recipe=wan22_t2v", f"paths.root={demo.root}",
                           *[f"model.{key}={path}" for key, path in paths.items()],
                           f"dataset.datasets=[{{image_directory:{images}}}]"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    problems = dict(err.value.problems)
    assert set(problems) == {"model.dit", "model.dit_high_noise", "model.vae", "model.t5"}
    assert "tiny-t2v-A14B" in problems["model.dit"] and "model.task=t2v-A14B" in problems["model.dit"]
    assert "dim 128" in problems["model.dit_high_noise"] and "5120" in problems["model.dit_high_noise"]
