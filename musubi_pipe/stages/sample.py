"""sample: generate each sampling prompt with the trained LoRA; png for one frame, mp4 for more.

Prompt embeddings come from cache_text (the text encoder is not loaded here). Each prompt may
override width, height, frames, seed, steps, guidance_scale, shift and negative_prompt. The raw
sampled latents are kept next to the media (`sample_NN.safetensors`) for decode-only reuse and tests.
"""

from __future__ import annotations

import json

from musubi_pipe.errors import ConfigError
from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common

SETTINGS = ("width", "height", "frames", "seed", "steps", "guidance_scale", "shift", "negative_prompt")


def prompt_settings(sampling: dict) -> list[dict]:
    """Return each prompt with every setting filled from the sampling defaults."""
    resolved = []
    for prompt in sampling.get("prompts") or []:
        settings = {key: sampling[key] if prompt.get(key) is None else prompt[key] for key in SETTINGS}
        resolved.append(dict(settings, prompt=prompt["prompt"]))
    return resolved


def check_prompts(sampling: dict, stride: tuple[int, int, int], patch: int = 2) -> list[tuple[str, str]]:
    """Return (key, message) problems with prompt sizes: sides a multiple of the latent grid, frames 4n+1."""
    problems = []
    multiple = stride[1] * patch
    for i, p in enumerate(prompt_settings(sampling)):
        for side in ("width", "height"):
            if p[side] % multiple:
                problems.append((f"sampling.prompts[{i}].{side}", f"is {p[side]}; use a multiple of {multiple}"))
        if (p["frames"] - 1) % stride[0]:
            problems.append((f"sampling.prompts[{i}].frames", f"is {p['frames']}; use {stride[0]}n+1 (1, 5, 9, ...)"))
    return problems


def inputs(job: Job) -> dict:
    return {
        "dit": {"files": common.weight_digests(job, "dit"), "dtype": common.resolve_dtype(job, "dit_dtype")},
        "vae": job.cached("vae_doc", lambda: common.encoder_document(job, "vae", "vae_dtype")),
    }


def run(ctx: StageContext) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from musubi_pipe.data.media import write_mp4, write_png
    from musubi_pipe.network.lora import LoRANetwork
    from musubi_pipe.network.lora_file import load_lora_file
    from musubi_pipe.sampling.flow_match import sample_latents

    job, sampling = ctx.job, ctx.cfg["sampling"]
    prompts = prompt_settings(sampling)
    if not prompts:
        raise ConfigError([("sampling.prompts", "is empty; add at least one prompt or drop sample from pipeline.stages")])
    family, model = common.family(job), common.model_cfg(job)
    device = common.resolve_device(job)
    dit_dtype = common.torch_dtype(common.resolve_dtype(job, "dit_dtype"))
    text_index = json.loads((ctx.upstream_dirs["cache_text"] / "index.json").read_text())
    train_stats = json.loads((ctx.upstream_dirs["train"] / "manifest.json").read_text())["stats"]
    dit = family.load_dit(model, device, dit_dtype)
    tensors, _ = load_lora_file(ctx.upstream_dirs["train"] / train_stats["outputs"]["lora"][0])
    rank = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight"))
    network = LoRANetwork(family.lora_targets(dit), rank, None, multiplier=sampling["lora_multiplier"])
    network.load_lora_state_dict(tensors)
    network.to(device)
    network.apply_to()

    def embedding(text):
        return load_file(str(job.store.item_path("text", text_index[text])))["embedding"]

    channels, (st, sh, sw) = dit.config.in_channels, family.vae_stride
    latents_out = []
    for p in prompts:
        shape = (1, channels, (p["frames"] - 1) // st + 1, p["height"] // sh, p["width"] // sw)
        latents_out.append(sample_latents(
            family, dit, shape=shape, positive=embedding(p["prompt"]), negative=embedding(p["negative_prompt"]),
            steps=p["steps"], guidance_scale=p["guidance_scale"], shift=p["shift"], seed=p["seed"],
            device=device, dtype=dit_dtype, progress=ctx.runtime.get("progress", True),
        ))
    network.restore()
    del dit, network
    vae = family.load_vae(model, device, common.torch_dtype(common.resolve_dtype(job, "vae_dtype")))
    files = []
    for i, (p, latents) in enumerate(zip(prompts, latents_out)):
        save_file({"latents": latents[0].contiguous()}, str(ctx.out_dir / f"sample_{i:02d}.safetensors"))
        with torch.no_grad():
            pixels = vae.decode(latents.to(device, vae.dtype))[0].float().cpu()
        frames = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        if p["frames"] == 1:
            path = ctx.out_dir / f"sample_{i:02d}.png"
            write_png(path, frames[0])
        else:
            path = ctx.out_dir / f"sample_{i:02d}.mp4"
            write_mp4(path, frames, sampling["fps"])
        files.append(path.name)
    return {"outputs": {"samples": files}, "prompts": [p["prompt"] for p in prompts]}


STAGE = Stage(
    name="sample",
    version=1,
    upstream=("train", "cache_text"),
    keys=("model.arch", "model.task", "sampling"),
    inputs=inputs,
    run=run,
)
