"""Validation loss on held-out items, comparable from one step to the next.

`split_records` holds out `training.validation_split` of the cached items (chosen by a hash of each
item's key, so the same items are held out on every run and resume, whatever the data order). The
validation loss of an item is its flow-matching loss at fixed timesteps (VALIDATION_TIMESTEPS) with
noise seeded by the item's key: the same inputs at every evaluation, so the curve shows what the
LoRA learned and not which t and noise happened to be drawn. LoRA dropouts are off while evaluating.
"""

from __future__ import annotations

import hashlib

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


def noise_seed(record: dict) -> int:
    """The seed of an item's validation noise."""
    return int(_unit("noise:" + record_id(record)) * 2**62)
