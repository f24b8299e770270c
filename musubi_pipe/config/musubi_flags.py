"""musubi-tuner's command-line flags and the config key each becomes (`tools from-musubi`, docs/training.md).

`COMMON` holds the flags every musubi-tuner training and caching script shares (its parser_common.py,
cache_latents.py, cache_text_encoder_outputs.py); a family adds its own (`Family.musubi_flags`: `--task`,
`--t5`, `--fp8_llm`, ...). Each flag is one `Flag`: the key it sets (with how its value converts), or, for a
flag with no key here, whether it is `unsupported` (it would change what is trained, and we cannot) or
`not_needed` (what it does happens here anyway, or it only concerns musubi-tuner's own plumbing), with the
reason. Nothing is dropped silently: a flag in neither table is reported as unknown.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Flag:
    """What one musubi-tuner flag becomes. `key` (dotted config key) is set to `convert(value)`; `takes` is
    how many values follow the flag: 0 (a switch: `value` is what the key gets), 1, or "*" (a list)."""

    key: str | None = None
    takes: int | str = 1
    convert: Callable[[Any], Any] | None = None
    value: Any = True
    status: str = "mapped"  # mapped | model (read by Family.musubi_model) | unsupported | not_needed
    reason: str = ""


def to(key: str, convert=None, takes: int | str = 1, reason: str = "") -> Flag:
    """The flag's value is the key's (converted)."""
    return Flag(key=key, takes=takes, convert=convert, reason=reason)


def switch(key: str, value: Any = True, reason: str = "") -> Flag:
    """A store_true flag: present, it sets the key to `value`."""
    return Flag(key=key, takes=0, value=value, reason=reason)


def model_choice(reason: str = "chooses the model group") -> Flag:
    """A flag the family reads to choose the model group (Family.musubi_model), e.g. Wan's --task."""
    return Flag(status="model", reason=reason)


def unsupported(reason: str, takes: int | str = 1) -> Flag:
    return Flag(takes=takes, status="unsupported", reason=reason)


def not_needed(reason: str, takes: int | str = 1) -> Flag:
    return Flag(takes=takes, status="not_needed", reason=reason)


# ------------------------------------------------------------------ value conversions


def dtype(value: str) -> str:
    """musubi-tuner's dtype spellings (str_to_dtype) as ours."""
    names = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
             "fp32": "float32", "float32": "float32", "float": "float32"}
    if str(value).lower() not in names:
        raise ValueError(f"{value!r} is not a dtype musubi-tuner reads (bf16, fp16, fp32)")
    return names[str(value).lower()]


def network_module(value: str) -> str:
    module = str(value).rsplit(".", 1)[-1]
    if module.startswith("lora"):  # networks.lora, networks.lora_wan, networks.lora_framepack, ...
        return "lora"
    if module in ("loha", "lokr"):
        return module
    raise ValueError(f"{value!r}: only musubi-tuner's own networks.lora*, networks.loha and networks.lokr are "
                     "built here (LyCORIS' other modules are not)")


def number(value):
    """int when it reads as one, else float (lr_warmup_steps: steps or a fraction)."""
    text = str(value)
    try:
        return int(text)
    except ValueError:
        return float(text)


def boolean_or_null(value):
    text = str(value).lower()
    return {"true": True, "false": False, "auto": None, "none": None}.get(text, None)


