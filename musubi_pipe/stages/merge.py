"""merge: the trained LoRA merged into the DiT, written as one official-format .safetensors per DiT.

Add it after train: `pipeline.stages=[...,train,merge]`.
The result loads like the original DiT in musubi_pipe (model.dit=<file>) and, for Wan, in ComfyUI
(for HunyuanVideo that ComfyUI loads it is not verified). The merge
streams tensor by tensor (network.merge), so memory stays near one tensor, but the output is a whole
model on disk. Wan2.2 A14B: each expert's DiT gets its own LoRA, `<name>_merged_high_noise` and
`<name>_merged_low_noise`. Settings: `merge.multiplier` (1.0), `merge.dtype` (null: the DiT's own). To merge an EMA LoRA, use
`python -m musubi_pipe.tools merge` on the ema stage's file.
"""

from __future__ import annotations

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common


def inputs(job: Job) -> dict:
    family, model = common.family(job), common.model_cfg(job)
    return {"dit": {e.name: common.weight_digests(job, "dit", e.name) for e in family.experts(model)}}


def run(ctx: StageContext) -> dict:
    from musubi_pipe.network.merge import merge_loras

    job, settings = ctx.job, ctx.cfg["merge"]
    if not job.dist.main:
        return {}
    train_dir = ctx.upstream_dirs["train"]
    stats = common.upstream_stats(ctx, "train")
    lora_experts = stats.get("lora_experts") or {"": stats["outputs"]["lora"][0]}
    family, model = common.family(job), common.model_cfg(job)
    written = []
    for expert in family.experts(model):
        if expert.name not in lora_experts:
            continue  # an expert that was not trained keeps its weights: nothing to write
        lora = train_dir / lora_experts[expert.name]
        name = f"{ctx.cfg['training']['output_name']}_merged{'_' + expert.name if expert.name else ''}.safetensors"
        dit = model.get(expert.key.removeprefix("model."))  # as configured: a file, shards or a (diffusers) folder
        merge_loras(dit, [(str(lora), float(settings["multiplier"]))],
                    ctx.out_dir / name, dtype=settings.get("dtype"), device=common.resolve_device(job), family=family)
        written.append(name)
    return {"outputs": {"merged": written}}


STAGE = Stage(
    name="merge",
    version=1,
    upstream=("train",),
    keys=("merge", "training.output_name", "model.arch", "model.task"),
    inputs=inputs,
    run=run,
)
