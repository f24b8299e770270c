"""Atomic, complete training checkpoints: everything needed to continue exactly where a run stopped.

A checkpoint is a folder `step_00000020/` holding the LoRA weights (safetensors), the optimizer and
scheduler states and RNG states (torch.save, read back with weights_only=True) and `state.json`
(step, epoch, position in the epoch, Python RNG). It is written under a temporary name and renamed
into place; a folder without its `COMPLETE` marker is ignored. Only the newest `keep` survive.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from musubi_pipe.errors import storage_errno

COMPLETE = "COMPLETE"


def save_checkpoint(root: Path, step: int, *, network_state: dict, optimizer, scheduler, generator, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically and prune older ones; return its folder."""
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, network_state, optimizer, scheduler, generator, state, step)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays
        code = storage_errno(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(final)) from err
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, network_state: dict, optimizer, scheduler, generator, state: dict, step: int) -> None:
    tmp.mkdir(parents=True)
    # serialized in memory and written by Python, so a full disk raises OSError (torch.save and safetensors
    # would report it as their own errors without the errno)
    (tmp / "network.safetensors").write_bytes(
        save({k: v.detach().contiguous().cpu() for k, v in network_state.items()}))
    states = io.BytesIO()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        states,
    )
    (tmp / "states.pt").write_bytes(states.getbuffer())
    python_state = random.getstate()
    doc = dict(state, step=step, python_random=[python_state[0], list(python_state[1]), python_state[2]])
    (tmp / "state.json").write_text(json.dumps(doc))
    (tmp / COMPLETE).write_text("")


def complete_checkpoints(root: Path) -> list[Path]:
    """Return the complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def load_checkpoint(path: Path, *, optimizer, scheduler, generator) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and RNG states from `path`; return (network_state, state)."""
    states = torch.load(path / "states.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch_cpu"])
    if states["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state.pop("python_random")
    random.setstate((version, tuple(internal), gauss))
    return load_file(str(path / "network.safetensors")), state
