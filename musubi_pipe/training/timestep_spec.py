"""Timestep sampling settings: the `training` keys, their defaults and checks (no torch).

Split from `timesteps` (which draws the timesteps, with torch) so that config validation can check
these keys without importing torch. The formulas are in `timesteps`' docstring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("musubi_pipe")

METHODS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "flux2_shift", "qwen_shift", "krea2_shift",
           "ideogram4_shift", "logsnr", "qinglong_flux", "qinglong_qwen")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap", "logit_normal", "mode")
# training.conventions: "musubi" computes what musubi-tuner computes (model timestep 1000 t + 1, loss weights from
# its scheduler table, its `sigma` method); "exact" is this project's earlier arithmetic (timesteps.py docstring)
CONVENTIONS = ("musubi", "exact")
DENSITY_SCHEMES = ("logit_normal", "mode")  # shape the sigma method's density; no loss weight
LOSS_WEIGHT_SCHEMES = ("sigma_sqrt", "cosmap")

# method -> (x1, y1, x2, y2, tokens are (h//2)(w//2) rather than h w): mu = lin(x1, y1, x2, y2)(tokens)
RESOLUTION_SHIFTS = {
    "flux_shift": (256, 0.5, 4096, 1.15, True),
    "flux2_shift": (256, 0.5, 4096, 1.15, False),
    "qwen_shift": (256, 0.5, 8192, 0.9, True),
    "krea2_shift": (256, 0.5, 6400, 1.15, True),
}
# method -> (shift method of the main component, p(main), p(logsnr(logit_mean, logit_std)), p(detail logsnr))
QINGLONG_MIXTURES = {
    "qinglong_flux": ("flux_shift", 0.79, 0.11, 0.10),
    "qinglong_qwen": ("qwen_shift", 0.95, 0.0, 0.05),
}
QINGLONG_DETAIL = (5.36, 1.0)  # (mean, std) of the low-noise "detail" logsnr component
IDEOGRAM4_STD = 1.5
IDEOGRAM4_PATCH = 16
IDEOGRAM4_BOUNDS = (1 / (1 + math.exp(7.5)), 1 / (1 + math.exp(-9.0)))  # [sigmoid(-7.5), sigmoid(9)]
SIGMA_STEPS = 1000
PRESERVE_ROUNDS = 1000
EXPERT_TRIES = 100
T_EPS = 1e-5
MODE_SCALE_RANGE = (-1.0, 1.0 / (math.pi / 2 - 1))  # where the mode density's map stays monotone, in [0, 1]

DEFAULTS = {
    "timestep_sampling": "shift",
    "discrete_flow_shift": 3.0,
    "sigmoid_scale": 1.0,
    "min_timestep": 0,
    "max_timestep": 1000,
    "preserve_distribution_shape": False,
    "weighting_scheme": "none",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "conventions": "musubi",
}


@dataclass(frozen=True)
class TimestepSpec:
    """How timesteps are drawn and losses weighted; the `training` config keys of the same names."""

    timestep_sampling: str = DEFAULTS["timestep_sampling"]
    discrete_flow_shift: float = DEFAULTS["discrete_flow_shift"]
    sigmoid_scale: float = DEFAULTS["sigmoid_scale"]
    min_timestep: float = DEFAULTS["min_timestep"]
    max_timestep: float = DEFAULTS["max_timestep"]
    preserve_distribution_shape: bool = DEFAULTS["preserve_distribution_shape"]
    weighting_scheme: str = DEFAULTS["weighting_scheme"]
    logit_mean: float = DEFAULTS["logit_mean"]
    logit_std: float = DEFAULTS["logit_std"]
    mode_scale: float = DEFAULTS["mode_scale"]
    conventions: str = DEFAULTS["conventions"]

    @property
    def musubi(self) -> bool:
        """Whether training.conventions is musubi-tuner's."""
        return self.conventions == "musubi"

    @classmethod
    def from_config(cls, training_cfg: Mapping) -> TimestepSpec:
        """Build from the `training` group (missing keys take DEFAULTS); ValueError on a bad value."""
        values = _with_defaults(training_cfg)
        problems = _value_problems(values)
        if problems:
            raise ValueError("; ".join(f"{key} {msg}" for key, msg in problems))
        floats = {k: float(v) for k, v in values.items() if _is_number(v)}
        return cls(**{**values, **floats})

    @property
    def t_range(self) -> tuple[float, float]:
        """[min_timestep, max_timestep] / 1000."""
        return self.min_timestep / 1000.0, self.max_timestep / 1000.0

    def describe(self, latent_hw: tuple[int, int] | None = None) -> str:
        """One line naming the method and the parameters it uses, e.g. for a plot title or a log."""
        method = self.timestep_sampling
        parts = [method]
        if method in ("shift", "sigma"):
            parts.append(f"shift={self.discrete_flow_shift:g}")
        if method in RESOLUTION_SHIFTS or method in QINGLONG_MIXTURES:
            shift_method = QINGLONG_MIXTURES[method][0] if method in QINGLONG_MIXTURES else method
            parts.append(f"S={resolution_shift(shift_method, latent_hw):.3g} at {latent_hw[0]}x{latent_hw[1]}"
                         if latent_hw else "S from latent size")
        if method in ("sigmoid", "shift") or method in RESOLUTION_SHIFTS or method in QINGLONG_MIXTURES:
            parts.append(f"sigmoid_scale={self.sigmoid_scale:g}")
        if method in ("logsnr",) or method in QINGLONG_MIXTURES:
            parts.append(f"logit_mean={self.logit_mean:g} logit_std={self.logit_std:g}")
        if method == "ideogram4_shift" and latent_hw:
            parts.append(f"mean={ideogram4_mean(latent_hw):.3g} at {latent_hw[0]}x{latent_hw[1]}")
        if (self.min_timestep, self.max_timestep) != (0, 1000):
            how = "rejection" if self.preserve_distribution_shape else "squash"
            parts.append(f"t in [{self.min_timestep:g}, {self.max_timestep:g}]/1000 ({how})")
        if self.weighting_scheme != "none":
            extra = {"logit_normal": f" mean={self.logit_mean:g} std={self.logit_std:g}",
                     "mode": f" mode_scale={self.mode_scale:g}"}.get(self.weighting_scheme, "")
            parts.append(f"weighting={self.weighting_scheme}{extra}")
        return ", ".join(parts)


