"""The config schema: every allowed key of every group with its type, and the validator.

A type spec is "int", "float", "str", "bool", "list", "dict" or "any"; a trailing "?" allows null;
a tuple of strings is a choice. `validate(cfg)` walks the composed config and returns every problem
at once as (key, message) pairs: unknown keys (with the closest known name), missing `???` values,
wrong types and bad choices. Architecture-specific model keys come from the family (models/).
"""

from __future__ import annotations

import difflib

from omegaconf import MISSING

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "flash", "flash3", "sage", "xformers")  # memory.settings.ATTENTION_BACKENDS

SCHEMA: dict[str, dict] = {
    "name": "str",
    "runtime": {
        "device": "str",
        "num_workers": "int",
        "progress": "bool",
        "log_level": "str",
        "log_with": ("none", "tensorboard", "wandb", "all"),
        "log_every_n_steps": "int",
    },
    "paths": {"root": "str", "cache": "str", "runs": "str", "models": "str"},
    "model": {
        "arch": "str",
        "task": "str",
        "dit": "str",
        "vae": "str",
        "dit_dtype": DTYPES,
        "vae_dtype": DTYPES,
        "tiny_dir": "str?",
    },
    "dataset": {
        "general": "dict",
        "datasets": "list",
        "musubi_config": "str?",
        "strict": "bool",
        "preview": "bool",
        "preview_max_items": "int",
        "slice": "int",
        "num_slices": "int",
        "demo_dir": "str?",
    },
    "memory": {  # musubi_pipe/memory/settings.py explains and checks these
        "fp8_base": "bool",
        "fp8_scaled": "bool",
        "fp8_text_encoder": "bool",
        "fp8_t5": "bool",
        "fp8_llm": "bool",
        "preset": "str",
        "blocks_to_swap": "any",  # a number, a table by model size, or "preset"
        "pin_memory": "bool",
        "gradient_checkpointing": "bool",
        "gradient_checkpointing_cpu_offload": "bool",
        "attention": ATTENTION,
        "sampling_attention": ATTENTION + (None,),
        "split_attn": "bool",
        "compile": "bool",
        "compile_backend": "str",
        "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "compile_dynamic": "bool?",
        "offload_inactive_dit": "bool",
    },
    "optimizer": {
        "optimizer_type": "str",  # checked by training.optimizers (musubi-tuner spellings accepted)
        "lr": "float",
        "weight_decay": "float",
        "optimizer_args": "any",  # a mapping, or musubi-tuner's ["key=value", ...]
        "lr_scheduler": "str",  # checked by training.schedule
        "lr_warmup_steps": "any",  # steps, a fraction of the run (< 1) or "10%"
        "lr_scheduler_num_cycles": "int",
        "lr_scheduler_power": "float",
        "max_grad_norm": "float",
    },
    "network": {
        "network_module": ("lora", "loha", "lokr"),
        "network_dim": "int",
        "network_alpha": "float?",
        "network_dropout": "float?",
        "rank_dropout": "float?",
        "module_dropout": "float?",
        "include_patterns": "list",
        "exclude_patterns": "list",
        "loraplus_lr_ratio": "float?",
        "lokr_factor": "int",
        "loraid": "int?",
        "loraid_units_per_id": "int",
        "loraid_layout": ("contiguous", "interleaved"),
        "loraid_unit": ("block", "submodule"),
        "network_weights": "str?",
        "save_dtype": ("float32", "bfloat16", "float16"),
        "save_format": ("musubi", "comfy", "official", "diffusers", None),
    },
    "training": {
        "seed": "int",
        "max_train_steps": "int",
        "max_train_epochs": "int?",
        "gradient_accumulation_steps": "int",
        "mixed_precision": ("auto", "no", "bf16", "fp16"),
        "timestep_sampling": "str",  # checked by training.timesteps.check_spec
        "discrete_flow_shift": "float",
        "sigmoid_scale": "float",
        "min_timestep": "int",
        "max_timestep": "int",
        "preserve_distribution_shape": "bool",
        "weighting_scheme": "str",
        "logit_mean": "float",
        "logit_std": "float",
        "mode_scale": "float",
        "conventions": "str",  # musubi | exact, checked by training.timestep_spec.check_spec
        "show_timesteps": "bool",
        "validation_split": "float",
        "validate_every_n_steps": "int?",
        "save_every_n_steps": "int?",
        "save_every_n_epochs": "int?",
        "save_last_n": "int?",
        "save_last_n_states": "int",
        "output_name": "str",
        "experts": ("both", "high", "low"),
        "shared_expert_lora": "bool",
    },
    "sampling": {
        "prompts": "list",
        "negative_prompt": "str?",
        "embedded_guidance_scale": "float?",
        "video": "str?",
        "strength": "float?",
        "width": "int",
        "height": "int",
        "frames": "int",
        "steps": "int?",
        "guidance_scale": "float?",
        "guidance_scale_high": "float?",
        "shift": "float?",
        "seed": "int",
        "lora_multiplier": "float",
        "sample_every_n_steps": "int?",
        "sample_every_n_epochs": "int?",
        "sample_at_first": "bool",
        "prompt_file": "str?",
        "loras": "list",
        "merge_loras": "bool",
        "output_type": ("video", "images", "latent", "both"),
        "latents": "list",
        "fps": "int?",
        "image": "str?",
    },
    "ema": {"beta": "float", "beta2": "float?", "sigma_rel": "float?"},
    "merge": {"multiplier": "float", "dtype": ("bfloat16", "float16", "float32", None)},
    "pipeline": {
        "stages": "list",
        "mode": ("auto", "force", "frozen"),
        "dry_run": "bool",
        "verify": ("digest", "full", "size"),
    },
}

