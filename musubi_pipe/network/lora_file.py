"""LoRA .safetensors files in the musubi/sd-scripts layout: atomic writes, sd-scripts hashes, `ss_*` + modelspec metadata."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from musubi_pipe.fileio import fsync_dir, temp_beside
from musubi_pipe.errors import UserError

_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """Return (sshs_model_hash, sshs_legacy_hash) the way sd-scripts computes them.

    Only the `ss_*` metadata enter the serialisation, so user-facing keys (titles, hashes) can change without changing
    the hashes. The model hash covers the tensor payload after the header; the legacy hash a 64 KiB slice at 1 MiB.
    """
    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(memoryview(blob)[8 + header_len :]).hexdigest()
    legacy = memoryview(blob)[_LEGACY_HASH_OFFSET : _LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]
    return model_hash, hashlib.sha256(legacy).hexdigest()[:8]


def _implementation(arch: str) -> str | None:
    """The family's `modelspec_implementation` (None for an architecture not registered here)."""
    from musubi_pipe.models import family_names, get_family

    return get_family(arch).modelspec_implementation if arch in family_names() else None


def save_lora_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` + `metadata` (with sd-scripts hashes added) to `path`; a reader never sees a partial file."""
    path = Path(path)
    model_hash, legacy_hash = model_hashes(tensors, metadata)
    full_metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    fd, tmp = temp_beside(path)  # same folder, so os.replace is an atomic rename
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors.torch.save(tensors, full_metadata))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)



def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA .safetensors file: (tensors on the CPU, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .safetensors LoRA file ({e})") from e
    return tensors, metadata


def build_metadata(
    *,
    arch: str,
    modelspec_arch: str,
    network_module: str,
    network_dim,
    network_alpha,
    base_model: str,
    steps: int,
    epoch: int,
    seed: int,
    learning_rate,
    extra: dict | None = None,
    title: str | None = None,
) -> dict[str, str]:
    """The sd-scripts/musubi `ss_*` training metadata plus SAI ModelSpec keys, all values as strings.

    `arch` is the full architecture name (`wan`), `modelspec_arch` the ModelSpec id (`wan2.1`); `extra` (e.g.
    `ss_training_fingerprint`, `ss_network_args`) is merged in last and may override anything.
    """
    now = time.time()
    metadata = {
        "ss_base_model_version": arch,
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_sd_model_name": os.path.basename(str(base_model)),
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_seed": seed,
        "ss_learning_rate": learning_rate,
        "ss_training_finished_at": now,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{modelspec_arch}/lora",
        "modelspec.title": title or f"LoRA@{now}",
        # Local time without microseconds or offset, as musubi writes it.
        "modelspec.date": datetime.fromtimestamp(int(now)).isoformat(),
    }
    implementation = _implementation(arch)
    if implementation:  # the upstream repository of the model code, as sd-scripts/musubi write it
        metadata["modelspec.implementation"] = implementation
    metadata.update(extra or {})
    return {k: str(v) for k, v in metadata.items()}
