"""The ema and merge stages in a run: after train, cached like the others."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import stage

pytestmark = pytest.mark.pipeline

AFTER_TRAIN = "pipeline.stages=[cache_latents,cache_text,train,{}]"


def test_ema_stage_averages_the_checkpoints(demo):
    from musubi_pipe.network.ema import post_hoc_ema

    record = demo(AFTER_TRAIN.format("ema"), "training.save_every_n_steps=2", "ema.beta=0.8")
    ema_file = Path(stage(record, "ema")["artifact"]) / "demo_lora_ema.safetensors"
    checkpoints = [Path(p) for p in record["lora_checkpoints"]] + [Path(p) for p in record["lora"]]
    assert [p.name for p in checkpoints] == ["demo_lora-step00000002.safetensors", "demo_lora-step00000004.safetensors",
                                             "demo_lora.safetensors"]
    expected, _ = post_hoc_ema(checkpoints, beta=0.8)
    got = load_file(str(ema_file))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with safe_open(str(ema_file), "pt") as f:
        assert '"beta": 0.8' in f.metadata()["ss_ema"] and f.metadata()["ss_steps"] == "6"
    again = demo(AFTER_TRAIN.format("ema"), "training.save_every_n_steps=2", "ema.beta=0.8")
    assert stage(again, "ema")["status"] == "cached"
    changed = demo(AFTER_TRAIN.format("ema"), "training.save_every_n_steps=2", "ema.beta=0.9")
    assert (stage(changed, "train")["status"], stage(changed, "ema")["status"]) == ("cached", "ran")


def test_merge_stage_writes_a_dit_that_loads(demo, models_dir):
    from musubi_pipe.models import get_family
    from musubi_pipe.network.formats import delta_weights, read_lora

    record = demo(AFTER_TRAIN.format("merge"), "merge.multiplier=0.5")
    merged = Path(stage(record, "merge")["artifact"]) / "demo_lora_merged.safetensors"
    assert Path(record["merged"][0]) == merged
    base_file = next(models_dir.glob("**/wan_tiny_dit.safetensors"))
    base, out = load_file(str(base_file)), load_file(str(merged))
    assert base.keys() == out.keys()
    lora = read_lora(load_file(record["lora"][0]))[0]
    for module, delta in delta_weights(lora).items():
        expected = base[f"{module}.weight"].float() + 0.5 * delta
        torch.testing.assert_close(out[f"{module}.weight"].float(), expected, rtol=1e-3, atol=1e-4)
    untouched = [k for k in base if not any(k.startswith(m + ".") for m in lora)]
    assert untouched and all(torch.equal(base[k], out[k]) for k in untouched)
    family = get_family("wan")
    dit = family.load_dit({"arch": "wan", "task": "tiny-t2v", "dit": str(merged)}, "cpu", torch.float32)
    assert sum(p.numel() for p in dit.parameters()) > 0
