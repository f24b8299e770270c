"""The `memory` config group: what each key means, and its checks (torch-free, run at validation).

    problems = memory_problems(cfg, family)        # [(key, message)], before any weight loads
    n = blocks_to_swap(cfg["memory"], family, cfg["model"])

`memory.blocks_to_swap` is a number of blocks, a table by model size, or `preset`: the presets
(conf/memory/24gb.yaml, ...) say `preset: 24gb` and `blocks_to_swap: preset`, and each family's
`swap_presets` gives the count for its model sizes, which is how one preset serves a 1.3B and a 14B
model and a new architecture brings its own counts:

    swap_presets = {"24gb": {"wan_14b": 20, "wan_5b": 0, "wan_1.3b": 0, "tiny": 0}, ...}   # models/wan/family.py

A table in the config (`blocks_to_swap: {wan_14b: 20, default: 0}`) keys the same size names
(`Family.model_size`: wan_1.3b, wan_5b, wan_14b, hunyuan_video, tiny); `default` covers the sizes it
leaves out.
"""

from __future__ import annotations

import importlib.util

# memory.attention values -> (diffusers attention backend, the module it needs, what to install)
ATTENTION_BACKENDS = {
    "sdpa": ("native", None, None),
    "flash": ("flash", "flash_attn", "pip install flash-attn"),
    "flash3": ("_flash_3", "flash_attn_interface", "FlashAttention-3, built from the hopper/ folder of "
               "Dao-AILab/flash-attention"),
    "sage": ("sage", "sageattention", "pip install sageattention"),
    "xformers": ("xformers", "xformers", "pip install xformers"),
}
# SageAttention quantizes Q and K to int8: musubi-tuner allows it for inference only, as do we
INFERENCE_ONLY_ATTENTION = ("sage",)
# torch.compile modes that capture CUDA graphs, which bake in tensor addresses that block swap changes
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
TRAINING_STAGES = ("train",)
# musubi-tuner's names of memory.fp8_text_encoder, one per text encoder they quantize (Family.fp8_text_key)
TEXT_FP8_ALIASES = ("fp8_t5", "fp8_llm")


def blocks_to_swap(memory: dict, family, model_cfg: dict) -> int:
    """The number of blocks to swap for this model: a number, a table by model size (raises KeyError when it has no
    entry for this size), or "preset": the family's count for memory.preset (Family.swap_presets)."""
    value = memory.get("blocks_to_swap") or 0
    if value == "preset":
        value = preset_swap(family, model_cfg, memory.get("preset"))
    if isinstance(value, dict):
        size = family.model_size(model_cfg)
        value = value[size] if size in value else value["default"]
    return int(value or 0)


def preset_swap(family, model_cfg: dict, preset: str | None) -> int:
    """How many blocks memory preset `preset` swaps on this model: the family's table by model size (0 when the
    family or the preset has no entry)."""
    table = getattr(family, "swap_presets", {}).get(preset or "none", {})
    return int(table.get(family.model_size(model_cfg), 0))


def text_encoder_fp8(memory: dict, family) -> bool:
    """memory.fp8_text_encoder, or the family's own alias of it (fp8_t5, fp8_llm, as musubi-tuner names them)."""
    return bool(memory.get("fp8_text_encoder") or memory.get(family.fp8_text_key))


def attention_backend(memory: dict, sampling: bool) -> str:
    """The memory.attention value that applies: memory.sampling_attention (null: memory.attention) when sampling."""
    chosen = memory.get("sampling_attention") if sampling else None
    return chosen or memory.get("attention") or "sdpa"


def memory_problems(cfg: dict, family) -> list[tuple[str, str]]:
    """Every problem of the memory group for this model and these stages, as (key, message)."""
    memory, stages = cfg["memory"], cfg["pipeline"]["stages"]
    training = any(s in TRAINING_STAGES for s in stages)
    problems = _fp8_problems(memory, family)
    problems += _swap_problems(memory, family, cfg["model"], training)
    problems += _attention_problems(memory, training)
    if memory.get("gradient_checkpointing_cpu_offload") and not memory.get("gradient_checkpointing"):
        problems.append(("memory.gradient_checkpointing_cpu_offload", "offloads the activations gradient "
                         "checkpointing keeps; set memory.gradient_checkpointing=true as well"))
    return problems


def _fp8_problems(memory: dict, family) -> list[tuple[str, str]]:
    problems = []
    for alias in TEXT_FP8_ALIASES:
        if memory.get(alias) and alias != family.fp8_text_key:
            problems.append((f"memory.{alias}", f"is another model's text encoder; {family.name} calls it "
                             f"memory.{family.fp8_text_key}, or use memory.fp8_text_encoder"))
    if memory.get("fp8_scaled") and not memory.get("fp8_base"):
        problems.append(("memory.fp8_scaled", "scales the fp8 weights of memory.fp8_base; set memory.fp8_base=true "
                         "as well (as musubi-tuner's --fp8_scaled needs --fp8_base)"))
    return problems


def _swap_problems(memory: dict, family, model_cfg: dict, training: bool) -> list[tuple[str, str]]:
    value = memory.get("blocks_to_swap")
    if isinstance(value, dict):
        bad = [k for k, v in value.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            return [("memory.blocks_to_swap", f"table entries {bad} are not numbers of blocks")]
        size = family.model_size(model_cfg)
        if size not in value and "default" not in value:
            return [("memory.blocks_to_swap", f"has no entry for this model's size {size!r} (table keys "
                     f"{sorted(value)}); add one, or set memory.blocks_to_swap=<number>")]
    elif value is not None and value != "preset" and (not isinstance(value, int) or isinstance(value, bool)):
        return [("memory.blocks_to_swap", f"is {value!r}; give a number of blocks, a table by model size, or "
                 "preset (the family's count for memory.preset)")]
    n = blocks_to_swap(memory, family, model_cfg)
    if n == 0:
        return []
    total = family.num_blocks(model_cfg)
    problems = []
    if not 0 < n < total:
        problems.append(("memory.blocks_to_swap", f"is {n}, but this model ({family.model_size(model_cfg)}) has "
                         f"{total} blocks and keeps at least one on the GPU: use 1..{total - 1}, or 0 for no swap"))
    if training and not memory.get("gradient_checkpointing"):
        problems.append(("memory.blocks_to_swap", "in training needs memory.gradient_checkpointing=true: without "
                         "it autograd keeps every block's weights alive until backward and swapping saves nothing"))
    if memory.get("compile") and memory.get("compile_mode") in CUDA_GRAPH_MODES:
        problems.append(("memory.compile_mode", f"{memory['compile_mode']} captures CUDA graphs, which fix the "
                         "weights' addresses that block swap changes; use default or max-autotune-no-cudagraphs"))
    return problems


def _attention_problems(memory: dict, training: bool) -> list[tuple[str, str]]:
    problems = []
    used = [("memory.attention", memory.get("attention") or "sdpa", True)]
    if memory.get("sampling_attention"):
        used.append(("memory.sampling_attention", memory["sampling_attention"], False))
    for key, name, for_training in used:
        _, module, install = ATTENTION_BACKENDS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            problems.append((key, f"is {name}, which needs the {module} package; it is not installed here "
                             f"({install}), or use sdpa"))
        if for_training and training and name in INFERENCE_ONLY_ATTENTION:
            problems.append((key, f"is {name}, which is for inference only (it quantizes attention inputs); train "
                             "with sdpa, flash or xformers and set memory.sampling_attention=sage for sampling"))
    return problems
