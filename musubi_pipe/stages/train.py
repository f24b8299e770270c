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
import logging

from musubi_pipe.pipeline.stage import Job, Stage, StageContext
from musubi_pipe.stages import common

log = logging.getLogger("musubi_pipe")

KEYS = ("model.arch", "model.task", "network", "optimizer", "training", "dataset.general", "dataset.datasets",
        "dataset.slice", "dataset.num_slices")


def _mixed_precision(job: Job) -> str:
    value = job.cfg["training"]["mixed_precision"]
    if value != "auto":
        return value
    return "bf16" if common.resolve_dtype(job, "dit_dtype") == "bfloat16" else "no"


def trained_experts(job: Job) -> list:
    from musubi_pipe.models.base import active_experts

    experts = common.family(job).experts(common.model_cfg(job))
    return active_experts(experts, job.cfg["training"]["experts"])


def inputs(job: Job) -> dict:
    return {
        "dit": common.dit_document(job, trained_experts(job)),
        "model": common.family(job).training_identity(common.model_cfg(job)),
        "mixed_precision": _mixed_precision(job),
        # N processes each take their own batches: like N x gradient accumulation, up to float rounding
        "processes": job.dist.world,
        "network_weights": _network_weights_digest(job),
        "sample_during_training": _sampling_during_training(job),
    }


def _sampling_during_training(job: Job) -> dict | None:
    """What sampling during training depends on (its media are part of the artifact), or None when off."""
    from musubi_pipe.sampling.settings import prompt_settings

    sampling = job.cfg["sampling"]
    when = {k: sampling.get(k) for k in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")}
    if not any(when.values()):
        return None
    defaults = common.family(job).sampling_defaults(common.model_cfg(job))
    prompts = prompt_settings(sampling, defaults)
    return dict(when, prompts=prompts, fps=sampling.get("fps") or defaults["fps"], **common.conditioning_media(job, prompts),
                vae=job.cached("vae_doc", lambda: common.encoder_document(job, "vae", "vae_dtype")))


def _network_weights_digest(job: Job):
    path = job.cfg["network"].get("network_weights")
    return job.digests.digest(path) if path else None


def run(ctx: StageContext) -> dict:
    import shutil

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
        # memory.* settings only move work, except fp8, which inputs() declares through common.dit_document
        cfg={**cfg, "training": train_cfg, "dataset": cfg["dataset"], "memory": job.cfg["memory"],
             "sampling": job.cfg["sampling"]},
        latents_index=latents_index,
        latent_path=lambda record: job.store.item_path("latents", record["entry"]),
        text_entry=lambda text: common.text_entry(job, text_index[text]),
        checkpoint_dir=ctx.partial_dir(),
        device=device,
        dit_dtype=dit_dtype,
        progress=ctx.runtime.get("progress", True),
        on_checkpoint=lambda trainer, label: _save_loras(ctx, trainer, train_cfg, _intermediate_dir(ctx), label),
        dist=job.dist,
        log=_training_log(ctx) if job.dist.main else None,
        on_sample=_sampler(ctx, text_index) if _sampling_during_training(job) else None,
    )
    trainer.log_every = int(ctx.runtime.get("log_every_n_steps") or 10)
    trainer.setup()
    outputs = {"timesteps": [_plot_timesteps(ctx, trainer).name]} if train_cfg.get("show_timesteps") else {}
    trainer.train()
    lora_experts = _save_loras(ctx, trainer, train_cfg, ctx.out_dir)
    if job.dist.main:
        _warn_ignored_modules(ctx, trainer, lora_experts)
    intermediate = _publish_intermediate(ctx, cfg["training"].get("save_last_n")) if job.dist.main else []
    outputs |= {"lora": sorted(set(lora_experts.values())), "lora_checkpoints": intermediate}
    samples_dir = ctx.partial_dir() / "samples"
    if samples_dir.is_dir() and job.dist.main:  # media sampled during training (every attempt's, if resumed)
        outputs["training_samples"] = []
        for media in sorted(f for f in samples_dir.iterdir() if f.suffix in (".png", ".mp4")):
            shutil.copy2(media, ctx.out_dir / media.name)
            outputs["training_samples"].append(media.name)
    trainer.cleanup()
    if trainer.log is not None:
        trainer.log.close()
        if (ctx.partial_dir() / "logs").is_dir():  # the logs of every attempt (a resumed run continues them)
            shutil.copytree(ctx.partial_dir() / "logs", ctx.out_dir / "logs")
            outputs["logs"] = ["logs"]
    return {
        "outputs": outputs,
        "validation_losses": trainer.validation_losses,
        "validation_items": [r["key"] for r in trainer.validation_records],
        "lora_experts": lora_experts,
        "expert_steps": trainer.expert_steps,
        "steps": trainer.step,
        "epochs": trainer.epoch + 1,
        "resumed_from_step": trainer.resumed_from,
        "final_loss": trainer.losses[-1] if trainer.losses else None,
        "losses": [round(v, 6) for v in trainer.losses],
    }


