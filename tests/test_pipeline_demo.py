"""Tiny end-to-end runs of the demo recipe on CPU: stages, caching, item counts, plans, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musubi_pipe.errors import ConfigError, UserError
from tests.conftest import stage

pytestmark = pytest.mark.pipeline

STAGES = ["cache_latents", "cache_text", "train", "sample"]


def test_cold_then_warm(demo):
    cold = demo()
    assert [s["name"] for s in cold["stages"]] == STAGES
    assert [s["status"] for s in cold["stages"]] == ["ran"] * 4
    latents = stage(cold, "cache_latents")
    assert (latents["items_total"], latents["items_computed"], latents["items_skipped"]) == (5, 5, 0)
    # 5 distinct captions (the 2 sample prompts are among them) + the empty negative prompt
    assert (stage(cold, "cache_text")["items_total"], stage(cold, "cache_text")["items_computed"]) == (6, 6)
    assert stage(cold, "train")["steps"] == 6
    assert [Path(p).suffix for p in cold["samples"]] == [".png", ".mp4"]
    assert all(Path(p).is_file() for p in cold["lora"] + cold["samples"])
    run_dir = Path(cold["run_dir"])
    assert (run_dir / "lora" / "demo_lora.safetensors").resolve() == Path(cold["lora"][0])
    assert json.loads((run_dir / "run.json").read_text()) == cold
    assert (run_dir / "config.yaml").is_file()
    for record in cold["stages"]:
        assert set(record) >= {"name", "status", "fingerprint", "reason", "artifact", "seconds"}

    warm = demo()
    assert [s["status"] for s in warm["stages"]] == ["cached"] * 4
    assert [s["fingerprint"] for s in warm["stages"]] == [s["fingerprint"] for s in cold["stages"]]
    assert stage(warm, "cache_latents")["items_computed"] == 0
    assert warm["lora"] == cold["lora"] and warm["samples"] == cold["samples"]


def _add_image(root: Path, name: str, caption: str):
    images = root / "demo_data" / "images"
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = (200, 30, 90)
    Image.fromarray(pixels).save(images / f"{name}.png")
    (images / f"{name}.txt").write_text(caption)


def test_item_level_caches(demo, tmp_path):
    demo()
    _add_image(demo.root, "zz_new", "a magenta square on a black background")
    plan = demo("pipeline.dry_run=true")["plan"]
    assert plan[0]["reason"] == "1 new item" and plan[1]["reason"] == "1 new item"
    added = demo("pipeline.stages=[cache_latents,cache_text]")
    assert stage(added, "cache_latents")["items_computed"] == 1
    assert stage(added, "cache_text")["items_computed"] == 1

    caption = next((demo.root / "demo_data" / "images").glob("*.txt"))
    caption.write_text(caption.read_text() + ", edited")
    edited = demo("pipeline.stages=[cache_latents,cache_text]")
    assert stage(edited, "cache_latents")["status"] == "cached"
    assert stage(edited, "cache_text")["items_computed"] == 1

    # another VAE (same architecture, different weights): every latent again, no caption
    from safetensors.torch import load_file, save_file

    vae_file = next(Path(p) for p in demo.root.parent.glob("**/wan_tiny_vae.safetensors"))
    other = tmp_path / "other_vae.safetensors"
    save_file({k: v * 1.01 if v.dim() > 1 else v for k, v in load_file(str(vae_file)).items()}, str(other))
    new_vae = demo("pipeline.stages=[cache_latents,cache_text]", f"model.vae={other}")
    assert stage(new_vae, "cache_latents")["items_computed"] == 6
    assert stage(new_vae, "cache_text")["status"] == "cached"


def test_plan_reasons_and_modes(demo):
    demo()
    plan = demo("pipeline.dry_run=true", "optimizer.lr=0.002")["plan"]
    assert [p["cached"] for p in plan][:4] == [True, True, False, False]
    assert [p["reason"] for p in plan][4:] == ["not needed"] * 3  # ema, merge, generate: not selected
    assert plan[2]["reason"] == "optimizer.lr 0.001 -> 0.002"
    assert plan[3]["reason"] == "train output changed"
    with pytest.raises(UserError, match="pipeline.mode=frozen: stage train"):
        demo("optimizer.lr=0.002", "pipeline.mode=frozen")
    forced = demo("pipeline.mode=force", "pipeline.stages=[cache_text]")
    assert [s["status"] for s in forced["stages"]] == ["ran"]
    assert stage(forced, "cache_text")["items_computed"] == 6


def test_validation_reports_everything_before_loading(demo, tmp_path):
    with pytest.raises(ConfigError) as err:
        demo("model=wan21_t2v_14b", "+optimizer.lrr=1", "+dataset.datasets.0.image_dir=x", "network.save_dtype=int8")
    keys = {key for key, _ in err.value.problems}
    assert keys == {
        "model.dit", "model.vae", "model.t5", "model.t5_tokenizer",
        "optimizer.lrr", "dataset.datasets[0].image_dir", "network.save_dtype",
    }
    assert "did you mean 'lr'" in str(err.value)
    assert "did you mean 'image_directory'" in str(err.value)
    with pytest.raises(ConfigError, match=r"model.dit.*does not exist"):
        demo(f"model.dit={tmp_path}/missing.safetensors")
    with pytest.raises(ConfigError, match=r"dataset.datasets\[0\].image_directory"):
        demo(f"dataset.datasets.0.image_directory={tmp_path}/nothing_here")
    assert not (tmp_path / "cache" / "train").exists()  # nothing ran, nothing half-written


def test_bad_media_is_skipped_and_counted(demo):
    images = demo.root / "demo_data" / "images"
    demo("pipeline.stages=[cache_latents]")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "broken.txt").write_text("a broken picture")
    (images / "uncaptioned.png").write_bytes((images / next(p.name for p in images.glob("*.png"))).read_bytes())
    record = demo("pipeline.stages=[cache_latents]")
    latents = stage(record, "cache_latents")
    assert latents["items_skipped"] == 2 and latents["items_computed"] == 0
    reasons = {Path(s["path"]).name: s["reason"] for s in latents["skipped"]}
    assert set(reasons) == {"broken.png", "uncaptioned.png"}
    assert "caption" in reasons["uncaptioned.png"]


def test_trained_lora_loads_in_diffusers_with_zero_unmatched_keys(demo, models_dir):
    import logging

    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    from musubi_pipe.models import get_family

    record = demo("pipeline.stages=[cache_latents,cache_text,train]")
    family = get_family("wan")
    model_cfg = {"arch": "wan", "task": "tiny-t2v", "dit": str(models_dir / "wan_tiny" / "wan_tiny_dit.safetensors")}
    dit = family.load_dit(model_cfg, "cpu", __import__("torch").float32)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        converted = WanPipeline.lora_state_dict(record["lora"][0])
        dit.load_lora_adapter(converted, prefix="transformer", adapter_name="t")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "keys" in r.getMessage() or "No LoRA" in r.getMessage()]
    loaded = set(get_peft_model_state_dict(dit, adapter_name="t"))
    assert loaded == {k.removeprefix("transformer.") for k in converted}
    assert len(loaded) == 2 * 10 * 2  # 2 blocks x 10 linears x (A, B)


def test_interrupted_training_resumes(demo):
    """A train stage that dies after a checkpoint resumes from it and ends where a clean run ends."""
    from safetensors.torch import load_file

    from musubi_pipe.training import loop

    clean = demo("pipeline.stages=[cache_latents,cache_text,train]")
    shutil.rmtree(demo.root / "cache" / "train")
    original_step = loop.Trainer.training_loss
    calls = {"n": 0}

    def dying(self, batch, index):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return original_step(self, batch, index)

    loop.Trainer.training_loss = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            demo("pipeline.stages=[cache_latents,cache_text,train]")
    finally:
        loop.Trainer.training_loss = original_step
    assert not list((demo.root / "cache" / "train").glob("[0-9a-f]*"))  # nothing published
    resumed = demo("pipeline.stages=[cache_latents,cache_text,train]")
    assert stage(resumed, "train")["resumed_from_step"] == 3
    a, b = load_file(clean["lora"][0]), load_file(resumed["lora"][0])
    assert all(__import__("torch").equal(a[k], b[k]) for k in a)
    assert stage(resumed, "train")["losses"] == stage(clean, "train")["losses"]
