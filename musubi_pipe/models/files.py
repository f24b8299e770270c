"""Torch-free helpers for finding weight files: existence checks, shard sets, pipeline subfolders, headers.

A `Source` says what a configured path is: kind "official" (state-dict files with the upstream key
names: one file or a shard set), "transformers_file" (one state-dict file with transformers/diffusers
key names, as ComfyUI repackages text and image encoders) or "pretrained" (a `from_pretrained` folder).
`safetensors_shapes` reads tensor shapes and dtypes from safetensors headers without importing torch,
so config validation can check a 28 GB checkpoint's variant in milliseconds.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from musubi_pipe.errors import ConfigError

UNSET = (None, "", "???")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")
SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.safetensors")
# files in a from_pretrained folder that determine its output (README, .gitattributes etc. do not)
FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model")


@dataclass(frozen=True)
class Source:
    """Where one model part's weights are (see the module doc for the kinds)."""

    kind: str
    path: Path
    files: tuple[Path, ...]


def existing(value, key: str, hint: str) -> Path:
    """Return `value` as a Path that exists; ConfigError on `key` (with `hint`) otherwise."""
    if value in UNSET:
        raise ConfigError([(key, f"not set; set {key}=<{hint}>")])
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError([(key, f"{path} does not exist; set {key}=<{hint}>")])
    return path


def subfolder(path: Path, name: str) -> Path:
    """A diffusers pipeline root holds each part in a subfolder; accept the root or the part folder."""
    return path / name if (path / name).is_dir() else path


def folder_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for pattern in FOLDER_PATTERNS for p in folder.glob(pattern) if p.is_file()))


def shard_set(path: Path, key: str) -> tuple[Path, ...]:
    """Return all shards of `name-00001-of-00003.safetensors` (or just `path`); a missing one is an error."""
    m = SHARD.fullmatch(path.name)
    if not m:
        return (path,)
    width, count = len(m["index"]), int(m["count"])
    shards = tuple(
        path.with_name(f"{m['stem']}-{i:0{width}d}-of-{m['count']}.safetensors") for i in range(1, count + 1)
    )
    for shard in shards:
        if not shard.is_file():
            message = f"shard {shard} is missing; download all {count} shards of {path.name} into {path.parent}"
            raise ConfigError([(key, message)])
    return shards


def state_dict_file(path: Path, key: str, hint: str) -> Path:
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ConfigError([(key, f"{path} is not a .safetensors/.pt/.pth file; set {key}=<{hint}>")])
    return path


def read_config(folder: Path, key: str) -> dict:
    """Return `folder/config.json` as a dict ({} when there is none); ConfigError on `key` if it is not JSON."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError([(key, f"{path} is not readable JSON ({e}); re-download it")]) from e


def safetensors_header(path: Path) -> dict:
    """Return the JSON header of a .safetensors file: {name: {"dtype", "shape", ...}, "__metadata__": ...}."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        return json.loads(f.read(length))


def safetensors_shapes(files) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """Return {tensor name: (dtype, shape)} over safetensors `files`; None if any file is not safetensors.

    Torch-free (reads only the headers). A file that is not valid safetensors raises ValueError.
    """
    shapes = {}
    for f in files:
        if Path(f).suffix != ".safetensors":
            return None
        try:
            header = safetensors_header(Path(f))
        except (OSError, ValueError, struct.error) as e:
            raise ValueError(f"{f} is not a readable .safetensors file ({e})") from e
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = (info["dtype"], tuple(info["shape"]))
    return shapes
