"""Writing a large safetensors file one tensor at a time, so memory never holds the whole file.

safetensors' own `save_file` needs every tensor in memory at once. Here the header is planned up front
from names, dtypes and shapes (`plan_layout`), then `write_streaming` writes the tensors one by one
as a producer returns them, into a temp file that is fsynced, re-opened and checked with safetensors
(`verify_file`) and only then moved into place. Used by network.merge (a LoRA merged into a DiT).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from musubi_pipe.fileio import fsync_dir, temp_beside

# safetensors dtype codes <-> torch dtypes
DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def plan_layout(names: Iterable[str], dtypes: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
                metadata: Mapping[str, str]) -> tuple[list[str], bytes, int]:
    """(write order, header bytes incl. length prefix and padding, total data bytes) of the output file.

    Tensors are ordered by element size (largest first), then name, as safetensors orders them, so every tensor
    starts aligned to its element size; the header is padded with spaces so the data starts 8-byte aligned.
    """
    order = sorted(names, key=lambda n: (-DTYPE_CODES[dtypes[n]].itemsize, n))
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        size = DTYPE_CODES[dtypes[name]].itemsize
        for dim in shapes[name]:
            size *= dim
        header[name] = {"dtype": dtypes[name], "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return order, len(text).to_bytes(8, "little") + text, offset


def write_streaming(path: Path, header: bytes, data_bytes: int, order: Sequence[str],
                    produce: Callable[[str], torch.Tensor]) -> None:
    """Write a safetensors file atomically: `header` (from plan_layout), then `produce(name)` for each name of
    `order`, one tensor at a time; the temp file is re-opened with safetensors before it replaces `path`."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for name in order:
                tensor = produce(name)
                raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(raw))
                del tensor, raw
            f.flush()
            os.fsync(f.fileno())
        verify_file(Path(tmp), header, data_bytes)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)



def verify_file(path: Path, header: bytes, data_bytes: int) -> None:
    """Check a written file: its size, and that safetensors opens it with the planned tensors, dtypes and shapes."""
    expected = json.loads(header[8:])
    size = path.stat().st_size
    if size != len(header) + data_bytes:
        raise RuntimeError(f"{path}: wrote {size} bytes, planned {len(header) + data_bytes}; disk full?")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if dict(f.metadata() or {}) != expected["__metadata__"] or set(f.keys()) != set(expected) - {"__metadata__"}:
                raise RuntimeError(f"{path}: the written header does not hold the planned tensors")
            for name in f.keys():
                part = f.get_slice(name)
                if part.get_shape() != expected[name]["shape"] or part.get_dtype() != expected[name]["dtype"]:
                    raise RuntimeError(f"{path}: tensor {name} was written with the wrong dtype or shape")
    except SafetensorError as e:
        raise RuntimeError(f"{path}: the written file is not valid safetensors ({e})") from e
