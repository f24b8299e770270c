"""Timestep sampling and loss weighting for rectified-flow training, with musubi-tuner's semantics.

Rectified flow: x_t = (1 - t) x0 + t noise, the target is noise - x0, t = 1 is pure noise. The DiT sees the
model timestep `model_timesteps(t, spec)`, which depends on training.conventions (below).

Notation: u ~ U(0, 1), z ~ N(0, 1), sigmoid(x) = 1 / (1 + e^-x), s = training.sigmoid_scale,
S = training.discrete_flow_shift, (h, w) = the latent height and width (the last two dims of the cached
latents), lin(x1, y1, x2, y2)(x) = y1 + (x - x1) (y2 - y1) / (x2 - x1) (extrapolates outside [x1, x2]),
shift_S(t) = S t / (1 + (S - 1) t).

Methods (training.timestep_sampling):
  uniform          t = u
  sigmoid          t = sigmoid(s z)
  shift            t = shift_S(sigmoid(s z))
  flux_shift       as shift with S = exp(mu), mu = lin(256, 0.5, 4096, 1.15)((h//2) (w//2))   2x2-packed tokens
  flux2_shift      as shift with S = exp(mu), mu = lin(256, 0.5, 4096, 1.15)(h w)             latents already packed
  qwen_shift       as shift with S = exp(mu), mu = lin(256, 0.5, 8192, 0.9)((h//2) (w//2))    (S ~ 2.2 at 1328x1328)
  krea2_shift      as shift with S = exp(mu), mu = lin(256, 0.5, 6400, 1.15)((h//2) (w//2))
  ideogram4_shift  t = sigmoid(m + 1.5 z), m = 0.5 ln(pixels / 512^2), pixels = (16 h) (16 w) (h, w is the
                   token grid), then clamped to [sigmoid(-7.5), sigmoid(9)]; sigmoid_scale is not used
  logsnr           lambda ~ N(logit_mean, logit_std), t = sigmoid(-lambda / 2)   (arXiv 2411.14793; the
                   paper suggests logit_mean -6, logit_std 2 or 3)
  qinglong_flux    per sample: 79% flux_shift, 11% logsnr(logit_mean, logit_std), 10% logsnr(5.36, 1.0)
  qinglong_qwen    per sample: 95% qwen_shift,  0% logsnr(logit_mean, logit_std),  5% logsnr(5.36, 1.0)
                   (current musubi-tuner shares; earlier versions used 80 / 7.5 / 12.5 for both)
  sigma            v drawn from the weighting_scheme density, then musubi-tuner's 1000-step table
                   [1000, 999, ..., 1] / 1000: t = table[floor(1000 v)] = (1000 - floor(1000 v)) / 1000
                   (conventions=exact: t = shift_S of that). Densities: logit_normal v = sigmoid(logit_mean +
                   logit_std z); mode v = 1 - u - mode_scale (cos(pi u / 2)^2 - 1 + u); otherwise v = u. Because
                   the table descends, logit_mean > 0 favours small t (low noise), as in musubi-tuner and SD3.
                   mode needs -1 <= mode_scale <= 1 / (pi/2 - 1) ~ 1.75 to stay a density on [0, 1].

Timestep range (training.min_timestep, max_timestep in 0..1000, a = min/1000, b = max/1000), every method but
musubi's sigma:
  default                           t <- a + t (b - a)     (affine squash; changes the shape)
  preserve_distribution_shape=true  draws outside [a, b] are redrawn (up to 1000 rounds; what is still
                                    outside then is drawn again and squashed, with a warning)
musubi's sigma indexes the table with floor(v (max - min) + min), which selects the mirrored range
t in (1 - b, 1 - a], and ignores preserve_distribution_shape (convention_notes warns of both).

Expert range (Wan2.2 A14B; `low`, `high` of `sample_timesteps`): draws outside [low, high] are redrawn
(up to 100 rounds, then clamped), keeping the method's shape inside the range.

Loss weights (training.weighting_scheme) of sigma:
  sigma_sqrt  w = sigma^-2
  cosmap      w = 2 / (pi (1 - 2 sigma + 2 sigma^2))
  none, logit_normal, mode: no weight. logit_normal and mode only shape the `sigma` method's density
  (musubi-tuner ignores them for every other method; `check_spec` reports that).
The loss is mean(w * (pred - target)^2), the weight broadcast per sample (`weighted_mse`).

training.conventions (what each changes; docs/training.md has the same table):
                          musubi (default): musubi-tuner's numbers    exact: this project's earlier arithmetic
  model timestep          1000 t + 1 (sigma method: the table value,  1000 t
                          1000 t)
  loss-weight sigma       the scheduler-table entry nearest the model  t
                          timestep (1/1000 steps, >= 0.001), in the
                          DiT's dtype
  Wan2.2 expert routing   model timestep / 1000 >= boundary            t >= boundary
  sigma method            table value, no shift, min/max mirrored     shift_S applied, min/max restrict t
  final clamp             none                                          t kept in [1e-5, 1 - 1e-5]
  (families: HunyuanVideo's training guidance is passed unscaled under musubi, x1000 under exact.)

Differences from musubi-tuner that remain under both conventions:
  - preserve_distribution_shape fallback: only the samples still outside are replaced (squashed fresh
    draws); musubi-tuner falls back to an unrestricted draw of the whole batch.
  - Defaults: timestep_sampling "shift" and discrete_flow_shift 3.0 (musubi-tuner: "sigma" and 1.0).
  - Not implemented: --num_timestep_buckets (stratified draws). The random stream differs (e.g. qinglong
    draws every component for every sample, then picks), so draws match in distribution, not bit for bit;
    given the same t the model timestep, noisy input, target and loss weight are musubi-tuner's.

Reproducibility: every draw comes from the `generator` argument, on the CPU, so the same generator state
gives the same timesteps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from musubi_pipe.training.timestep_spec import (
    EXPERT_TRIES,
    IDEOGRAM4_BOUNDS,
    IDEOGRAM4_STD,
    METHODS,
    PRESERVE_ROUNDS,
    QINGLONG_DETAIL,
    QINGLONG_MIXTURES,
    RESOLUTION_SHIFTS,
    SIGMA_STEPS,
    T_EPS,
    TimestepSpec,
    convention_notes,
    ideogram4_mean,
    resolution_shift,
)

# TimestepSpec and convention_notes are used through this module too (training.loop)
__all__ = ["TimestepSpec", "convention_notes", "loss_weights", "model_timesteps", "routing_offset", "sample_timesteps",
           "weighted_mse"]

log = logging.getLogger("musubi_pipe")


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """shift_S(t) = S t / (1 + (S - 1) t): the flow-matching time shift (S > 1 moves t towards noise)."""
    return shift * t / (1 + (shift - 1) * t)


def mode_density_map(u: torch.Tensor, mode_scale: float) -> torch.Tensor:
    """SD3's "mode" density: v = 1 - u - mode_scale (cos(pi u / 2)^2 - 1 + u), u ~ U(0, 1)."""
    return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


