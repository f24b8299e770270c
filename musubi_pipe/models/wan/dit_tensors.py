"""Wan DiT tensors for tools merge, from safetensors headers only (each tensor is read when it is merged).

Inputs (resolved by locate.py, as the training config's model.dit is): an official single file or shard set
(any shard, or every shard), ComfyUI files (the `model.diffusion_model.` / `diffusion_model.` prefix is stripped),
fp16/bf16/fp32 or plain fp8_e4m3fn; an official Wan-AI folder (e.g. Wan2.2-T2V-A14B/high_noise_model, with
`expert` picking one inside a repo root); a diffusers transformer folder or pipeline root (keys renamed to
official names with keymap's rule table). ComfyUI fp8_scaled files and .pth files are refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.models.base import DitTensor, NotADit
from musubi_pipe.models.files import safetensors_header
from musubi_pipe.models.wan.locate import is_fp8_scaled, locate_dit, strip_dit_prefix

DIT_KEY = "--dit"
# safetensors dtype codes merge can read and write (network/safetensors_stream.py)
READABLE = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL")


def dit_tensors(dit, expert: str = "") -> tuple[list[DitTensor], list[Path]]:
    """Family.dit_tensors for Wan."""
    files, layout = resolve_dit(dit, expert)
    return read_inputs(files, layout), files


def resolve_dit(dit: str | os.PathLike | Sequence[str | os.PathLike], expert: str = "") -> tuple[list[Path], str]:
    """The .safetensors files of the DiT `dit` (one path, or several: shards) and their layout, "official" or
    "diffusers". NotADit / UserError name the path and what to pass instead."""
    values = [dit] if isinstance(dit, (str, os.PathLike)) else list(dit)
    if not values:
        raise UserError(f"{DIT_KEY}: no DiT given; pass the DiT file (or folder) to merge into")
    files, layouts = [], set()
    for value in values:
        try:
            source = locate_dit(value, DIT_KEY, expert)
        except ConfigError as e:
            raise NotADit("; ".join(f"{key} {message}" for key, message in e.problems)) from None
        layouts.add("diffusers" if source.kind == "pretrained" else "official")
        for path in source.files:
            if path.suffix == ".safetensors" and path not in files:
                files.append(path)
            elif path.suffix in (".pt", ".pth"):
                raise NotADit(f"{path}: a Wan DiT is merged from .safetensors files only; convert the .pth to "
                              ".safetensors or use the ComfyUI/Wan-AI .safetensors download")
    if len(layouts) > 1:
        raise UserError(f"{DIT_KEY}: {', '.join(map(str, values))} mix a diffusers folder and official files; "
                        "pass one DiT")
    return files, layouts.pop()


def read_inputs(files: Sequence[Path], layout: str) -> list[DitTensor]:
    """Every tensor of the DiT `files`, named officially, from their headers only (nothing is read)."""
    tensors: dict[str, DitTensor] = {}
    for path in files:
        try:
            header = safetensors_header(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .safetensors file ({e}); re-download it") from None
        keys = [k for k in header if k != "__metadata__"]
        if is_fp8_scaled(keys):
            raise UserError(f"{path} is a ComfyUI fp8_scaled checkpoint (scaled_fp8 / .scale_weight tensors), which "
                            "merge cannot handle; use the bf16/fp16 file or a plain fp8_e4m3fn one")
        for key, name in _official_names(keys, layout, path).items():
            info = header[key]
            if info["dtype"] not in READABLE:
                raise UserError(f"{path}: tensor {key} has dtype {info['dtype']}, which merge does not handle")
            if name in tensors:
                raise UserError(f"{DIT_KEY}: tensor {name} is in both {tensors[name].file} and {path}; pass the "
                                "shards of one DiT only")
            tensors[name] = DitTensor(path, key, name, info["dtype"], tuple(info["shape"]))
    if "head.modulation" not in tensors or "patch_embedding.weight" not in tensors:
        raise NotADit(f"{', '.join(map(str, files))} is not a Wan DiT (no head.modulation / patch_embedding "
                      "tensors)")
    return list(tensors.values())


def _official_names(keys: list[str], layout: str, path: Path) -> dict[str, str]:
    """{file key: official name}: ComfyUI prefixes stripped, or diffusers names renamed by keymap's rule table."""
    if layout == "official":
        return dict(zip(keys, strip_dit_prefix(dict.fromkeys(keys))))
    from musubi_pipe.models.wan.keymap import dit_to_official

    try:
        return {key: name for name, key in dit_to_official({k: k for k in keys}).items()}
    except ValueError as e:
        raise NotADit(f"{path}: {e}; merge reads diffusers WanTransformer3DModel folders, use the official file "
                      "instead") from None
