"""cache_text: encode every caption and sampling prompt with the text encoder, one entry per text.

Entries are content-addressed by the text, the encoder's identity, its file digests and dtype, and
shared by every run: editing one caption encodes exactly one caption. The artifact is
`index.json`, mapping each text to its entry key.
"""

from __future__ import annotations

import json

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common

KIND = common.TEXT_KIND


def all_texts(job: Job) -> list[str]:
    items, _ = common.dataset_scan(job)
    return sorted({item.caption for item in items} | set(common.sample_texts(job)))


def inputs(job: Job) -> dict:
    return {
        "items": sorted(common.text_key(job, text) for text in all_texts(job)),
        "encoder": common.text_document(job),
    }


def run(ctx: StageContext) -> dict:
    job = ctx.job
    texts = all_texts(job)
    keys, computed = common.encode_texts(job, texts, ctx.force, ctx.runtime.get("progress", True))
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