# -- draws (float64 inside, one generator) -------------------------------------------------------

def _uniform(n: int, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator).double()


def _normal(n: int, generator) -> torch.Tensor:
    return torch.randn(n, generator=generator).double()


def _shifted_sigmoid(n: int, shift: float, spec: TimestepSpec, generator) -> torch.Tensor:
    return shift_t(torch.sigmoid(spec.sigmoid_scale * _normal(n, generator)), shift)


def _logsnr(n: int, mean: float, std: float, generator) -> torch.Tensor:
    return torch.sigmoid(-(mean + std * _normal(n, generator)) / 2)


def _sigma(n: int, spec: TimestepSpec, generator) -> torch.Tensor:
    if spec.weighting_scheme == "logit_normal":
        v = torch.sigmoid(spec.logit_mean + spec.logit_std * _normal(n, generator))
    elif spec.weighting_scheme == "mode":
        v = mode_density_map(_uniform(n, generator), spec.mode_scale)
    else:
        v = _uniform(n, generator)
    if spec.musubi:  # musubi-tuner: the timestep range indexes the (descending) table; no shift
        index = torch.floor(v * (spec.max_timestep - spec.min_timestep) + spec.min_timestep)
        return (SIGMA_STEPS - index.clamp(0, SIGMA_STEPS - 1)) / SIGMA_STEPS
    index = torch.floor(v * SIGMA_STEPS).clamp(0, SIGMA_STEPS - 1)
    return shift_t((SIGMA_STEPS - index) / SIGMA_STEPS, spec.discrete_flow_shift)


