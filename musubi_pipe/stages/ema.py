"""ema: post-hoc EMA of the train stage's LoRA checkpoints (its intermediate files and the final one).

Add it after train: `pipeline.stages=[cache_latents,cache_text,train,ema]` with checkpoints to average
(`training.save_every_n_steps` / `save_every_n_epochs`). Settings are the `ema` keys: `beta` (0.95)
with an optional `beta2` (beta moves linearly to beta2 over the checkpoints), or `sigma_rel`
(power-function EMA; overrides beta). Each trained file (one per Wan2.2 expert) gets its average,
`<name>[_<expert>]_ema.safetensors`, ordered by the step recorded in the checkpoints
(network.ema has the formulas and the differences from musubi-tuner's lora_post_hoc_ema).
"""

from __future__ import annotations

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common


def inputs(job: Job) -> dict:
    return {}


def _groups(train_dir, outputs: dict) -> dict[str, list]:
    """{final LoRA file name: its checkpoint files (intermediate ones and itself)}."""
    groups = {}
    for final in outputs.get("lora", []):
        stem = final.removesuffix(".safetensors")
        mine = [name for name in outputs.get("lora_checkpoints", []) if name.rsplit("-", 1)[0] == stem]
        groups[final] = [train_dir / name for name in mine] + [train_dir / final]
    return groups


def run(ctx: StageContext) -> dict:
    from musubi_pipe.errors import UserError
    from musubi_pipe.network.ema import post_hoc_ema
    from musubi_pipe.network.lora_file import save_lora_file

    if not ctx.job.dist.main:
        return {}
    settings = ctx.cfg["ema"]
    train_dir = ctx.upstream_dirs["train"]
    outputs = common.upstream_stats(ctx, "train")["outputs"]
    written = []
    for final, files in _groups(train_dir, outputs).items():
        if len(files) < 2:
            raise UserError(f"ema: {final} has no intermediate checkpoints to average; set "
                            "training.save_every_n_steps or training.save_every_n_epochs (and save_last_n to choose how many)")
        tensors, metadata = post_hoc_ema(files, beta=settings["beta"], beta2=settings.get("beta2"),
                                         sigma_rel=settings.get("sigma_rel"))
        name = final.removesuffix(".safetensors") + "_ema.safetensors"
        save_lora_file(ctx.out_dir / name, tensors, metadata)
        written.append(name)
    return {"outputs": {"lora_ema": written}}


STAGE = Stage(
    name="ema",
    version=1,
    upstream=("train",),
    keys=("ema",),
    inputs=inputs,
    run=run,
)
