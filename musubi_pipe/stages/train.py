"""train: train a LoRA on the cached latents and text embeddings; publish `<output_name>.safetensors`.

Models with two experts (Wan2.2 A14B) publish one file per trained expert,
`<output_name>_high_noise.safetensors` and `<output_name>_low_noise.safetensors`, or one shared
`<output_name>.safetensors` with `training.shared_expert_lora`. The stats map each expert to the file
that applies to it (`lora_experts`), which the sample stage reads.

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


def trained_experts(job: Job) -> list:
    from musubi_pipe.training.loop import active_experts

    experts = common.family(job).experts(common.model_cfg(job))
    return active_experts(experts, job.cfg["training"]["experts"])


def inputs(job: Job) -> dict:
    return {
        "dit": {
            "files": {e.name: common.weight_digests(job, "dit", e.name) for e in trained_experts(job)},
            "dtype": common.resolve_dtype(job, "dit_dtype"),
        },
        "model": common.family(job).training_identity(common.model_cfg(job)),
        "mixed_precision": _mixed_precision(job),
        "network_weights": _network_weights_digest(job),
    }


def _network_weights_digest(job: Job):
    path = job.cfg["network"].get("network_weights")
    return job.digests.digest(path) if path else None


def run(ctx: StageContext) -> dict:
    from safetensors.torch import load_file

    from musubi_pipe.network.lora_file import save_lora_file
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
    name = cfg["training"]["output_name"]
    files, lora_experts = [], {}
    for suffix, network in trainer.networks.items():
        lora_file = ctx.out_dir / (f"{name}_{suffix}.safetensors" if suffix else f"{name}.safetensors")
        metadata = _metadata(ctx, family, trainer, train_cfg, suffix)
        save_lora_file(lora_file, network.lora_state_dict(common.torch_dtype(cfg["network"]["save_dtype"])), metadata)
        files.append(lora_file.name)
        for expert in trainer.experts:
            if not suffix or suffix == expert.name:
                lora_experts[expert.name] = lora_file.name
    trainer.cleanup()
    return {
        "outputs": {"lora": files},
        "lora_experts": lora_experts,
        "expert_steps": trainer.expert_steps,
        "steps": trainer.step,
        "epochs": trainer.epoch + 1,
        "resumed_from_step": trainer.resumed_from,
        "final_loss": trainer.losses[-1] if trainer.losses else None,
        "losses": [round(v, 6) for v in trainer.losses],
    }


def _metadata(ctx: StageContext, family, trainer, train_cfg: dict, suffix: str) -> dict:
    from musubi_pipe.network.lora_file import build_metadata

    cfg, job = ctx.cfg, ctx.job
    net, name = cfg["network"], cfg["training"]["output_name"]
    experts = [e for e in trainer.experts if not suffix or e.name == suffix]
    extra = {
        "ss_training_fingerprint": ctx.fingerprint,
        "ss_timestep_sampling": train_cfg["timestep_sampling"],
        "ss_discrete_flow_shift": train_cfg["discrete_flow_shift"],
        "ss_mixed_precision": train_cfg["mixed_precision"],
    }
    if any(e.name for e in experts):
        # which expert(s) of a two-expert model (Wan2.2 A14B) this file is for, and their t range
        extra["ss_experts"] = ",".join(e.name for e in experts)
        extra["ss_min_timestep"] = round(min(e.t_min for e in experts) * 1000)
        extra["ss_max_timestep"] = round(max(e.t_max for e in experts) * 1000)
    model = common.model_cfg(job)
    base = model.get("dit_high_noise") if suffix == "high_noise" else model.get("dit")
    return build_metadata(
        arch=family.name,
        modelspec_arch=family.modelspec_arch,
        network_module=f"networks.lora_{family.name}",
        network_dim=net["network_dim"],
        network_alpha=net["network_alpha"],
        base_model=base,
        steps=trainer.step,
        epoch=trainer.epoch,
        seed=cfg["training"]["seed"],
        learning_rate=cfg["optimizer"]["lr"],
        title=f"{name}_{suffix}" if suffix else name,
        extra=extra,
    )


STAGE = Stage(
    name="train",
    version=1,
    upstream=("cache_latents", "cache_text"),
    keys=KEYS,
    inputs=inputs,
    run=run,
)