# -- validation ----------------------------------------------------------------------------------

def check_spec(training_cfg: Mapping) -> list[tuple[str, str]]:
    """Return (dotted key, message) problems of the timestep keys of the `training` group."""
    values = _with_defaults(training_cfg)
    problems = _value_problems(values)
    return problems or _effect_problems(values)


def _with_defaults(training_cfg: Mapping) -> dict:
    return {key: training_cfg.get(key, default) if training_cfg is not None else default
            for key, default in DEFAULTS.items()}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value_problems(v: dict) -> list[tuple[str, str]]:
    """Values that make sampling impossible or meaningless."""
    problems = []
    if v["timestep_sampling"] not in METHODS:
        problems.append(("timestep_sampling", f"is {v['timestep_sampling']!r}; choose one of {list(METHODS)}"))
    if v["conventions"] not in CONVENTIONS:
        problems.append(("conventions", f"is {v['conventions']!r}; choose musubi (musubi-tuner's numbers, the default) "
                                        "or exact (docs/training.md, 'Conventions')"))
    if v["weighting_scheme"] not in WEIGHTING_SCHEMES:
        problems.append(("weighting_scheme", f"is {v['weighting_scheme']!r}; choose one of {list(WEIGHTING_SCHEMES)}"))
    for key in ("discrete_flow_shift", "sigmoid_scale", "min_timestep", "max_timestep", "logit_mean", "logit_std",
                "mode_scale"):
        if not _is_number(v[key]):
            problems.append((key, f"must be a finite number, got {v[key]!r}"))
    if not isinstance(v["preserve_distribution_shape"], bool):
        problems.append(("preserve_distribution_shape", f"must be true or false, got {v['preserve_distribution_shape']!r}"))
    numbers_ok = not {k for k, _ in problems} & {"min_timestep", "max_timestep"}
    if numbers_ok and not 0 <= v["min_timestep"] < v["max_timestep"] <= 1000:
        problems.append(("min_timestep", f"and max_timestep must satisfy 0 <= min_timestep < max_timestep <= 1000, "
                                         f"got {v['min_timestep']} and {v['max_timestep']}"))
    for key in ("discrete_flow_shift", "sigmoid_scale", "logit_std"):
        if _is_number(v[key]) and v[key] <= 0:
            problems.append((key, f"must be > 0, got {v[key]}"))
    low, high = MODE_SCALE_RANGE
    if v["weighting_scheme"] == "mode" and _is_number(v["mode_scale"]) and not low <= v["mode_scale"] <= high:
        problems.append(("mode_scale", f"is {v['mode_scale']}; the mode density needs {low:g} <= mode_scale <= "
                                       f"{high:.3f} (1.29 is the SD3 value)"))
    return [(f"training.{key}", msg) for key, msg in problems]


