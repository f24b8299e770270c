"""cache_text: encode every caption and sampling prompt with the text encoder, one entry per text.

Entries are content-addressed by the text, the encoder's identity, its file digests and dtype, and
shared by every run: editing one caption encodes exactly one caption. The artifact is
`index.json`, mapping each text to its entry key.
"""

from __future__ import annotations

import json

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.progress import progress_bar
from musubi_pipe.stages import common

KIND = "text"
BATCH = 8


def all_texts(job: Job) -> list[str]:
    items, _ = common.dataset_scan(job)
    return sorted({item.caption for item in items} | set(common.sample_texts(job)))


def inputs(job: Job) -> dict:
    return {
        "items": sorted(common.text_key(job, text) for text in all_texts(job)),
        "encoder": common.text_document(job),
    }


def encode_texts(job: Job, texts: list[str], force: bool = False, progress: bool = True) -> tuple[dict[str, str], int]:
    """Make sure every text has its entry in the store (this process's share, with several); return
    ({text: entry key}, how many were encoded here and elsewhere). Used by cache_text and generate."""
    import torch

    keys = {text: common.text_key(job, text) for text in texts}
    todo = [t for t in texts if force or not job.store.has_item(KIND, keys[t])]
    mine = job.dist.shard(todo)  # several processes: each encodes its share
    if mine:
        device = common.resolve_device(job)
        dtype = common.torch_dtype(common.resolve_dtype(job, common.text_dtype_key(job)))
        encoder = common.family(job).load_text_encoder(common.model_cfg(job), device, dtype, fp8=common.text_fp8(job))
        batches = [mine[i : i + BATCH] for i in range(0, len(mine), BATCH)]
        with torch.no_grad():
            for batch in progress_bar(batches, desc="text encoder", disable=not (progress and job.dist.main)):
                for text, tensors in zip(batch, encoder.encode(batch)):
                    stored = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in tensors.items()}
                    job.store.save_item(KIND, keys[text], stored)
        del encoder
    return keys, len(todo)


def run(ctx: StageContext) -> dict:
    job = ctx.job
    texts = all_texts(job)
    keys, computed = encode_texts(job, texts, ctx.force, ctx.runtime.get("progress", True))
    (ctx.out_dir / "index.json").write_text(json.dumps(keys, indent=1, ensure_ascii=False))
    return {"items_total": len(texts), "items_computed": computed}


def check(job: Job, artifact) -> str | None:
    return common.unusable_items(job, KIND, json.loads((artifact / "index.json").read_text()).values())


STAGE = Stage(
    name="cache_text",
    version=1,
    upstream=(),
    keys=("model.arch", "model.task"),
    inputs=inputs,
    run=run,
    item_kind=KIND,
    check=check,
)
