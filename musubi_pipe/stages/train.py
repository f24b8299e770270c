"""train: train a LoRA on the cached latents and text embeddings; publish `<output_name>.safetensors`.

Resumable checkpoints live in the store's partial folder for this fingerprint, so re-running an
interrupted job resumes from its last checkpoint instead of restarting.
"""

from __future__ import annotations

import json

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common

KEYS = ("model.arch", "model.task", "network", "optimizer", "training", "dataset.general", "dataset.datasets")


def _mixed_precision(job: Job) -> str:
    value = job.cfg["training"]["mixed_precision"]
    if value != "auto":
        return value
    return "bf16" if common.resolve_dtype(job, "dit_dtype") == "bfloat16" else "no"


def inputs(job: Job) -> dict:
    return {
        "dit": {"files": common.weight_digests(job, "dit"), "dtype": common.resolve_dtype(job, "dit_dtype")},
        "mixed_precision": _mixed_precision(job),
        "network_weights": _network_weights_digest(job),
    }


def _network_weights_digest(job: Job):
    path = job.cfg["network"].get("network_weights")
    return job.digests.digest(path) if path else None


def run(ctx: StageContext) -> dict:
    from safetensors.torch import load_file

    from musubi_pipe.network.lora_file import build_metadata, save_lora_file
    from musubi_pipe.training.loop import Trainer

    job, cfg = ctx.job, ctx.cfg
    latents_index = json.loads((ctx.upstream_dirs["cache_latents"] / "index.json").read_text())
    text_index = json.loads((ctx.upstream_dirs["cache_text"] / "index.json").read_text())
    device = common.resolve_device(job)
    dit_dtype = common.torch_dtype(common.resolve_dtype(job, "dit_dtype"))
    train_cfg = dict(cfg["training"], mixed_precision=_mixed_precision(job))
    family = common.family(job)
    trainer = Trainer(
        family=family,
        model_cfg=common.model_cfg(job),
        # memory.* settings move work around without changing numbers: read, not declared
        cfg={**cfg, "training": train_cfg, "dataset": cfg["dataset"], "memory": job.cfg["memory"]},
        latents_index=latents_index,
        latent_path=lambda record: job.store.item_path("latents", record["entry"]),
        text_entry=lambda text: load_file(str(job.store.item_path("text", text_index[text])))["embedding"],
        checkpoint_dir=ctx.partial_dir(),
        device=device,
        dit_dtype=dit_dtype,
        progress=ctx.runtime.get("progress", True),
    )
    trainer.setup()
    trainer.train()
    net, name = cfg["network"], cfg["training"]["output_name"]
    metadata = build_metadata(
        arch=family.name,
        modelspec_arch=family.modelspec_arch,
        network_module=f"networks.lora_{family.name}",
        network_dim=net["network_dim"],
        network_alpha=net["network_alpha"],
        base_model=common.model_cfg(job)["dit"],
        steps=trainer.step,
        epoch=trainer.epoch,
        seed=cfg["training"]["seed"],
        learning_rate=cfg["optimizer"]["lr"],
        title=name,
        extra={"ss_training_fingerprint": ctx.fingerprint, "ss_timestep_sampling": train_cfg["timestep_sampling"],
               "ss_discrete_flow_shift": train_cfg["discrete_flow_shift"], "ss_mixed_precision": train_cfg["mixed_precision"]},
    )
    lora_file = ctx.out_dir / f"{name}.safetensors"
    save_lora_file(lora_file, trainer.network.lora_state_dict(common.torch_dtype(net["save_dtype"])), metadata)
    trainer.cleanup()
    return {
        "outputs": {"lora": [lora_file.name]},
        "steps": trainer.step,
        "epochs": trainer.epoch + 1,
        "resumed_from_step": trainer.resumed_from,
        "final_loss": trainer.losses[-1] if trainer.losses else None,
        "losses": [round(v, 6) for v in trainer.losses],
    }


STAGE = Stage(
    name="train",
    version=1,
    upstream=("cache_latents", "cache_text"),
    keys=KEYS,
    inputs=inputs,
    run=run,
)