def _sampler(ctx: StageContext, text_index: dict):
    """on_sample for the trainer: render sampling.prompts with the networks as trained so far into the
    partial folder's samples/ (`<label>_NN.png|mp4`, label e.g. step00000100 or e000002) and log them."""
    import logging

    from musubi_pipe.sampling.render import prompt_conditions, render, write_samples
    from musubi_pipe.sampling.settings import prompt_settings

    job = ctx.job
    family, model = common.family(job), common.model_cfg(job)
    defaults = family.sampling_defaults(model)
    prompts = prompt_settings(job.cfg["sampling"], defaults)
    fps = job.cfg["sampling"].get("fps") or defaults["fps"]
    device = common.resolve_device(job)
    dit_dtype = common.torch_dtype(common.resolve_dtype(job, "dit_dtype"))
    vae_dtype = common.torch_dtype(common.resolve_dtype(job, "vae_dtype"))
    conds = []

    def embedding(text):
        return common.text_entry(job, text_index[text], device, dit_dtype)

    def sample(trainer, label: str) -> None:
        if len(trainer.experts) < len(family.experts(model)):
            logging.getLogger("musubi_pipe").warning("sampling during training needs every expert; training.experts="
                                                     "%s trains one: skipped", ctx.cfg["training"]["experts"])
            return
        if not conds:
            conds.extend(prompt_conditions(family, model, prompts, device, vae_dtype))
        latents = render(family, model, trainer.experts, trainer.dits, prompts, conds, embedding, device,
                         progress=False)
        if not trainer.dist.main:  # with FSDP every process renders (the weights are spread); the main one writes
            return
        folder = ctx.partial_dir() / "samples"
        folder.mkdir(exist_ok=True)
        written = write_samples(family, model, prompts, latents, folder, label, fps, device, vae_dtype)
        if trainer.log is not None:
            for i, (path, frames) in enumerate(written):
                if len(frames) == 1:
                    trainer.log.images(f"samples/{i:02d}", [frames[0]], trainer.step, captions=[prompts[i]["prompt"]])
                else:
                    trainer.log.video(f"samples/{i:02d}", frames, trainer.step, fps)

    return sample


def _training_log(ctx: StageContext):
    """TensorBoard / W&B logs (training.log_with) written beside the checkpoints, published with the LoRA."""
    from musubi_pipe.training.logs import TrainingLog

    return TrainingLog(ctx.partial_dir() / "logs", ctx.runtime.get("log_with", "none"),
                       ctx.cfg["training"]["output_name"], config={k: ctx.cfg[k] for k in ("network", "optimizer", "training")})


def _plot_timesteps(ctx: StageContext, trainer):
    """training.show_timesteps: timesteps.png, the sampled t and loss weights at the first item's latent size."""
    from safetensors.torch import load_file

    from musubi_pipe.training.show_timesteps import write_timestep_plot

    latent_hw = tuple(load_file(str(trainer.latent_path(trainer.latents_index[0])))["latents"].shape[-2:])
    return write_timestep_plot(trainer.timestep_spec, latent_hw, ctx.out_dir / "timesteps.png")


def _save_loras(ctx: StageContext, trainer, train_cfg: dict, folder, label: str = "") -> dict[str, str]:
    """Write the trainer's LoRA file(s) into `folder`; return {expert name: file name} ("" for one DiT).

    Names are musubi-tuner's: `<output_name>[_<expert>][-<label>].safetensors`, label e.g. "step00000200".
    """
    from musubi_pipe.network.formats import in_format
    from musubi_pipe.network.lora_file import save_lora_file

    name, family = ctx.cfg["training"]["output_name"], common.family(ctx.job)
    dtype = common.torch_dtype(ctx.cfg["network"]["save_dtype"])
    save_format = ctx.cfg["network"].get("save_format") or family.lora_naming.default_save_format
    lora_experts = {}
    for suffix, network in trainer.networks.items():
        stem = f"{name}_{suffix}" if suffix else name
        lora_file = folder / (f"{stem}-{label}.safetensors" if label else f"{stem}.safetensors")
        metadata = _metadata(ctx, family, trainer, train_cfg, suffix)
        tensors, format_metadata = in_format(network.lora_state_dict(dtype), save_format)
        save_lora_file(lora_file, tensors, metadata | format_metadata)
        for expert in trainer.experts:
            if not suffix or suffix == expert.name:
                lora_experts[expert.name] = lora_file.name
    return lora_experts


