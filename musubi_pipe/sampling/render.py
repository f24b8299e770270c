"""Rendering samples: conditioning media, the denoising of each prompt, and writing what comes out.

The stages (sample, generate, and train's sampling during training) call these with DiTs they loaded.
Each prompt is denoised by its family's sampling hook (`Family.sample`, models/base.py), whose default is
the flow-matching Euler loop of sampling/flow_match.py with per-step expert routing and classifier-free
guidance. Decoded media are written as PNG for one frame and MP4 for more, with the raw latents beside them
(`<prefix>_NN.safetensors`).
"""

from __future__ import annotations

def _pixels(frames, width: int, height: int):
    """uint8 frames [F, H', W', 3] as pixels [1, 3, F, H, W] in [-1, 1], cover-resized and centre-cropped to
    width x height."""
    import numpy as np
    import torch

    from musubi_pipe.data.buckets import resize_to_bucket

    clip = resize_to_bucket(frames, (width, height))
    return (torch.from_numpy(np.array(clip)).permute(3, 0, 1, 2).float() / 127.5 - 1.0)[None]


def load_image_pixels(path: str, width: int, height: int):
    """An image as pixels [1, 3, 1, H, W] in [-1, 1], cover-resized and centre-cropped to width x height."""
    from musubi_pipe.data.media import load_image

    return _pixels(load_image(path)[None], width, height)


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
                pixels = load_image_pixels(p["image"], p["width"], p["height"]).to(device, vae_dtype)
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


def render(family, model, experts, dits, prompts: list[dict], conds: list[dict], embedding, device, progress):
    """Sampled latents of each prompt through the family's sampling hook, with the DiTs as they are (LoRAs applied
    or not); `embedding(text)` gives a text's cached embedding."""
    from musubi_pipe.models.base import SampleRequest

    return [
        family.sample(model, SampleRequest(prompt=p, cond=cond, positive=[embedding(p["prompt"])],
                                           negative=[embedding(p["negative_prompt"])], experts=experts, dits=dits,
                                           device=device, progress=progress))
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


def load_trained_experts(family, model, experts, device, dtype, memory, train_dir, lora_experts, multiplier):
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
