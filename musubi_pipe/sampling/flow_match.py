"""Flow-matching sampling with classifier-free guidance, on diffusers' FlowMatchEulerDiscreteScheduler.

The DiT predicts v = noise - x0 at timestep 1000 * sigma (the training convention), and the Euler
scheduler integrates sigma from 1 to 0 with the given shift. Guidance: v = v_neg + g (v_pos - v_neg);
with g == 1 the negative pass is skipped.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def sample_latents(family, dit, *, shape, positive, negative, steps: int, guidance_scale: float, shift: float, seed: int, device, dtype, progress=True) -> torch.Tensor:
    """Return denoised latents of `shape` [B, C, F, H, W] (float32, CPU) for one prompt's embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    pos = [positive.to(device, dtype)] * shape[0]
    neg = [negative.to(device, dtype)] * shape[0]
    with torch.no_grad():
        for timestep in tqdm(scheduler.timesteps, desc="sample", disable=not progress):
            x = latents.to(device, dtype)
            t = timestep.expand(shape[0]).to(device, torch.float32)
            v = family.predict(dit, x, t, pos).float()
            if guidance_scale != 1.0:
                v_neg = family.predict(dit, x, t, neg).float()
                v = v_neg + guidance_scale * (v - v_neg)
            latents = scheduler.step(v.cpu(), timestep, latents, return_dict=False)[0]
    return latents