def draw_qinglong(n: int, spec: TimestepSpec, latent_hw: tuple[int, int], generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, component) of a qinglong mixture; component 0 = shift, 1 = logsnr, 2 = detail logsnr (5.36, 1.0)."""
    shift_method, p_main, p_logsnr, _ = QINGLONG_MIXTURES[spec.timestep_sampling]
    decision = _uniform(n, generator)
    component = (decision >= p_main).long() + (decision >= p_main + p_logsnr).long()
    main = _shifted_sigmoid(n, resolution_shift(shift_method, latent_hw), spec, generator)
    logsnr = _logsnr(n, spec.logit_mean, spec.logit_std, generator)
    detail = _logsnr(n, *QINGLONG_DETAIL, generator)
    return torch.stack([main, logsnr, detail]).gather(0, component[None])[0], component


def draw_method(n: int, spec: TimestepSpec, latent_hw: tuple[int, int] | None, generator) -> torch.Tensor:
    """n draws of the method alone (float64), before the timestep range and the final clamp."""
    method = spec.timestep_sampling
    if method == "uniform":
        return _uniform(n, generator)
    if method == "sigmoid":
        return torch.sigmoid(spec.sigmoid_scale * _normal(n, generator))
    if method == "shift":
        return _shifted_sigmoid(n, spec.discrete_flow_shift, spec, generator)
    if method in RESOLUTION_SHIFTS:
        return _shifted_sigmoid(n, resolution_shift(method, latent_hw), spec, generator)
    if method == "ideogram4_shift":
        t = torch.sigmoid(ideogram4_mean(latent_hw) + IDEOGRAM4_STD * _normal(n, generator))
        return t.clamp(*IDEOGRAM4_BOUNDS)
    if method == "logsnr":
        return _logsnr(n, spec.logit_mean, spec.logit_std, generator)
    if method in QINGLONG_MIXTURES:
        return draw_qinglong(n, spec, latent_hw, generator)[0]
    if method == "sigma":
        return _sigma(n, spec, generator)
    raise ValueError(f"training.timestep_sampling={method!r}: choose one of {list(METHODS)}")


def _redraw_outside(t: torch.Tensor, low: float, high: float, draw: Callable[[int], torch.Tensor],
                    rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace values outside [low, high] by fresh draws, up to `rounds` times; return (t, still outside)."""
    t = t.clone()
    outside = (t < low) | (t > high)
    for _ in range(rounds):
        if not outside.any():
            break
        t[outside] = draw(int(outside.sum()))
        outside = (t < low) | (t > high)
    return t, outside


def _squash(t: torch.Tensor, spec: TimestepSpec) -> torch.Tensor:
    a, b = spec.t_range
    return a + t * (b - a)


def _draw_in_timestep_range(n: int, spec: TimestepSpec, latent_hw, generator) -> torch.Tensor:
    """Draws of the method with min/max_timestep applied (squash or rejection), kept in [T_EPS, 1 - T_EPS]."""
    def draw(k: int) -> torch.Tensor:
        return draw_method(k, spec, latent_hw, generator)

    t = draw(n)
    if spec.musubi and spec.timestep_sampling == "sigma":
        return t  # the range is applied to the table index (_sigma); t >= 0.001
    a, b = spec.t_range
    if a > 0.0 or b < 1.0:
        if not spec.preserve_distribution_shape:
            t = _squash(t, spec)
        else:
            t, outside = _redraw_outside(t, a, b, draw, PRESERVE_ROUNDS)
            if outside.any():
                log.warning("timesteps: %d of %d draws of %s still outside [%g, %g] after %d rounds; those are "
                            "squashed into the range instead (preserve_distribution_shape)", int(outside.sum()), n,
                            spec.timestep_sampling, a, b, PRESERVE_ROUNDS)
                t[outside] = _squash(draw(int(outside.sum())), spec)
    return t if spec.musubi else t.clamp(T_EPS, 1 - T_EPS)


