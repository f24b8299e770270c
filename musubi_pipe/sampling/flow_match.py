"""Flow-matching sampling on diffusers' FlowMatchEulerDiscreteScheduler.

The model predicts v = noise - x0 at timestep 1000 * sigma (the training convention), and the Euler
scheduler integrates sigma from 1 to 0 with the given shift. `velocity(x, timestep)` is supplied by
the caller: it picks the expert for the timestep, adds conditioning and applies guidance
(`guided`), so this loop is the same for every architecture.
"""

from __future__ import annotations

import torch

from musubi_pipe.progress import progress_bar


def sample_latents(velocity, *, shape, steps: int, shift: float, seed: int, progress=True, init=None,
                   strength: float = 1.0, sigmas=None) -> torch.Tensor:
    """Return denoised latents of `shape` [B, C, F, H, W] (float32, CPU), starting from seeded noise.

    Video-to-video: with `init` (clean latents of `shape`) only the last round(steps * strength) steps run,
    from init noised to that step's sigma (x = sigma * noise + (1 - sigma) * init), as musubi-tuner's
    `--video_path --strength`: strength 1 ignores the video, 0 returns it unchanged. `sigmas` (one per step,
    unshifted) replace the scheduler's own spacing.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if sigmas is None:
        scheduler.set_timesteps(steps, device="cpu")
    else:  # the family's own spacing (unshifted; the scheduler applies the shift)
        scheduler.set_timesteps(sigmas=[float(x) for x in sigmas], device="cpu")
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    timesteps = scheduler.timesteps
    if init is not None:
        start = steps - int(round(steps * strength))
        if start >= steps:
            return init.float().cpu().clone()
        sigma = float(scheduler.sigmas[start])
        latents = sigma * latents + (1.0 - sigma) * init.float().cpu()
        timesteps = timesteps[start:]
        scheduler.set_begin_index(start)
    with torch.no_grad():
        for timestep in progress_bar(timesteps, desc="sample", disable=not progress):
            v = velocity(latents, timestep).float().cpu()
            latents = scheduler.step(v, timestep, latents, return_dict=False)[0]
    return latents


def guided(predict, guidance_scale: float):
    """Classifier-free guidance: v = v_neg + g (v_pos - v_neg), where predict(positive: bool) -> v.

    With g == 1 the negative pass is skipped.
    """
    v = predict(True).float()
    if guidance_scale == 1.0:
        return v
    v_neg = predict(False).float()
    return v_neg + guidance_scale * (v - v_neg)
