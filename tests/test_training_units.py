"""Timestep sampling against its formulas, and batching rules (no models)."""

import math

import pytest
import torch

from musubi_pipe.training.batches import epoch_batches, group_items
from musubi_pipe.training.timesteps import noisy_input, sample_t


def _quantiles(t: torch.Tensor, qs=(0.1, 0.5, 0.9)) -> list[float]:
    return [float(torch.quantile(t, q)) for q in qs]


def test_timestep_distributions_follow_their_formulas():
    n = 200_000
    uniform = sample_t(n, "uniform", generator=torch.Generator().manual_seed(0))
    assert _quantiles(uniform) == pytest.approx([0.1, 0.5, 0.9], abs=0.01)
    # sigmoid(s z), z ~ N(0,1): quantile q is sigmoid(s * Phi^-1(q)); Phi^-1(0.9) = 1.2816
    sig = sample_t(n, "sigmoid", sigmoid_scale=2.0, generator=torch.Generator().manual_seed(0))
    expected = [1 / (1 + math.exp(-2.0 * z)) for z in (-1.2816, 0.0, 1.2816)]
    assert _quantiles(sig) == pytest.approx(expected, abs=0.01)
    # shift S: t = S t0 / (1 + (S - 1) t0) is monotone, so quantiles map through it
    shifted = sample_t(n, "shift", shift=3.0, generator=torch.Generator().manual_seed(0))
    base = [1 / (1 + math.exp(-z)) for z in (-1.2816, 0.0, 1.2816)]
    assert _quantiles(shifted) == pytest.approx([3 * b / (1 + 2 * b) for b in base], abs=0.01)
    with pytest.raises(ValueError, match="training.timestep_sampling"):
        sample_t(1, "nope")


def test_noisy_input_is_the_rectified_flow_interpolation():
    x0, noise, t = torch.ones(2, 3), torch.full((2, 3), 3.0), torch.tensor([0.0, 0.25])
    xt, target = noisy_input(x0, noise, t)
    assert torch.equal(xt, torch.tensor([[1.0] * 3, [1.5] * 3]))
    assert torch.equal(target, torch.full((2, 3), 2.0))


def _record(i, dataset, bucket, frames):
    return {"dataset_index": dataset, "bucket": bucket, "frames": frames, "key": f"item{i}"}


def test_batches_never_mix_buckets_or_datasets_and_repeat():
    dataset_cfg = {"general": {"batch_size": 2}, "datasets": [{"num_repeats": 2}, {"batch_size": 3}]}
    index = [_record(0, 0, [64, 64], 1), _record(1, 0, [64, 64], 1), _record(2, 0, [48, 80], 1),
             _record(3, 1, [64, 64], 9), _record(4, 1, [64, 64], 9), _record(5, 1, [64, 64], 1)]
    groups = group_items(index, dataset_cfg)
    batches = epoch_batches(groups, dataset_cfg, seed=1, epoch=0)
    for batch in batches:
        assert len({(r["dataset_index"], tuple(r["bucket"]), r["frames"]) for r in batch}) == 1
    keys = sorted(r["key"] for batch in batches for r in batch)
    assert keys == sorted(["item0", "item0", "item1", "item1", "item2", "item2", "item3", "item4", "item5"])
    sizes = sorted((b[0]["dataset_index"], len(b)) for b in batches)
    assert sizes == [(0, 2), (0, 2), (0, 2), (1, 1), (1, 2)]  # dataset 0: batch 2, repeats 2; dataset 1: batch 3
    assert epoch_batches(groups, dataset_cfg, seed=1, epoch=0) == batches  # a pure function of (seed, epoch)
    assert epoch_batches(groups, dataset_cfg, seed=1, epoch=1) != batches


def test_validation_split_is_stable_and_disjoint():
    from musubi_pipe.training.validation import split_records

    records = [{"dataset_index": i % 2, "key": f"item{i}_00000-001_64x64"} for i in range(200)]
    train, held = split_records(records, 0.2)
    assert 25 <= len(held) <= 55 and len(train) + len(held) == 200
    assert not {r["key"] for r in train} & {r["key"] for r in held}
    shuffled = list(reversed(records))
    assert sorted(r["key"] for r in split_records(shuffled, 0.2)[1]) == sorted(r["key"] for r in held)
    assert split_records(records, 0.0) == (records, [])
    assert len(split_records(records[:3], 0.01)[1]) == 1  # a fraction > 0 holds out at least one item
