"""Timestep sampling for rectified-flow training, with musubi-tuner's semantics.

x_t = (1 - t) * x0 + t * noise, the target is noise - x0, and the model sees timestep 1000 * t.
Methods (training.timestep_sampling):
  uniform  t = u,                 u ~ U(0, 1)
  sigmoid  t = sigmoid(s * z),    z ~ N(0, 1), s = training.sigmoid_scale
  shift    t = S*t0 / (1 + (S - 1)*t0) with t0 = sigmoid(s * z), S = training.discrete_flow_shift
"""

from __future__ import annotations

import torch

METHODS = ("uniform", "sigmoid", "shift")


def sample_t(n: int, method: str, *, shift: float = 1.0, sigmoid_scale: float = 1.0, generator=None) -> torch.Tensor:
    """Return n timesteps t in (0, 1) as float32 on the CPU, drawn from `generator`."""
    if method == "uniform":
        return torch.rand(n, generator=generator)
    z = torch.randn(n, generator=generator)
    t = torch.sigmoid(sigmoid_scale * z)
    if method == "sigmoid":
        return t
    if method == "shift":
        return shift * t / (1 + (shift - 1) * t)
    raise ValueError(f"training.timestep_sampling={method!r}: choose one of {METHODS}")


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Return (x_t, target) for latents [B, ...] and per-item t [B]."""
    t_b = t.view(-1, *([1] * (latents.dim() - 1))).to(latents)
    return (1 - t_b) * latents + t_b * noise, noise - latents


def sample_t_in(n: int, method: str, low: float, high: float, *, shift: float = 1.0, sigmoid_scale: float = 1.0,
                generator=None, tries: int = 100) -> torch.Tensor:
    """Like `sample_t`, restricted to [low, high] by redrawing what falls outside (keeps the method's shape).

    After `tries` rounds anything still outside is clamped. With [0, 1] this is `sample_t` exactly.
    """
    t = sample_t(n, method, shift=shift, sigmoid_scale=sigmoid_scale, generator=generator)
    if low <= 0.0 and high >= 1.0:
        return t
    for _ in range(tries):
        outside = (t < low) | (t > high)
        if not outside.any():
            break
        redraw = sample_t(n, method, shift=shift, sigmoid_scale=sigmoid_scale, generator=generator)
        t = torch.where(outside, redraw, t)
    return t.clamp(low, high)
