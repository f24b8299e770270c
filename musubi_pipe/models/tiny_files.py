"""What every family's tiny-model builder shares: seeded construction and deterministic, atomic file writes.

    model = seeded(7, lambda: Model(config))        # the same weights on every call, caller's RNG untouched
    write_file(path, torch_bytes(state))            # atomic; a file already holding these bytes is left alone
    save_pretrained_files(model, folder)            # save_pretrained, file by file through write_file

Used by models/<family>/tiny*.py, which write the tiny models tests and demos run on in users' formats.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch


def seeded(seed: int, build):
    """`build()` under a private RNG stream seeded with `seed`: same weights every call, caller's RNG left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, unless the file already holds exactly these bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def torch_bytes(obj) -> bytes:
    """`torch.save` bytes of `obj` (to a buffer: the archive name inside would otherwise follow the file name)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def save_pretrained_files(obj, folder: Path) -> None:
    """`obj.save_pretrained` into a scratch folder, then move each file into `folder` through `write_file`."""
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers shows one for a single tiny shard
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
            obj.save_pretrained(scratch)
            for f in sorted(Path(scratch).iterdir()):
                write_file(folder / f.name, f.read_bytes())
    finally:
        if bars:
            hf_logging.enable_progress_bar()