# pipeline.stages names, in execution order (stages/__init__.py builds the list; a test keeps the two equal)
STAGE_NAMES = ("cache_latents", "cache_text", "train", "sample", "ema", "merge", "generate")
# stages that read the dataset (directly or through their upstream stages)
DATASET_STAGES = ("cache_latents", "cache_text", "train", "sample", "ema", "merge")

PROMPT_KEYS = {
    "prompt": "str",
    "negative_prompt": "str?",
    "width": "int?",
    "height": "int?",
    "frames": "int?",
    "seed": "int?",
    "steps": "int?",
    "guidance_scale": "float?",
    "guidance_scale_high": "float?",
    "shift": "float?",
    "image": "str?",
    "embedded_guidance_scale": "float?",
    "video": "str?",
    "strength": "float?",
}


def check_value(key: str, value, spec) -> str | None:
    """Return a message if `value` does not fit `spec`, else None."""
    if value is MISSING or value == "???":
        return "is required (???) but not set; set it in the recipe or on the command line"
    if isinstance(spec, tuple):
        return None if value in spec else f"is {value!r}; choose one of {list(spec)}"
    optional = spec.endswith("?")
    base = spec.rstrip("?")
    if value is None:
        return None if optional else f"must be a {base}, not null"
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
        "any": True,
    }[base]
    return None if ok else f"must be a {base}, got {type(value).__name__} {value!r}"


def check_mapping(prefix: str, node, schema: dict) -> list[tuple[str, str]]:
    """Check a dict against a {key: spec} schema; return (dotted key, message) problems."""
    if not isinstance(node, dict):
        return [(prefix, f"must be a mapping, got {type(node).__name__}")]
    problems = []
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            problems.append((dotted, unknown_key_message(key, schema)))
        elif isinstance(schema[key], dict):
            problems.extend(check_mapping(dotted, value, schema[key]))
        else:
            msg = check_value(dotted, value, schema[key])
            if msg:
                problems.append((dotted, msg))
    for key, spec in schema.items():
        if key not in node and not (isinstance(spec, str) and spec.endswith("?")):
            problems.append((f"{prefix}.{key}" if prefix else key, "is missing; add it to the config"))
    return problems


def unknown_key_message(key, known) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {sorted(map(str, known))}"
    return f"unknown key; {hint}"
