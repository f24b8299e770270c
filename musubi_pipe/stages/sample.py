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
import os

from musubi_pipe.errors import ConfigError
from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common

SETTINGS = ("width", "height", "frames", "seed", "steps", "guidance_scale", "guidance_scale_high", "shift",
            "negative_prompt", "image", "embedded_guidance_scale", "video", "strength")


def prompt_settings(sampling: dict, defaults: dict | None = None) -> list[dict]:
    """Return each prompt with every setting filled: the prompt's value, else sampling.*, else the task default."""
    defaults = defaults or {}
    resolved = []
    for prompt in sampling.get("prompts") or []:
        settings = {}
        for key in SETTINGS:
            value = prompt.get(key)
            if value is None:
                value = sampling.get(key)
            if value is None:
                value = defaults.get(key)
            settings[key] = value
        resolved.append(dict(settings, prompt=prompt["prompt"]))
    return resolved


def check_prompts(sampling: dict, geometry, image_mode: str = "none") -> list[tuple[str, str]]:
    """Return (key, message) problems: sizes on the latent grid, frames 4n+1, conditioning images."""
    problems = []
    multiple, stride = geometry.pixel_multiple, geometry.vae_stride[0]
    for i, p in enumerate(prompt_settings(sampling)):
        for side in ("width", "height"):
            if p[side] % multiple:
                problems.append((f"sampling.prompts[{i}].{side}", f"is {p[side]}; use a multiple of {multiple}"))
        if (p["frames"] - 1) % stride:
            problems.append((f"sampling.prompts[{i}].frames", f"is {p['frames']}; use {stride}n+1 (1, 5, 9, ...)"))
        problems += _check_video(p, i)
        image = p["image"]
        if image_mode == "required" and not image:
            problems.append((f"sampling.prompts[{i}].image", "is not set; this image-to-video task needs a start "
                             "image: set sampling.image=<path> or the prompt's image"))
        elif image and image_mode == "none":
            problems.append((f"sampling.prompts[{i}].image", "is set but this task takes no image; remove it"))
        elif image and not os.path.isfile(image):
            problems.append((f"sampling.prompts[{i}].image", f"{image} does not exist; point it at an image file"))
    return problems


def _check_video(p: dict, i: int) -> list[tuple[str, str]]:
    video, strength = p.get("video"), p.get("strength")
    problems = []
    if video and not os.path.exists(video):
        problems.append((f"sampling.prompts[{i}].video", f"{video} does not exist; point it at a video file or a "
                         "folder of frames"))
    if strength is not None and not 0 <= strength <= 1:
        problems.append((f"sampling.prompts[{i}].strength", f"is {strength}; use a value in [0, 1]"))
    if strength is not None and not video:
        problems.append((f"sampling.prompts[{i}].strength", "is set without a video (sampling.video or the "
                         "prompt's video); set one or remove strength"))
    return problems


def check_embedded_guidance(sampling: dict, defaults: dict) -> list[tuple[str, str]]:
    """embedded_guidance_scale is an error on a model without embedded guidance (its default is absent)."""
    if "embedded_guidance_scale" in defaults:
        return []
    keys = [("sampling.embedded_guidance_scale", sampling.get("embedded_guidance_scale"))]
    keys += [(f"sampling.prompts[{i}].embedded_guidance_scale", p.get("embedded_guidance_scale"))
             for i, p in enumerate(sampling.get("prompts") or [])]
    return [(key, "is set but this model has no embedded guidance; use guidance_scale") for key, v in keys
            if v is not None]


def _defaults(job: Job) -> dict:
    return common.family(job).sampling_defaults(common.model_cfg(job))


def inputs(job: Job) -> dict:
    family, model = common.family(job), common.model_cfg(job)
    return {
        "dit": common.dit_document(job, family.experts(model)),
        "model": family.training_identity(model),
        "defaults": _defaults(job),
        "vae": job.cached("vae_doc", lambda: common.encoder_document(job, "vae", "vae_dtype")),
        **conditioning_media(job, prompt_settings(job.cfg["sampling"])),
    }


def conditioning_media(job: Job, prompts: list[dict]) -> dict:
    """Digests of the prompts' start images and video-to-video inputs (part of what their samples depend on)."""
    images = sorted({p["image"] for p in prompts if p["image"]})
    videos = sorted({p["video"] for p in prompts if p.get("video")})
    media = {"images": {path: job.digests.digest(path) for path in images}}
    if videos:  # only when used: a run without video-to-video keeps the fingerprints it had before the feature
        media["videos"] = {path: common.media_digest(job, path) for path in videos}
    return media


