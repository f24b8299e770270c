"""sample: generate each sampling prompt with the trained LoRA; png for one frame, mp4 for more.

Prompt embeddings come from cache_text (the text encoder is not loaded here). Each prompt may
override width, height, frames, seed, steps, guidance_scale, guidance_scale_high, shift,
negative_prompt, image, embedded_guidance_scale, video and strength; settings left null take the task's
defaults (Family.sampling_defaults, e.g. Wan2.2 T2V-A14B: shift 12, guidance 3.0 low / 4.0 high;
HunyuanVideo: embedded guidance 6.0). Image-to-video tasks take the conditioning image from `image`
(resized and centre-cropped to the prompt's size). `video` (a file or a folder of frames) turns a prompt
into video-to-video: its first `frames` frames are encoded and denoised from `strength` (default 0.8).

Models with two experts switch at the boundary (models.base.route, as in training): the first
(high-noise) expert uses guidance_scale_high, the other guidance_scale. Each expert gets the LoRA the
train stage made for it (`lora_experts` in its stats); an expert that was not trained samples with
its base weights. The raw sampled latents are kept next to the media (`sample_NN.safetensors`).
"""

from __future__ import annotations

import json

from musubi_pipe.errors import ConfigError
from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.sampling.render import load_image_pixels as _load_image  # noqa: F401 - tests/test_wan_tasks.py
from musubi_pipe.sampling.settings import prompt_settings
from musubi_pipe.stages import common


def inputs(job: Job) -> dict:
    return common.sampling_inputs(job)


def run(ctx: StageContext) -> dict:
    from musubi_pipe.sampling.render import load_trained_experts, prompt_conditions, render, write_samples

    job, sampling = ctx.job, ctx.cfg["sampling"]
    defaults = common.sampling_defaults(job)
    prompts = prompt_settings(sampling, defaults)
    if not prompts:
        raise ConfigError([("sampling.prompts", "is empty; add at least one prompt or drop sample from pipeline.stages")])
    if not job.dist.main:
        return {}  # several processes: the main one samples (sampling is a few prompts, not worth splitting)
    family, model = common.family(job), common.model_cfg(job)
    experts = family.experts(model)
    device = common.resolve_device(job)
    dit_dtype = common.torch_dtype(common.resolve_dtype(job, "dit_dtype"))
    vae_dtype = common.torch_dtype(common.resolve_dtype(job, "vae_dtype"))
    text_index = json.loads((ctx.upstream_dirs["cache_text"] / "index.json").read_text())
    train_dir = ctx.upstream_dirs["train"]
    train_stats = common.upstream_stats(ctx, "train")
    lora_experts = train_stats.get("lora_experts") or {"": train_stats["outputs"]["lora"][0]}

    conds = prompt_conditions(family, model, prompts, device, vae_dtype)
    dits, networks = load_trained_experts(family, model, experts, device, dit_dtype, job.cfg["memory"], train_dir,
                                          lora_experts, sampling["lora_multiplier"])

    def embedding(text):
        return common.text_entry(job, text_index[text], device, dit_dtype)

    latents_out = render(family, model, experts, dits, prompts, conds, embedding, device,
                         ctx.runtime.get("progress", True))
    for network in networks:
        network.restore()
    del dits, networks
    fps = sampling.get("fps") or defaults["fps"]
    written = write_samples(family, model, prompts, latents_out, ctx.out_dir, "sample", fps, device, vae_dtype)
    return {"outputs": {"samples": [path.name for path, _ in written]}, "prompts": [p["prompt"] for p in prompts]}


STAGE = Stage(
    name="sample",
    version=2,
    upstream=("train", "cache_text"),
    keys=("model.arch", "model.task", "sampling"),
    inputs=inputs,
    run=run,
)