def literal(text: str):
    """A network_args value as musubi-tuner reads it: a Python literal where it is one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# network_args entries: name -> (key, conversion); others are reported as unsupported
NETWORK_ARGS: dict[str, tuple[str, Callable]] = {
    "rank_dropout": ("network.rank_dropout", float),
    "module_dropout": ("network.module_dropout", float),
    "loraplus_lr_ratio": ("network.loraplus_lr_ratio", float),
    "factor": ("network.lokr_factor", int),
    "exclude_patterns": ("network.exclude_patterns", list),
    "include_patterns": ("network.include_patterns", list),
}

# accelerate launch's own flags: the few that mean something for the run, the rest are how it is launched
ACCELERATE: dict[str, Flag] = {
    "--mixed_precision": to("training.mixed_precision",
                            reason="accelerate's: used when the script's own --mixed_precision is not given"),
    "--num_processes": not_needed("keep it: `accelerate launch --num_processes N -m musubi_pipe SPEC` launches the "
                                  "same way (docs/training.md, Several processes)"),
    "--num_machines": not_needed("keep it on the accelerate launch line that starts musubi_pipe"),
    "--multi_gpu": not_needed("keep it on the accelerate launch line that starts musubi_pipe", takes=0),
    "--num_cpu_threads_per_process": not_needed("a launcher setting; keep it on the accelerate launch line"),
    "--gpu_ids": not_needed("keep it on the accelerate launch line, or set CUDA_VISIBLE_DEVICES"),
    "--main_process_port": not_needed("keep it on the accelerate launch line"),
    "--dynamo_backend": unsupported("use memory.compile (torch.compile of each block) instead"),
    "--config_file": not_needed("accelerate's own config file; keep it on the accelerate launch line"),
    "--use_fsdp": not_needed("keep it on the accelerate launch line: FSDP works through accelerate's config "
                             "(docs/training.md)", takes=0),
}

_ATTN = {"--sdpa": "sdpa", "--flash_attn": "flash", "--flash3": "flash3", "--xformers": "xformers"}
_LOGS = "logs are written beside the checkpoints and published with the LoRA (logs/)"
_NO_HUB = "no uploads: this project never talks to the network; upload the LoRA from the run folder yourself"
_CACHE_REUSE = "caches are reused by content and recomputed when stale, without a flag"
_NO_METADATA = "metadata fields beyond musubi-tuner's ss_* keys and the ModelSpec ids are not written"

COMMON: dict[str, Flag] = {
    # files and data
    "--dataset_config": to("dataset.musubi_config"),
    "--dit": to("model.dit"),
    "--vae": to("model.vae"),
    "--vae_dtype": to("model.vae_dtype", dtype),
    "--config_file": not_needed("read here: its keys are merged under the command line's, as musubi-tuner does"),
    # attention, compile, cuda
    **{flag: switch("memory.attention", name) for flag, name in _ATTN.items()},
    "--sage_attn": switch("memory.sampling_attention", "sage",
                          reason="SageAttention is for sampling only (it has no backward), as musubi-tuner says"),
    "--split_attn": switch("memory.split_attn"),
    "--compile": switch("memory.compile"),
    "--compile_backend": to("memory.compile_backend"),
    "--compile_mode": to("memory.compile_mode"),
    "--compile_dynamic": to("memory.compile_dynamic", boolean_or_null),
    "--compile_fullgraph": unsupported("each block is compiled without fullgraph", takes=0),
    "--compile_cache_size_limit": not_needed("torch's default cache size is kept"),
    "--cuda_allow_tf32": unsupported("TF32 matmuls are not switched on (float32 stays exact)", takes=0),
    "--cuda_cudnn_benchmark": not_needed("cuDNN autotuning concerns only the VAE's convolutions here", takes=0),
    "--dynamo_backend": unsupported("use memory.compile (torch.compile of each block) instead"),
    "--dynamo_mode": unsupported("use memory.compile_mode instead"),
    "--dynamo_fullgraph": unsupported("use memory.compile instead", takes=0),
    "--dynamo_dynamic": unsupported("use memory.compile_dynamic instead", takes=0),
    # training length, precision, data loading
    "--max_train_steps": to("training.max_train_steps", int),
    "--max_train_epochs": to("training.max_train_epochs", int),
    "--seed": to("training.seed", int),
    "--gradient_accumulation_steps": to("training.gradient_accumulation_steps", int),
    "--mixed_precision": to("training.mixed_precision"),
    "--max_data_loader_n_workers": not_needed("training reads cached latents in the main process (no DataLoader "
                                              "workers); runtime.num_workers sets the decoding threads of caching"),
    "--persistent_data_loader_workers": not_needed("no DataLoader workers to keep", takes=0),
    "--disable_numpy_memmap": not_needed("cached entries are read with safetensors", takes=0),
    # logging
    "--logging_dir": not_needed(_LOGS),
    "--log_with": to("runtime.log_with"),
    "--log_prefix": not_needed(_LOGS),
    "--log_tracker_name": unsupported("the tracker is named after the run"),
    "--wandb_run_name": unsupported("the wandb run is named after the run"),
    "--log_tracker_config": unsupported("tracker config files are not read"),
    "--wandb_api_key": not_needed("log in with `wandb login` (or WANDB_API_KEY) instead"),
    "--log_config": not_needed("the whole config is in the run folder (config.yaml, spec.yaml)", takes=0),
    # several processes
    "--ddp_timeout": unsupported("the process group's default timeout is used"),
    "--ddp_gradient_as_bucket_view": not_needed("gradients are averaged by accelerate", takes=0),
    "--ddp_static_graph": not_needed("gradients are averaged by accelerate", takes=0),
    # sampling during training
    "--sample_prompts": to("sampling.prompt_file"),
    "--sample_every_n_steps": to("sampling.sample_every_n_steps", int),
    "--sample_every_n_epochs": to("sampling.sample_every_n_epochs", int),
    "--sample_at_first": switch("sampling.sample_at_first"),
    # optimizer and schedule
    "--optimizer_type": to("optimizer.optimizer_type"),
    "--optimizer_args": to("optimizer.optimizer_args", list, takes="*"),
    "--learning_rate": to("optimizer.lr", float),
    "--max_grad_norm": to("optimizer.max_grad_norm", float),
    "--lr_scheduler": to("optimizer.lr_scheduler"),
    "--lr_warmup_steps": to("optimizer.lr_warmup_steps", number),
    "--lr_scheduler_num_cycles": to("optimizer.lr_scheduler_num_cycles", int),
    "--lr_scheduler_power": to("optimizer.lr_scheduler_power", float),
    "--lr_decay_steps": unsupported("warmup-stable-decay schedules are not built"),
    "--lr_scheduler_timescale": unsupported("rex/inverse-sqrt timescales are not built"),
    "--lr_scheduler_min_lr_ratio": unsupported("a minimum lr ratio is not built"),
    "--lr_scheduler_type": unsupported("custom scheduler classes are not loaded; choose an optimizer.lr_scheduler"),
    "--lr_scheduler_args": unsupported("custom scheduler classes are not loaded", takes="*"),
    # memory
    "--fp8_base": switch("memory.fp8_base"),
    "--fp8_scaled": switch("memory.fp8_scaled"),
    "--blocks_to_swap": to("memory.blocks_to_swap", int),
    "--use_pinned_memory_for_block_swap": switch("memory.pin_memory"),
    "--block_swap_h2d_only": unsupported("block swap copies both ways here", takes=0),
    "--block_swap_ring_size": unsupported("block swap keeps two blocks in flight"),
    "--img_in_txt_in_offloading": unsupported("the embedders stay on the GPU", takes=0),
    "--gradient_checkpointing": switch("memory.gradient_checkpointing"),
    "--gradient_checkpointing_cpu_offload": switch("memory.gradient_checkpointing_cpu_offload"),
    # timesteps and loss
    "--timestep_sampling": to("training.timestep_sampling"),
    "--discrete_flow_shift": to("training.discrete_flow_shift", float),
    "--sigmoid_scale": to("training.sigmoid_scale", float),
    "--weighting_scheme": to("training.weighting_scheme"),
    "--logit_mean": to("training.logit_mean", float),
    "--logit_std": to("training.logit_std", float),
    "--mode_scale": to("training.mode_scale", float),
    "--min_timestep": to("training.min_timestep", int),
    "--max_timestep": to("training.max_timestep", int),
    "--preserve_distribution_shape": switch("training.preserve_distribution_shape"),
    "--num_timestep_buckets": unsupported("stratified timestep buckets are not built"),
    "--show_timesteps": to("training.show_timesteps", lambda v: True,
                           reason="writes timesteps.png with the LoRA (image or console alike)"),
    "--guidance_scale": unsupported("this model's trainer has no embedded guidance in training"),
    # network
    "--network_module": to("network.network_module", network_module),
    "--network_dim": to("network.network_dim", int),
    "--network_alpha": to("network.network_alpha", float),
    "--network_dropout": to("network.network_dropout", float),
    "--network_weights": to("network.network_weights"),
    "--network_args": Flag(key="network_args", takes="*"),  # split into NETWORK_ARGS by the translator
    "--dim_from_weights": unsupported("give network.network_dim equal to the file's rank", takes=0),
    "--scale_weight_norms": unsupported("max-norm regularisation is not built"),
    "--base_weights": unsupported("merge those LoRAs into the DiT first (python -m musubi_pipe.tools merge)",
                                  takes="*"),
    "--base_weights_multiplier": unsupported("merge those LoRAs into the DiT first", takes="*"),
    "--training_comment": unsupported(_NO_METADATA),
    "--no_metadata": unsupported("LoRA files always carry their metadata", takes=0),
    # saving and resuming
    "--output_dir": to("paths.runs", reason="each run is a folder <output_dir>/<date>_<time>_<name>/ holding the LoRA"),
    "--output_name": to("training.output_name"),
    "--save_precision": to("network.save_dtype", dtype),
    "--save_every_n_epochs": to("training.save_every_n_epochs", int),
    "--save_every_n_steps": to("training.save_every_n_steps", int),
    "--save_last_n_epochs": to("training.save_last_n", int),
    "--save_last_n_steps": to("training.save_last_n", int),
    "--save_last_n_epochs_state": to("training.save_last_n_states", int),
    "--save_last_n_steps_state": to("training.save_last_n_states", int),
    "--save_state": not_needed("every checkpoint is a resumable state", takes=0),
    "--save_state_on_train_end": not_needed("the final state is kept until the LoRA is published", takes=0),
    "--resume": not_needed("rerun the same spec: training continues from its last state, counters included"),
    **{f"--metadata_{field}": unsupported(_NO_METADATA) for field in
       ("title", "author", "description", "license", "tags", "reso", "arch")},
    **{flag: unsupported(_NO_HUB, takes=0 if flag in ("--save_state_to_huggingface", "--resume_from_huggingface",
                                                       "--async_upload") else 1)
       for flag in ("--huggingface_repo_id", "--huggingface_repo_type", "--huggingface_path_in_repo",
                    "--huggingface_token", "--huggingface_repo_visibility", "--save_state_to_huggingface",
                    "--resume_from_huggingface", "--async_upload")},
    # caching scripts
    "--device": to("runtime.device"),
    "--batch_size": not_needed("caching encodes one item at a time"),
    "--num_workers": to("runtime.num_workers", int),
    "--skip_existing": not_needed(_CACHE_REUSE, takes=0),
    "--keep_cache": not_needed(_CACHE_REUSE, takes=0),
    "--debug_mode": not_needed("use dataset.preview=true for a contact sheet of what training sees"),
    "--console_width": not_needed("debug display"),
    "--console_back": not_needed("debug display"),
    "--console_num_images": not_needed("debug display"),
    "--disable_cudnn_backend": unsupported("cuDNN stays on for the VAE", takes=0),
}

# musubi-tuner's defaults where ours differ: set in the spec when the command line does not give the flag,
# so the spec trains what musubi-tuner would have trained
MUSUBI_DEFAULTS: dict[str, tuple[str, Any]] = {
    "--learning_rate": ("optimizer.lr", 2.0e-6),
    "--timestep_sampling": ("training.timestep_sampling", "sigma"),
    "--discrete_flow_shift": ("training.discrete_flow_shift", 1.0),
    "--network_dim": ("network.network_dim", 4),  # networks.lora's default rank when --network_dim is not given
    "--save_every_n_steps": ("training.save_every_n_steps", None),  # only the final LoRA unless asked
    "--use_pinned_memory_for_block_swap": ("memory.pin_memory", False),
    "--mixed_precision": ("training.mixed_precision", "no"),  # accelerate's default without --mixed_precision
}

# script file name prefixes of architectures musubi-tuner trains and this project does not yet
NOT_YET = {
    "zimage_": "Z-Image", "qwen_image_": "Qwen-Image", "flux_kontext_": "FLUX.1 Kontext", "flux_2_": "FLUX.2",
    "fpack_": "FramePack", "kandinsky5_": "Kandinsky 5", "hv_1_5_": "HunyuanVideo 1.5", "hidream_o1_": "HiDream-O1",
    "krea2_": "Krea 2", "ideogram4_": "Ideogram 4",
}
