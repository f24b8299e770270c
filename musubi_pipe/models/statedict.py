"""Architecture-independent state-dict helpers: key-rule tables, reading files, building and filling models.

    rules = compile_rules([("blocks.{}.attn.q.*", "layers.{}.q_proj.*")])   # `{}` block index, `*` a name
    renamed = rename_keys(state, rules, "transformers name for official")   # ValueError names an unmatched key
    model = empty_model(lambda: Model(config))                               # nothing allocated
    assign_state(model, cast_state(model, read_state_dict(files, key), dtype), path, key, fix)

Importing this module does not import torch; torch, safetensors and accelerate are imported by the
functions that need them. Problems with a user's file raise ConfigError on the config `key`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import safetensors_shapes

Rules = list[tuple[re.Pattern, str]]


# -- key-rule tables -----------------------------------------------------------------------------------
def compile_rules(rules: list[tuple[str, str]]) -> Rules:
    """Compile (source template, target template) pairs; `{}` is a block index, `*` a parameter name.

    Both are copied into the target in order.
    """
    compiled = []
    for src, dst in rules:
        regex = re.escape(src).replace(r"\{\}", r"(\d+)").replace(r"\*", r"(\w+)")
        compiled.append((re.compile(regex), dst.replace("*", "{}")))
    return compiled


def reverse_rules(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (target, source) pairs of `rules`, to rename the other way."""
    return [(dst, src) for src, dst in rules]


def match_rule(key: str, rules: Rules) -> tuple[int, str] | None:
    """Return (index of the first rule matching `key`, the renamed key), or None."""
    for index, (pattern, template) in enumerate(rules):
        m = pattern.fullmatch(key)
        if m:
            return index, template.format(*m.groups())
    return None


def rename_keys(state: dict, rules: Rules, what: str) -> dict:
    """Rename every key of `state` by `rules`; ValueError (`no {what} key ...`) names a key no rule covers."""
    out = {}
    for key, value in state.items():
        hit = match_rule(key, rules)
        if hit is None:
            raise ValueError(f"no {what} key {key!r}")
        out[hit[1]] = value
    return out


# -- reading files ---------------------------------------------------------------------------------------
def header_shapes(files, key: str, fix: str) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} from the .safetensors headers of `files` (None if any is .pt/.pth), without torch.

    An unreadable file raises ConfigError on `key` ending in `fix`.
    """
    try:
        header = safetensors_shapes(files)
    except ValueError as e:
        raise ConfigError([(key, f"{e}; {fix}")]) from e
    return None if header is None else {name: shape for name, (_, shape) in header.items()}


def read_state_dict(files, key: str) -> dict:
    """Read the .safetensors/.pt/.pth `files` (e.g. a shard set) into one state dict on the CPU.

    A .pt/.pth is read only as plain tensors (weights_only) and memory-mapped; one holding anything
    else raises ConfigError on `key`.
    """
    state = {}
    for path in files:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(path))
            continue
        import torch

        try:
            # weights_only: no code runs from the file; mmap: tensors are read from disk only when used
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except (pickle.UnpicklingError, RuntimeError) as e:
            message = f"{path} cannot be read as a plain state dict of tensors ({e}); convert it to .safetensors"
            raise ConfigError([(key, message)]) from e
    return state


def state_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a state dict's tensors."""
    return {name: tuple(value.shape) for name, value in state.items()}


# -- building models -------------------------------------------------------------------------------------
def empty_model(build):
    """Return `build()` with its parameters on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def cast_state(model, state: dict, dtype) -> dict:
    """Cast floating tensors to `dtype`, keeping float32 where the model's `from_pretrained` would.

    transformers models (they have `_keep_in_fp32_modules_strict`) keep those modules at fp16/bf16 and
    `_keep_in_fp32_modules` at fp16 only; diffusers models keep `_keep_in_fp32_modules` at any dtype.
    A module is matched by name against each dotted part of a key.
    """
    import torch

    keep = set()
    if hasattr(model, "_keep_in_fp32_modules_strict"):
        if dtype in (torch.float16, torch.bfloat16):
            keep |= set(model._keep_in_fp32_modules_strict or [])
        if dtype == torch.float16:
            keep |= set(model._keep_in_fp32_modules or [])
    else:
        keep |= set(model._keep_in_fp32_modules or [])
    return {
        k: v.to(torch.float32 if keep & set(k.split(".")) else dtype) if v.is_floating_point() else v
        for k, v in state.items()
    }


def assign_state(model, state: dict, path: Path, key: str, fix: str, target: str = "the model") -> None:
    """Load `state` into the empty `model` (strict, assign).

    First checks keys and shapes: ConfigError on `key` says that `path` does not fit `target`, names
    the first missing, unexpected and reshaped tensors, and ends in `fix`.
    """
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = [f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})"] if missing else []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if reshaped:
        examples = ", ".join(f"{k}: file {list(state[k].shape)}, model {list(expected[k].shape)}" for k in reshaped[:3])
        problems.append(f"{len(reshaped)} tensors of other shapes (e.g. {examples})")
    if problems:
        raise ConfigError([(key, f"{path} does not fit {target}: {'; '.join(problems)}; {fix}")])
    model.load_state_dict(state, strict=True, assign=True)
