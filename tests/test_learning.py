"""Learning works: a LoRA trained on one item pulls samples of its caption towards that item.

This proves the training target (noise - x0), the timestep convention (model sees 1000 t) and the
sampler (Euler over sigma 1 -> 0) agree: if any of them disagreed, the LoRA would not help.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import stage

pytestmark = pytest.mark.pipeline


def _relative_error(sample: torch.Tensor, target: torch.Tensor) -> float:
    return float((sample - target).norm() / target.norm())


def test_lora_pulls_samples_to_the_trained_item(demo, tmp_path):
    images = demo.root / "demo_data" / "images"
    demo("pipeline.stages=[cache_latents]")  # writes the demo data
    one = tmp_path / "one"
    one.mkdir()
    for suffix in (".png", ".txt"):
        shutil.copy(images / f"red_circle{suffix}", one / f"red_circle{suffix}")
    caption = (one / "red_circle.txt").read_text().strip()
    common = [
        f"dataset.datasets=[{{image_directory:{one}}}]",
        "training.max_train_steps=800",
        "training.save_every_n_steps=0",
        "optimizer.lr=3e-3",
        "network.network_dim=32",
        "network.network_alpha=32",
        "sampling.steps=20",
        "sampling.guidance_scale=1.0",
        f"sampling.prompts=[{{prompt:'{caption}',frames:1,seed:7}}]",
    ]
    trained = demo(*common)
    base = demo(*common, "sampling.lora_multiplier=0.0")
    index = json.loads((Path(stage(trained, "cache_latents")["artifact"]) / "index.json").read_text())
    target = load_file(str(demo.root / "cache" / "items" / "latents" / index[0]["entry"][:2] / f"{index[0]['entry']}.safetensors"))["latents"]

    def sampled(record):
        return load_file(str(Path(stage(record, "sample")["artifact"]) / "sample_00.safetensors"))["latents"]

    with_lora, without = _relative_error(sampled(trained), target), _relative_error(sampled(base), target)
    print(f"relative latent error: with LoRA {with_lora:.3f}, base model {without:.3f}")
    assert with_lora <= 0.5 * without
