"""Z-Image DiT tensors for tools merge, under the official single-file names (what ComfyUI loads).

An official file (or a ComfyUI-prefixed one) is listed from its header and read tensor by tensor; diffusers
weights (Tongyi-MAI's transformer/ shards or folder) are read and renamed into the official layout, q/k/v fused
(keymap.dit_to_official). LoRA modules are musubi-tuner's names, so the fused `attention.qkv` lists to_q, to_k
and to_v as its row parts and `attention.out` lists to_out.0 (DitTensor.parts): a LoRA lands in its rows.
"""

from __future__ import annotations

import re
from pathlib import Path

from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.models.base import DitTensor, NotADit

DIT_KEY = "--dit"
_ATTENTION = re.compile(r"(.+\.attention\.)(qkv|out)\.weight")


def _parts(name: str, shape: tuple[int, ...]) -> tuple[tuple[str, int, int], ...]:
    m = _ATTENTION.fullmatch(name)
    if not m:
        return ()
    if m.group(2) == "out":
        return ((f"{m.group(1)}to_out.0", 0, shape[0]),)
    rows = shape[0] // 3
    return tuple((f"{m.group(1)}{part}", i * rows, rows) for i, part in enumerate(("to_q", "to_k", "to_v")))


def dit_tensors(dit, expert: str = "") -> tuple[list[DitTensor], list[Path]]:
    """Family.dit_tensors for Z-Image (one DiT: `expert` is unused)."""
    from musubi_pipe.models.files import safetensors_header
    from musubi_pipe.models.zimage.locate import check_dit
    from musubi_pipe.models.zimage.names import dit_layout, strip_prefix

    values = [dit] if not isinstance(dit, (list, tuple)) else list(dit)
    if len(values) != 1:
        raise NotADit(f"{DIT_KEY}: a Z-Image DiT is one file (the first of its shards) or folder, not {len(values)} "
                      "paths")
    try:
        source = check_dit(values[0], DIT_KEY)
    except ConfigError as e:
        raise NotADit("; ".join(f"{key} {message}" for key, message in e.problems)) from None
    files = list(source.files) if source.kind != "pretrained" else sorted(Path(source.path).glob("*.safetensors"))
    headers = {}
    for path in files:
        try:
            headers[path] = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .safetensors file ({e}); re-download it") from None
    names = {strip_prefix(k) for header in headers.values() for k in header}
    if dit_layout(names) == "official":
        return [DitTensor(path, key, strip_prefix(key), info["dtype"], tuple(info["shape"]),
                          parts=_parts(strip_prefix(key), tuple(info["shape"])))
                for path, header in headers.items() for key, info in header.items()], files
    from musubi_pipe.models.statedict import read_state_dict
    from musubi_pipe.models.zimage.keymap import dit_to_official
    from musubi_pipe.network.safetensors_stream import DTYPE_CODES

    state = dit_to_official({strip_prefix(k): v for k, v in read_state_dict(files, DIT_KEY).items()})
    code_of = {dtype: code for code, dtype in DTYPE_CODES.items()}
    return [DitTensor(source.path, name, name, code_of[t.dtype], tuple(t.shape), loaded=t,
                      parts=_parts(name, tuple(t.shape))) for name, t in state.items()], files