def _pixels(frames, width: int, height: int):
    """uint8 frames [F, H', W', 3] as pixels [1, 3, F, H, W] in [-1, 1], cover-resized and centre-cropped to
    width x height."""
    import numpy as np
    import torch

    from musubi_pipe.data.buckets import resize_to_bucket

    clip = resize_to_bucket(frames, (width, height))
    return (torch.from_numpy(np.array(clip)).permute(3, 0, 1, 2).float() / 127.5 - 1.0)[None]


def _load_image(path: str, width: int, height: int):
    """An image as pixels [1, 3, 1, H, W] in [-1, 1], cover-resized and centre-cropped to width x height."""
    from musubi_pipe.data.media import load_image

    return _pixels(load_image(path)[None], width, height)


def run(ctx: StageContext) -> dict:
    job, sampling = ctx.job, ctx.cfg["sampling"]
    defaults = _defaults(job)
    prompts = prompt_settings(sampling, defaults)
    if not prompts:
        raise ConfigError([("sampling.prompts", "is empty; add at least one prompt or drop sample from pipeline.stages")])
    if not job.dist.main:
        return {}  # several processes: the main one samples (sampling is a few prompts, not worth splitting)
    family, model = common.family(job), common.model_cfg(job)
    geometry, experts = family.geometry(model), family.experts(model)
    device = common.resolve_device(job)
    dit_dtype = common.torch_dtype(common.resolve_dtype(job, "dit_dtype"))
    vae_dtype = common.torch_dtype(common.resolve_dtype(job, "vae_dtype"))
    text_index = json.loads((ctx.upstream_dirs["cache_text"] / "index.json").read_text())
    train_dir = ctx.upstream_dirs["train"]
    train_stats = common.upstream_stats(ctx, "train")
    lora_experts = train_stats.get("lora_experts") or {"": train_stats["outputs"]["lora"][0]}

    conds = prompt_conditions(family, model, prompts, device, vae_dtype)
    dits, networks = _load_experts(family, model, experts, device, dit_dtype, job.cfg["memory"], train_dir,
                                   lora_experts, sampling["lora_multiplier"])

    def embedding(text):
        return common.text_entry(job, text_index[text], device, dit_dtype)

    latents_out = render(family, experts, dits, geometry, prompts, conds, embedding, device,
                         ctx.runtime.get("progress", True))
    for network in networks:
        network.restore()
    del dits, networks
    fps = sampling.get("fps") or defaults["fps"]
    written = write_samples(family, model, prompts, latents_out, ctx.out_dir, "sample", fps, device, vae_dtype)
    return {"outputs": {"samples": [path.name for path, _ in written]}, "prompts": [p["prompt"] for p in prompts]}


def prompt_conditions(family, model, prompts: list[dict], device, vae_dtype) -> list[dict]:
    """Each prompt's conditioning: the start image's (image-to-video tasks), the video's clean latents
    ("init_latents", video-to-video) and its embedded guidance; {} for a plain prompt.

    The image is encoded with the random generators seeded from the prompt's seed: a task whose
    conditioning draws from the VAE posterior (SkyReels V1 I2V) gets the same sample on every run."""
    import torch

    conds = [{} for _ in prompts]
    if any(p["image"] or p.get("video") for p in prompts):
        vae = family.load_vae(model, device, vae_dtype)
        for cond, p in zip(conds, prompts):
            if p["image"]:
                pixels = _load_image(p["image"], p["width"], p["height"]).to(device, vae_dtype)
                with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
                    torch.manual_seed(p["seed"])
                    encoded = vae.encode_condition(pixels, p["frames"])
                cond.update({k: v.cpu() for k, v in encoded.items()})
            if p.get("video"):
                pixels = _load_video(p["video"], p["frames"], p["width"], p["height"]).to(device, vae_dtype)
                with torch.no_grad():
                    cond["init_latents"] = vae.encode(pixels).float().cpu()
        del vae
    for cond, p in zip(conds, prompts):
        if p.get("embedded_guidance_scale") is not None:
            cond["guidance"] = torch.tensor([float(p["embedded_guidance_scale"])])
    return conds


