"""cache_latents: encode every dataset item (an image, or one clip of a video at its bucket) with the VAE.

An entry holds "latents" and whatever conditioning the task trains with, computed from the item's
own first frame (Wan I2V: "latents_image" and, for Wan2.1, "clip"); see Family.load_vae/encode_item.

Each item is stored once, content-addressed, in the store's items/latents folder; the stage's own
artifact is `index.json`, the list of items it used and their entry keys. Adding one image encodes
one image; changing the VAE changes every key and re-encodes all. Decoding and resizing run in a
thread pool so the encoder is not starved.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common

KIND = "latents"


def inputs(job: Job) -> dict:
    items, _ = common.dataset_scan(job)
    return {
        "items": sorted({common.latent_key(job, item) for item in items}),
        "vae": job.cached("vae_doc", lambda: common.encoder_document(job, "vae", "vae_dtype")),
    }


def _load_pixels(item):
    """Decode and bucket one item; return float pixels [3, F, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    from musubi_pipe.data.buckets import resize_to_bucket
    from musubi_pipe.data.media import load_image, load_video_frames

    if item.kind == "image":
        frames = load_image(item.media_path)[None]
    else:
        frames = load_video_frames(item.media_path, item.start, item.frames, item.source_fps, item.target_fps)
    frames = resize_to_bucket(frames, tuple(item.bucket))
    pixels = torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float()  # a writable copy
    return pixels / 127.5 - 1.0


def run(ctx: StageContext) -> dict:
    import torch
    from tqdm import tqdm

    job = ctx.job
    items, skips = common.dataset_scan(job)
    keys = [common.latent_key(job, item) for item in items]
    todo = [(item, key) for item, key in zip(items, keys) if ctx.force or not job.store.has_item(KIND, key)]
    todo = list({key: (item, key) for item, key in todo}.values())  # one encode per distinct entry
    if todo:
        device = common.resolve_device(job)
        dtype = common.torch_dtype(common.resolve_dtype(job, "vae_dtype"))
        vae = common.family(job).load_vae(common.model_cfg(job), device, dtype)
        workers = max(1, int(ctx.runtime.get("num_workers", 2)))
        with ThreadPoolExecutor(workers) as pool, torch.no_grad():
            decoded = pool.map(lambda pair: (pair, _load_pixels(pair[0])), todo)
            progress = tqdm(decoded, total=len(todo), desc="cache_latents", disable=not ctx.runtime.get("progress", True))
            for (item, key), pixels in progress:
                tensors = vae.encode_item(pixels[None].to(device, dtype))
                common.save_item(
                    job.store.item_path(KIND, key),
                    {name: value[0].float().cpu() for name, value in tensors.items()},
                    {"item": item.key, "media": item.media_path},
                )
        del vae
    index = [dict(common.item_record(item), entry=key) for item, key in zip(items, keys)]
    (ctx.out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return {"items_total": len(items), "items_computed": len(todo)}


def report(job: Job) -> dict:
    """Media this run's scan could not use, with reasons (reported even when the stage is cached)."""
    _, skips = common.dataset_scan(job)
    return {"items_skipped": len(skips), "skipped": [{"path": s.path, "reason": s.reason} for s in skips]}


STAGE = Stage(
    name="cache_latents",
    version=1,
    upstream=(),
    keys=("model.arch", "model.task"),
    inputs=inputs,
    run=run,
    item_kind=KIND,
    report=report,
)