def sample_timesteps(n: int, spec: TimestepSpec, latent_hw: tuple[int, int] | None, generator: torch.Generator,
                     low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """n timesteps t in (0, 1), float32 on the CPU, drawn only from `generator`.

    `latent_hw` (latent height, width) is needed by the resolution-aware methods. [low, high] restricts t
    to an expert's range (Wan2.2) by redrawing what falls outside, up to 100 rounds, then clamping.
    The DiT sees `model_timesteps(t, spec)`.
    """
    t = _draw_in_timestep_range(n, spec, latent_hw, generator)
    if low > 0.0 or high < 1.0:
        t, _ = _redraw_outside(t, low, high, lambda k: _draw_in_timestep_range(k, spec, latent_hw, generator),
                               EXPERT_TRIES)
        t = t.clamp(low, high)
    return t.float()


# -- loss ----------------------------------------------------------------------------------------

def model_timesteps(t: torch.Tensor, spec: TimestepSpec) -> torch.Tensor:
    """The timesteps [B] the DiT sees for t [B] (float32): musubi 1000 t + 1 (sigma method: the table value
    1000 t, an integer), exact 1000 t."""
    scaled = t.float() * SIGMA_STEPS
    if not spec.musubi:
        return scaled
    if spec.timestep_sampling == "sigma":
        return torch.round(scaled)
    return scaled + 1


def routing_offset(spec: TimestepSpec) -> float:
    """model_timesteps(t) / 1000 - t: what Wan2.2's expert routing adds to t before comparing it with the boundary."""
    return 1.0 / SIGMA_STEPS if spec.musubi and spec.timestep_sampling != "sigma" else 0.0


def loss_weights(t: torch.Tensor, spec: TimestepSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Per-sample loss weights (float32) for t [B], or None when the scheme does not weight the loss.

    exact: sigma = t. musubi: sigma is the entry of musubi-tuner's scheduler table nearest the model timestep
    (ties to the larger), held in `dtype` (the DiT's) as musubi-tuner computes the weights."""
    if spec.weighting_scheme not in ("sigma_sqrt", "cosmap"):
        return None
    if spec.musubi:
        step = torch.floor(model_timesteps(t, spec).double() + 0.5).clamp(1, SIGMA_STEPS).long()
        sigma = _scheduler_sigmas()[SIGMA_STEPS - step].to(dtype)
    else:
        sigma = t.float()
    if spec.weighting_scheme == "sigma_sqrt":
        return (sigma ** -2.0).float()
    return (2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))).float()


def _scheduler_sigmas() -> torch.Tensor:
    """musubi-tuner's training scheduler sigmas: linspace(1, 0, 1001) in float32; entry i goes with timestep
    1000 - i."""
    return torch.linspace(1, 0, SIGMA_STEPS + 1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean((pred - target)^2 * w[b]), w per sample broadcast over the other dims (None: 1).

    With `mask` (broadcastable to pred) the mean is sum(err * w * mask) / sum(mask), the masked mean.
    """
    err = (pred - target) ** 2
    if weights is not None:
        err = err * weights.to(err.device, err.dtype).view(-1, *([1] * (err.dim() - 1)))
    if mask is None:
        return err.mean()
    mask = mask.to(err.device, err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum()


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Return (x_t, target) for latents [B, ...] and per-item t [B]."""
    t_b = t.view(-1, *([1] * (latents.dim() - 1))).to(latents)
    return (1 - t_b) * latents + t_b * noise, noise - latents


# -- the earlier API (kept for callers not moved to sample_timesteps yet) -------------------------

def sample_t(n: int, method: str, *, shift: float = 1.0, sigmoid_scale: float = 1.0, generator=None,
             latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """n draws of `method` alone (no timestep range), float32. Prefer `sample_timesteps`."""
    if method not in METHODS:
        raise ValueError(f"training.timestep_sampling={method!r}: choose one of {list(METHODS)}")
    spec = TimestepSpec(timestep_sampling=method, discrete_flow_shift=shift, sigmoid_scale=sigmoid_scale)
    return draw_method(n, spec, latent_hw, generator).float()


def sample_t_in(n: int, method: str, low: float, high: float, *, shift: float = 1.0, sigmoid_scale: float = 1.0,
                generator=None, tries: int = EXPERT_TRIES) -> torch.Tensor:
    """Like `sample_t`, restricted to [low, high] by redrawing (then clamping). Prefer `sample_timesteps`."""
    t = sample_t(n, method, shift=shift, sigmoid_scale=sigmoid_scale, generator=generator)
    if low <= 0.0 and high >= 1.0:
        return t
    t, _ = _redraw_outside(t, low, high, lambda k: sample_t(k, method, shift=shift, sigmoid_scale=sigmoid_scale,
                                                            generator=generator), tries)
    return t.clamp(low, high)
