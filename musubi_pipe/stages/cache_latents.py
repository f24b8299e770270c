"""cache_latents: encode every dataset item (an image, or one clip of a video at its bucket) with the VAE.

An entry holds "latents" and whatever conditioning the task trains with, computed from the item's
own first frame (Wan I2V: "latents_image" and, for Wan2.1, "clip"; see Family.load_vae/encode_item),
plus "control_latents_<i>" for each control image or video of a task that trains with controls.

Each item is stored once, content-addressed, in the store's items/latents folder; the stage's own
artifact is `index.json`, the list of items it used and their entry keys. Adding one image encodes
one image; changing the VAE changes every key and re-encodes all. Decoding and resizing run in a
thread pool (`runtime.num_workers`) so the encoder is not starved. Every entry is written
atomically as soon as it is encoded, so a run killed halfway continues from the stored entries.

Media that fail to decode here (a truncated video whose header looked fine) are skipped, left out
of the index and reported with the scan's skips in `items_skipped`; with `dataset.strict` they stop
the stage with an error instead.
"""

from __future__ import annotations

import json

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.progress import progress_bar
from musubi_pipe.stages import common

KIND = "latents"


def inputs(job: Job) -> dict:
    items, _ = common.dataset_scan(job)
    return {
        "items": sorted({common.latent_key(job, item) for item in items}),
        "vae": job.cached("vae_doc", lambda: common.encoder_document(job, "vae", "vae_dtype")),
    }


def _to_pixels(frames):
    """uint8 frames [F, H, W, 3] -> float pixels [1, 3, F, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float()  # a writable copy
    return (pixels / 127.5 - 1.0)[None]


def _loader(with_controls: bool):
    """The per-item decode function run in the worker threads: (frames, control frames)."""
    from musubi_pipe.data.loader import load_control_frames, load_item_frames

    def load(item):
        controls = load_control_frames(item) if with_controls and item.controls else []
        return load_item_frames(item), controls

    return load


def _encode(vae, loaded, device, dtype) -> dict:
    """The entry tensors of one decoded item (batch dimension dropped, float32 on the CPU)."""
    frames, controls = loaded
    tensors = {name: value[0] for name, value in vae.encode_item(_to_pixels(frames).to(device, dtype)).items()}
    for i, control in enumerate(controls):
        tensors[f"control_latents_{i}"] = vae.encode(_to_pixels(control).to(device, dtype))[0]
    return {name: value.float().cpu() for name, value in tensors.items()}


def run(ctx: StageContext) -> dict:
    import torch

    from musubi_pipe.data.loader import iter_loaded
    from musubi_pipe.errors import MediaError

    job = ctx.job
    items, _ = common.dataset_scan(job)
    keys = [common.latent_key(job, item) for item in items]
    todo = {key: item for item, key in zip(items, keys) if ctx.force or not job.store.has_item(KIND, key)}
    mine = dict(job.dist.shard(list(todo.items())))  # several processes: each encodes its share
    failed: dict[str, str] = {}  # entry key -> reason
    if mine:
        device = common.resolve_device(job)
        dtype = common.torch_dtype(common.resolve_dtype(job, "vae_dtype"))
        vae = common.family(job).load_vae(common.model_cfg(job), device, dtype)
        workers = max(1, int(ctx.runtime.get("num_workers", 2)))
        by_item = {id(item): key for key, item in mine.items()}
        loaded = iter_loaded(list(mine.values()), _loader(common.uses_controls(job)), workers)
        show = ctx.runtime.get("progress", True) and job.dist.main
        progress = progress_bar(loaded, total=len(mine), desc="cache_latents", disable=not show)
        with torch.no_grad():
            for item, result in progress:
                key = by_item[id(item)]
                if isinstance(result, MediaError):
                    common.log.warning("skipping %s: %s", item.media_path, result)
                    failed[key] = str(result)
                    continue
                job.store.save_item(KIND, key, _encode(vae, result, device, dtype),
                                    {"item": item.key, "media": item.media_path})
        del vae
    failed = {key: reason for part in job.dist.all_gather(failed) for key, reason in part.items()}
    if failed and job.cfg["dataset"].get("strict"):
        # after the other items are stored (a rerun continues from them) and on every process alike
        key = next(iter(failed))
        raise MediaError(todo[key].media_path, f"{failed[key]} (dataset.strict=true; set it to false to skip "
                         "such items)")
    index = [dict(common.item_record(item), entry=key) for item, key in zip(items, keys) if key not in failed]
    (ctx.out_dir / "index.json").write_text(json.dumps(index, indent=1))
    skipped = [{"path": todo[key].media_path, "reason": reason} for key, reason in failed.items()]
    return {"items_total": len(items), "items_computed": len(todo) - len(failed), "decode_skipped": skipped}


def report(job: Job, stats: dict) -> dict:
    """Media this run could not use, with reasons: the scan's skips and the stage's decode failures
    (reported even when the stage is cached, from its stored stats)."""
    _, skips = common.dataset_scan(job)
    skipped = [{"path": s.path, "reason": s.reason} for s in skips] + list(stats.get("decode_skipped", []))
    return {"items_skipped": len(skipped), "skipped": skipped}


def check(job: Job, artifact) -> str | None:
    index = json.loads((artifact / "index.json").read_text())
    return common.unusable_items(job, KIND, (record["entry"] for record in index))


STAGE = Stage(
    name="cache_latents",
    version=2,
    upstream=(),
    keys=("model.arch", "model.task", "dataset.strict"),
    inputs=inputs,
    run=run,
    item_kind=KIND,
    report=report,
    check=check,
)