def convention_notes(spec: TimestepSpec) -> list[str]:
    """What musubi-tuner's `sigma` method does with these settings that a user may not expect (logged as warnings
    when training starts; training.conventions=exact avoids each)."""
    if not spec.musubi or spec.timestep_sampling != "sigma":
        return []
    notes = []
    if spec.discrete_flow_shift != 1.0:
        notes.append(f"training.discrete_flow_shift={spec.discrete_flow_shift:g} has no effect with "
                     "timestep_sampling=sigma, as in musubi-tuner (its training table is never shifted); use "
                     "timestep_sampling=shift, or training.conventions=exact to shift the table")
    if (spec.min_timestep, spec.max_timestep) != (0, 1000):
        low, high = 1000 - spec.max_timestep, 1000 - spec.min_timestep
        notes.append(f"training.min_timestep/max_timestep={spec.min_timestep:g}/{spec.max_timestep:g} with "
                     f"timestep_sampling=sigma train timesteps ({low:g}, {high:g}], the mirrored range, as musubi-tuner "
                     "does (it indexes a descending table); use another method, or training.conventions=exact")
        if spec.preserve_distribution_shape:
            notes.append("training.preserve_distribution_shape has no effect with timestep_sampling=sigma (as in "
                         "musubi-tuner)")
    return notes


def _effect_problems(v: dict) -> list[tuple[str, str]]:
    """Settings that are valid but would silently do nothing."""
    if v["weighting_scheme"] in DENSITY_SCHEMES and v["timestep_sampling"] != "sigma":
        return [("training.weighting_scheme",
                 f"is {v['weighting_scheme']!r}, which only shapes the sampling density and has no effect unless "
                 f"timestep_sampling=sigma (it is {v['timestep_sampling']!r}); use none, sigma_sqrt or cosmap, or "
                 f"timestep_sampling=sigma")]
    return []


# -- formulas ------------------------------------------------------------------------------------


def lin(x: float, x1: float, y1: float, x2: float, y2: float) -> float:
    """The line through (x1, y1) and (x2, y2) at x."""
    return y1 + (x - x1) * (y2 - y1) / (x2 - x1)


def resolution_shift(method: str, latent_hw: tuple[int, int]) -> float:
    """S = exp(mu) of a resolution-dependent shift method (flux_shift, flux2_shift, qwen_shift, krea2_shift)."""
    if latent_hw is None:
        raise ValueError(f"timestep_sampling={method} needs the latent height and width")
    x1, y1, x2, y2, packed = RESOLUTION_SHIFTS[method]
    h, w = latent_hw
    tokens = (h // 2) * (w // 2) if packed else h * w
    return math.exp(lin(tokens, x1, y1, x2, y2))


def ideogram4_mean(latent_hw: tuple[int, int]) -> float:
    """m = 0.5 ln(pixels / 512^2) with pixels = (16 h)(16 w), (h, w) the token grid."""
    if latent_hw is None:
        raise ValueError("timestep_sampling=ideogram4_shift needs the latent height and width")
    h, w = latent_hw
    return 0.5 * math.log(h * IDEOGRAM4_PATCH * w * IDEOGRAM4_PATCH / (512 * 512))
