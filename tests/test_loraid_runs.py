"""LORAID in real runs: each ID trains exactly its units; several IDs load and merge together; the
checks that keep them apart (validation, overlapping files, EMA of different IDs)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_pipe.errors import ConfigError, UserError
from tests.conftest import stage

pytestmark = pytest.mark.pipeline

TRAIN = ["pipeline.stages=[cache_latents,cache_text,train]", "network.loraid_unit=submodule",
         "network.loraid_units_per_id=2", "training.save_every_n_steps=3"]


def _modules(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        allocation = json.loads(f.metadata()["ss_loraid_allocation"])
        keys = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}
    assert keys == {"lora_unet_" + m.replace(".", "_") for m in allocation["modules"]}
    return set(allocation["modules"])


def test_loraid_ids_train_disjoint_units_and_compose(demo, models_dir, tmp_path, caplog):
    from musubi_pipe.network.ema import post_hoc_ema
    from musubi_pipe.network.merge import merge_loras

    records = {k: demo(*TRAIN, f"network.loraid={k}") for k in (1, 2, 3)}
    files = {k: records[k]["lora"][0] for k in records}
    modules = {k: _modules(files[k]) for k in files}
    # tiny-t2v has 2 blocks x 3 sub-module groups = 6 units; 2 per ID, contiguous: ID 2 owns block 0's
    # feed-forward and block 1's self-attention
    assert modules[2] == {"blocks.0.ffn.0", "blocks.0.ffn.2"} | {f"blocks.1.self_attn.{p}" for p in "qkvo"}
    assert not (modules[1] & modules[2] or modules[1] & modules[3] or modules[2] & modules[3])
    assert all(stage(records[k], "cache_latents")["items_computed"] == 0 for k in (2, 3))  # one cache for all IDs
    with safe_open(files[3], "pt") as f:
        assert f.metadata()["ss_loraid"] == "3"

    loras = ",".join(f"{{path:'{files[k]}',multiplier:1.0}}" for k in (1, 2, 3))
    with caplog.at_level("WARNING", logger="musubi_pipe"):
        together = demo("pipeline.stages=[generate]", "dataset.datasets=[]", f"sampling.loras=[{loras}]",
                        r"sampling.prompts=[{prompt:'a red circle',frames:1,seed:1,steps:2}]")
    assert stage(together, "generate")["status"] == "ran" and "both change" not in caplog.text
    with pytest.raises(UserError, match="LORAID files must not overlap"):
        demo("pipeline.stages=[generate]", "dataset.datasets=[]",
             f"sampling.loras=[{{path:'{files[1]}'}},{{path:'{files[1]}',multiplier:0.5}}]",
             r"sampling.prompts=[{prompt:'a red circle',frames:1,seed:1,steps:2}]")

    # merging several IDs into the DiT: the same weights in any order (their modules are disjoint)
    dit = next(models_dir.glob("**/wan_tiny_dit.safetensors"))
    merge_loras([dit], [(files[1], 1.0), (files[2], 0.7), (files[3], 1.0)], tmp_path / "a.safetensors")
    merge_loras([dit], [(files[3], 1.0), (files[1], 1.0), (files[2], 0.7)], tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # post-hoc EMA keeps an ID's allocation and refuses to average different IDs
    checkpoints = [Path(p) for p in records[2]["lora_checkpoints"]] + [Path(files[2])]
    _, metadata = post_hoc_ema(checkpoints, beta=0.9)
    assert metadata["ss_loraid"] == "2" and json.loads(metadata["ss_loraid_allocation"])["loraid"] == 2
    with pytest.raises(UserError, match="LORAID"):
        post_hoc_ema([files[1], files[2]], beta=0.9, sort=False)


def test_loraid_settings_are_checked_before_loading(demo):
    with pytest.raises(ConfigError) as err:
        demo(*TRAIN, "network.loraid=4", r"network.include_patterns=['blocks\.0\..*']")
    keys = {k for k, _ in err.value.problems}
    assert keys == {"network.loraid", "network.include_patterns"}
    assert "capacity for loraid_units_per_id=2 is 3" in str(err.value)


def test_dataset_slices_are_disjoint_and_stable():
    from musubi_pipe.training.validation import slice_records

    records = [{"dataset_index": 0, "media_path": f"/data/v{i}.mp4", "key": f"v{i}_00000-009_64x64"} for i in range(60)]
    records += [dict(r, key=r["key"].replace("009", "017")) for r in records[:10]]  # a second clip of ten videos
    slices = [slice_records(records, k, 3) for k in (1, 2, 3)]
    assert sum(len(s) for s in slices) == len(records)
    owners = {}
    for k, part in enumerate(slices, start=1):
        for r in part:
            assert owners.setdefault(r["media_path"], k) == k  # all clips of a video in one slice
    moved = [slice_records(records + [{"dataset_index": 0, "media_path": "/data/new.mp4", "key": "n"}], k, 3)
             for k in (1, 2, 3)]
    assert all(set(map(id, slices[k])) <= set(map(id, moved[k])) for k in range(3))  # adding a file moves none


def test_loraid_on_two_experts_trains_only_the_experts_holding_its_units(demo):
    # tiny Wan2.2 A14B: 2 experts x 2 blocks = 4 block units; contiguous ID 2 is the high-noise block 1,
    # interleaved ID 1 with 2 units is high block 0 and low block 1
    contiguous = demo("model=wan_tiny_t2v_a14b", *TRAIN[:1], "network.loraid=2")
    assert [Path(p).name for p in contiguous["lora"]] == ["demo_lora_high_noise.safetensors"]
    assert _modules(contiguous["lora"][0]) == {f"blocks.1.{m}" for m in (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
        "cross_attn.o", "ffn.0", "ffn.2")}
    interleaved = demo("model=wan_tiny_t2v_a14b", *TRAIN[:1], "network.loraid=1", "network.loraid_units_per_id=2",
                       "network.loraid_layout=interleaved")
    files = {Path(p).name: p for p in interleaved["lora"]}
    assert set(files) == {"demo_lora_high_noise.safetensors", "demo_lora_low_noise.safetensors"}
    assert {m.split(".")[1] for m in _modules(files["demo_lora_high_noise.safetensors"])} == {"0"}
    assert {m.split(".")[1] for m in _modules(files["demo_lora_low_noise.safetensors"])} == {"1"}
