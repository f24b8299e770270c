"""Every LoRA candidate of every trainable tiny task gets a gradient in a real training step.

A candidate whose gradient is exactly zero would train nothing and no loss value would show it: this is how
Wan2.1 I2V's k_img / v_img went untrained while the tiny model's text was shorter than the 512 tokens diffusers
counts back from to find the CLIP tokens. The step is the trainer's: cached tensors from the tiny VAE, CLIP and
text encoder, Family.training_inputs and Family.predict, every expert's DiT. lora_up starts random (not zero),
so lora_down gets a gradient too.
"""

from __future__ import annotations

import pytest
import torch

from musubi_pipe.models import family_names, get_family
from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.training.timesteps import TimestepSpec, model_timesteps, weighted_mse

pytestmark = pytest.mark.pipeline


def tiny_trainable_tasks(arch: str) -> list[str]:
    """The family's tiny tasks (Family.tiny_models) that train: inference-only ones (SkyReels V1 I2V) do not."""
    family = get_family(arch)
    return [task for task in family.tiny_models if not family.check_stages({"task": task}, ["train"])]


CASES = [(arch, task) for arch in family_names() for task in tiny_trainable_tasks(arch)]


def test_every_family_and_tiny_task_is_covered():
    assert {arch for arch, _ in CASES} == set(family_names())
    assert ("wan", "tiny-i2v") in CASES and ("hunyuan_video", "tiny-t2v") in CASES and ("zimage", "tiny") in CASES
    assert len(CASES) == 7


@pytest.mark.parametrize("arch,task", CASES)
def test_every_lora_candidate_gets_a_gradient(arch, task, tmp_path_factory):
    family = get_family(arch)
    model_cfg = {"arch": arch, "task": task, **family.build_tiny(tmp_path_factory.mktemp("tiny"), task)}
    g = torch.Generator().manual_seed(0)
    frames = 1 if family.image_only else 5
    vae = family.load_vae(model_cfg, "cpu", torch.float32)
    cached = vae.encode_item(torch.rand(1, 3, frames, 64, 64, generator=g) * 2 - 1)
    latents = cached.pop("latents")
    embeds = family.load_text_encoder(model_cfg, "cpu", torch.float32).encode(["a red circle moves to the left"])
    spec = TimestepSpec.from_config({})
    torch.manual_seed(0)
    for expert in family.experts(model_cfg):
        dit = family.load_dit(model_cfg, "cpu", torch.float32, expert.name)
        targets = family.lora_targets(dit)  # every candidate, default excludes included
        network = LoRANetwork(targets, 4, 4.0)
        with torch.no_grad():
            for module in network.loras.values():
                module.lora_up.weight.normal_(0, 0.1)
        network.apply_to()
        t = torch.tensor([(expert.t_min + min(expert.t_max, 1.0)) / 2])
        noise = torch.randn(latents.shape, generator=g)
        inputs = family.training_inputs(model_cfg, latents, noise, t, model_timesteps(t, spec), cached, g)
        pred = family.predict(dit, inputs.noisy, inputs.timesteps, embeds, inputs.cond)
        weighted_mse(pred.float(), inputs.target.float(), None, inputs.mask).backward()
        untrained = [name for name, module in network.loras.items()
                     if not (module.lora_down.weight.grad.abs().sum() > 0 and module.lora_up.weight.grad.abs().sum() > 0)]
        assert not untrained, f"{task} {expert.name or 'dit'}: no gradient for {untrained}"
        assert len(network.loras) == len(targets)
        if task == "tiny-i2v":
            assert any(name.endswith("cross_attn_k_img") for name in network.loras)
        network.restore()