def _load_video(path: str, frames: int, width: int, height: int):
    """The first `frames` frames of a video file or frame folder as pixels [1, 3, F, H, W] in [-1, 1],
    cover-resized and centre-cropped to width x height (a shorter video is an error naming it)."""
    from musubi_pipe.data.media import load_video_frames

    return _pixels(load_video_frames(path, 0, frames), width, height)


def render(family, experts, dits, geometry, prompts: list[dict], conds: list[dict], embedding, device, progress):
    """Sampled latents of each prompt, with the DiTs as they are (LoRAs applied or not)."""
    return [
        _denoise(family, experts, dits, geometry, p, cond, [embedding(p["prompt"])], [embedding(p["negative_prompt"])],
                 device, progress)
        for p, cond in zip(prompts, conds)
    ]


def write_samples(family, model, prompts, latents_out, out_dir, prefix: str, fps, device, vae_dtype):
    """Decode and write each prompt's latents (`<prefix>_NN.safetensors` and .png or .mp4); return
    [(media path, uint8 frames [F, H, W, 3])]."""
    import torch
    from safetensors.torch import save_file

    from musubi_pipe.data.media import write_mp4, write_png

    vae = family.load_vae(model, device, vae_dtype)
    written = []
    for i, (p, latents) in enumerate(zip(prompts, latents_out)):
        save_file({"latents": latents[0].contiguous()}, str(out_dir / f"{prefix}_{i:02d}.safetensors"))
        with torch.no_grad():
            pixels = vae.decode(latents.to(device, vae.dtype))[0].float().cpu()
        frames = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        if p["frames"] == 1:
            path = out_dir / f"{prefix}_{i:02d}.png"
            write_png(path, frames[0])
        else:
            path = out_dir / f"{prefix}_{i:02d}.mp4"
            write_mp4(path, frames, fps)
        written.append((path, frames))
    del vae
    return written


def _load_experts(family, model, experts, device, dtype, memory, train_dir, lora_experts, multiplier):
    """Load every expert's DiT (memory settings applied), each with the LoRA the train stage made for it;
    return (ExpertDits, networks)."""
    from musubi_pipe.memory import load_dit
    from musubi_pipe.models.experts import ExpertDits
    from musubi_pipe.network.factory import network_from_weights
    from musubi_pipe.network.formats import read_lora_file

    offload = bool(memory.get("offload_inactive_dit")) and len(experts) > 1
    dits, networks = {}, []
    for expert in experts:
        dit = load_dit(family, model, memory, device, dtype, expert.name, park=offload)
        dits[expert.name] = dit
        if expert.name in lora_experts:
            path = train_dir / lora_experts[expert.name]
            tensors, _ = read_lora_file(path)
            network = network_from_weights(family.lora_targets(dit), tensors, multiplier=multiplier, source=str(path))
            network.to(device)
            network.apply_to()
            networks.append(network)
    return ExpertDits(dits, device, offload), networks


def _denoise(family, experts, dits, geometry, p: dict, cond: dict, positive, negative, device, progress):
    """Sample one prompt's latents: each step runs the expert its timestep routes to, with its guidance."""
    import torch

    from musubi_pipe.models.base import route
    from musubi_pipe.sampling.flow_match import guided, sample_latents

    st, sh, sw = geometry.vae_stride
    shape = (1, geometry.latent_channels, (p["frames"] - 1) // st + 1, p["height"] // sh, p["width"] // sw)
    init = cond.get("init_latents")
    # predict casts for the model; float32 kept for exact conditioning
    cond = {k: v.to(device) for k, v in cond.items() if k != "init_latents"}

    def velocity(x, timestep):
        expert = route(experts, float(timestep) / 1000)
        dit = dits.get(expert.name)
        scale = p["guidance_scale_high"] if len(experts) > 1 and expert is experts[0] else p["guidance_scale"]
        x, t = x.to(device), timestep.expand(x.shape[0]).to(device, torch.float32)
        return guided(lambda pos: family.predict(dit, x, t, positive if pos else negative, cond), scale)

    strength = 0.8 if p.get("strength") is None else p["strength"]  # musubi-tuner's default --strength
    return sample_latents(velocity, shape=shape, steps=p["steps"], shift=p["shift"], seed=p["seed"], progress=progress,
                          init=init, strength=strength)


STAGE = Stage(
    name="sample",
    version=2,
    upstream=("train", "cache_text"),
    keys=("model.arch", "model.task", "sampling"),
    inputs=inputs,
    run=run,
)
