"""Which cached items a training uses: dataset slices, and the held-out items of the validation loss.

`slice_records` keeps the items of `dataset.slice` of `dataset.num_slices` (for LORAID sweeps: one
LoRA per slice, every slice sharing the cached latents of the whole dataset).

`split_records` holds out `training.validation_split` of the cached items (chosen by a hash of each
item's key, so the same items are held out on every run and resume, whatever the data order). The
validation loss of an item is its flow-matching loss at fixed timesteps (VALIDATION_TIMESTEPS) with
noise seeded by the item's key: the same inputs at every evaluation, so the curve shows what the
LoRA learned and not which t and noise happened to be drawn. LoRA dropouts are off while evaluating.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _unit(text: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def record_id(record: dict) -> str:
    return f"{record['dataset_index']}:{record['key']}"


def split_records(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation) records; about `fraction` of the items are held out, at least one when fraction > 0."""
    if not fraction:
        return list(records), []
    held = [r for r in records if _unit(record_id(r)) < fraction]
    if not held and len(records) > 1:
        held = [min(records, key=lambda r: _unit(record_id(r)))]
    held_ids = {record_id(r) for r in held}
    train = [r for r in records if record_id(r) not in held_ids]
    if not train:
        raise ValueError(f"training.validation_split={fraction} holds out all {len(records)} items; lower it")
    return train, held


def slice_records(records: list[dict], slice_number: int, num_slices: int) -> list[dict]:
    """The items of slice `slice_number` (1-based) of `num_slices`: each media file (all its clips) goes to
    the slice a hash of (dataset, file name) picks, so adding or removing a file moves no other file."""
    if num_slices <= 1:
        return list(records)
    picked = [r for r in records
              if int(_unit(f"slice:{r['dataset_index']}:{Path(r['media_path']).name}") * num_slices) + 1 == slice_number]
    if not picked:
        raise ValueError(f"dataset.slice={slice_number} of dataset.num_slices={num_slices} holds no items; "
                         "use fewer slices")
    return picked


def noise_seed(record: dict) -> int:
    """The seed of an item's validation noise."""
    return int(_unit("noise:" + record_id(record)) * 2**62)
