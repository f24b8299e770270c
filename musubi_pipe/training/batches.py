"""Batches of cached items for training, in a data order fixed by (seed, epoch).

Batches never mix datasets, buckets, frame counts or control sizes (their tensors must stack); each dataset uses its own batch_size and
num_repeats. An epoch's order is a pure function of (seed, epoch), so a resumed run that knows its
epoch and position in it continues with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import random
from collections import defaultdict


def group_items(index: list[dict], dataset_cfg: dict) -> dict[tuple, list[dict]]:
    """Group latent-index records by (dataset, bucket, frames, control buckets), repeated num_repeats times."""
    general = dataset_cfg.get("general") or {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in index:
        entry = {**general, **dataset_cfg["datasets"][record["dataset_index"]]}
        controls = tuple(tuple(b) for b in record.get("control_buckets", ()))
        key = (record["dataset_index"], tuple(record["bucket"]), record["frames"], controls)
        groups[key].extend([record] * int(entry.get("num_repeats", 1)))
    return dict(sorted(groups.items()))


def epoch_batches(groups: dict[tuple, list[dict]], dataset_cfg: dict, seed: int, epoch: int) -> list[list[dict]]:
    """Return the batches of one epoch: items shuffled within groups, then batch order shuffled."""
    general = dataset_cfg.get("general") or {}
    rng = random.Random(seed * 1_000_003 + epoch)
    batches = []
    for key, records in groups.items():
        entry = {**general, **dataset_cfg["datasets"][key[0]]}
        size = int(entry.get("batch_size", 1))
        shuffled = list(records)
        rng.shuffle(shuffled)
        batches.extend(shuffled[i : i + size] for i in range(0, len(shuffled), size))
    rng.shuffle(batches)
    return batches