def _warn_ignored_modules(ctx: StageContext, trainer, lora_experts: dict[str, str]) -> None:
    """Warn when ComfyUI or musubi-tuner would leave modules of the saved files unapplied (network.save_format;
    LoraNaming.ignored_by), naming them and the convert command that gives a file that consumer loads fully."""
    family = common.family(ctx.job)
    save_format = ctx.cfg["network"].get("save_format") or family.lora_naming.default_save_format
    for suffix, network in trainer.networks.items():
        name = lora_experts[suffix] if suffix else next(iter(lora_experts.values()))
        for consumer, (lost, fix) in family.lora_naming.ignored_by(save_format, network.official_names).items():
            log.warning(
                "train: %s leaves %d of the %d modules of %s unapplied, without an error (network.save_format=%s; "
                "e.g. %s). For %s: python -m musubi_pipe.tools convert %s %s --to %s (docs/training.md, 'Where "
                "LoRA files load')", consumer, len(lost), len(network.official_names), name, save_format, lost[0],
                consumer, name, name.replace(".safetensors", f"_{fix}.safetensors"), fix)


def _intermediate_dir(ctx: StageContext):
    return ctx.partial_dir() / "loras"


def _publish_intermediate(ctx: StageContext, keep_last: int | None) -> list[str]:
    """Copy the intermediate LoRA files of the newest `keep_last` checkpoints (all when None) into the artifact."""
    import shutil

    from safetensors import safe_open

    folder = _intermediate_dir(ctx)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    step_of = {}  # label -> the training step it was saved at (ss_steps), to order step and epoch labels together
    for f in files:
        with safe_open(str(f), "pt") as handle:
            step_of[f.stem.rsplit("-", 1)[1]] = int(handle.metadata()["ss_steps"])
    labels = sorted(step_of, key=step_of.get)
    kept = set(labels[-keep_last:] if keep_last else labels)
    published = []
    for f in files:
        if f.stem.rsplit("-", 1)[1] in kept:
            shutil.copy2(f, ctx.out_dir / f.name)
            published.append(f.name)
    return published


# training keys recorded as ss_<key> metadata, as musubi-tuner writes them
METADATA_TRAINING_KEYS = ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "weighting_scheme", "logit_mean",
                          "logit_std", "mode_scale", "gradient_accumulation_steps", "max_train_steps")
METADATA_NETWORK_KEYS = ("network_dropout", "rank_dropout", "module_dropout", "include_patterns", "exclude_patterns",
                         "loraplus_lr_ratio", "lokr_factor")


def _metadata(ctx: StageContext, family, trainer, train_cfg: dict, suffix: str) -> dict:
    from musubi_pipe.network.factory import network_module_name
    from musubi_pipe.network.lora_file import build_metadata
    from musubi_pipe.training.optimizers import describe_optimizer

    cfg, job = ctx.cfg, ctx.job
    net, opt, name = cfg["network"], cfg["optimizer"], cfg["training"]["output_name"]
    experts = [e for e in trainer.experts if not suffix or e.name == suffix]
    extra = {f"ss_{key}": train_cfg.get(key) for key in METADATA_TRAINING_KEYS}
    extra |= {
        "ss_training_fingerprint": ctx.fingerprint,
        "ss_mixed_precision": train_cfg["mixed_precision"],
        "ss_gradient_checkpointing": bool(job.cfg["memory"].get("gradient_checkpointing")),
        "ss_optimizer": describe_optimizer(trainer.optimizer),
        "ss_lr_scheduler": opt["lr_scheduler"],
        "ss_lr_warmup_steps": opt["lr_warmup_steps"],
        "ss_max_grad_norm": opt["max_grad_norm"],
        "ss_num_epochs": trainer.epoch + 1,
        "ss_network_args": json.dumps({k: net.get(k) for k in METADATA_NETWORK_KEYS if net.get(k) not in (None, [], -1)}),
    }
    # the t range this file was trained on: min/max_timestep, narrowed to the expert(s) of a Wan2.2 A14B file
    low = max(min(e.t_min for e in experts) * 1000, train_cfg.get("min_timestep", 0))
    high = min(max(e.t_max for e in experts) * 1000, train_cfg.get("max_timestep", 1000))
    if (low, high) != (0, 1000):
        extra["ss_min_timestep"], extra["ss_max_timestep"] = round(low), round(high)
        extra["modelspec.timestep_range"] = f"{round(low)},{round(high)}"
    if any(e.name for e in experts):
        extra["ss_experts"] = ",".join(e.name for e in experts)
    if trainer.loraid is not None:  # which units of the model this LoRA owns (network/loraid.py)
        network = trainer.networks[suffix]
        extra["ss_loraid"] = trainer.loraid["loraid"]
        extra["ss_loraid_allocation"] = json.dumps(dict(trainer.loraid, modules=sorted(network.official_names)))
    # the weights this file was trained on: the config key of its expert (Expert.key), model.dit for a shared LoRA
    key = next((e.key for e in family.experts(common.model_cfg(job)) if suffix and e.name == suffix), "model.dit")
    base = common.model_cfg(job).get(key.removeprefix("model."))
    return build_metadata(
        arch=family.name,
        modelspec_arch=family.modelspec_arch,
        network_module=network_module_name(net["network_module"], family.name),
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
    version=2,
    upstream=("cache_latents", "cache_text"),
    keys=KEYS,
    inputs=inputs,
    run=run,
)
