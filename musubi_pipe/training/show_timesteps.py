"""Show what a timestep configuration trains on: a histogram of t and the loss weight per bin.

`timestep_histogram` draws n timesteps with `timesteps.sample_timesteps` (seeded, so the picture is
reproducible) and bins them over [0, 1]; `write_timestep_plot` draws a PNG with two panels, the
histogram of t (t = 1 is pure noise, the model timestep is 1000 t) and the mean loss weight per bin
(1 where the weighting scheme does not weight the loss). The weight panel switches to a log10 axis when
the weights span more than a factor of 100 (sigma_sqrt: w = t^-2). Pillow only, no matplotlib.
This is musubi-tuner's `--show_timesteps image` as a file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from musubi_pipe.fileio import temp_beside
from musubi_pipe.training.timesteps import TimestepSpec, loss_weights, sample_timesteps

SIZE = (1000, 460)
BINS = 100
_BG, _FG, _GRID = (255, 255, 255), (30, 30, 30), (215, 215, 215)
_BAR, _WEIGHT_BAR = (70, 110, 180), (200, 110, 50)
_PLOT_TOP, _PLOT_BOTTOM = 70, 400
_PANELS = ((70, 480), (570, 980))  # (left, right) x of each panel's plot area


def timestep_histogram(spec: TimestepSpec, latent_hw: tuple[int, int] | None, n: int = 100_000, seed: int = 0,
                       bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [bins] int64, edges [bins + 1], mean loss weight per bin [bins]) of n draws over [0, 1].

    An empty bin's weight is the weight at its centre; unweighted schemes give 1 everywhere.
    """
    t = sample_timesteps(n, spec, latent_hw, torch.Generator().manual_seed(seed)).double()
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    index = (t * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weights, centre_weights = loss_weights(t, spec), loss_weights(centres, spec)
    if weights is None:
        return counts, edges, torch.ones(bins, dtype=torch.float64)
    sums = torch.bincount(index, weights=weights.double(), minlength=bins)
    mean = torch.where(counts > 0, sums / counts.clamp(min=1), centre_weights.double())
    return counts, edges, mean


def write_timestep_plot(spec: TimestepSpec, latent_hw: tuple[int, int] | None, path: str | os.PathLike,
                        n: int = 100_000, seed: int = 0) -> Path:
    """Write the two-panel PNG to `path` (atomically: a temp file, then os.replace); return the path."""
    counts, edges, weights = timestep_histogram(spec, latent_hw, n, seed)
    image = Image.new("RGB", SIZE, _BG)
    draw = ImageDraw.Draw(image)
    font = _font()
    _title(draw, font, f"Timesteps ({n:,} draws, seed {seed}): {spec.describe(latent_hw)}")
    _bars(draw, font, _PANELS[0], counts.double(), 0.0, float(counts.max()) or 1.0, _BAR,
          "sampled t (count per bin)", lambda v: f"{v:,.0f}")
    _weight_panel(draw, font, weights)
    return _save_atomic(image, Path(path))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, at a readable size where FreeType is available."""
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _title(draw: ImageDraw.ImageDraw, font, text: str) -> None:
    """The title, wrapped at word boundaries onto at most three lines."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > SIZE[0] - 40:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    for i, text_line in enumerate(lines[:3]):
        draw.text((20, 8 + 16 * i), text_line, fill=_FG, font=font)


def _weight_panel(draw: ImageDraw.ImageDraw, font, weights: torch.Tensor) -> None:
    """Loss weight per bin, on a log10 axis when the weights span more than a factor of 100."""
    low, high = float(weights.min()), float(weights.max())
    if low > 0 and high / low > 100:
        logs = torch.log10(weights)
        bottom, top = math.floor(float(logs.min())), math.ceil(float(logs.max()))
        _bars(draw, font, _PANELS[1], logs, float(min(bottom, 0)), float(max(top, 1)), _WEIGHT_BAR,
              "loss weight per bin (log10 axis)", lambda v: f"1e{v:.0f}")
    else:
        _bars(draw, font, _PANELS[1], weights, 0.0, max(high, 1.0) * 1.1, _WEIGHT_BAR,
              "loss weight per bin", lambda v: f"{v:.3g}")


def _bars(draw: ImageDraw.ImageDraw, font, panel: tuple[int, int], values: torch.Tensor, y_min: float, y_max: float,
          colour, label: str, y_format) -> None:
    """One panel: axes, a bar per value over t in [0, 1], ticks at t = 0, 0.25, ..., 1 and at y_min, y_max."""
    left, right = panel
    span = (y_max - y_min) or 1.0
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid and ticks
        x = left + frac * (right - left)
        draw.line([(x, _PLOT_TOP), (x, _PLOT_BOTTOM)], fill=_GRID)
        text = f"{frac:g}"
        draw.text((x - draw.textlength(text, font=font) / 2, _PLOT_BOTTOM + 6), text, fill=_FG, font=font)
    count = len(values)
    for i, value in enumerate(values.tolist()):
        height = (min(max(value, y_min), y_max) - y_min) / span * (_PLOT_BOTTOM - _PLOT_TOP)
        if height > 0:  # whole-pixel bar edges, so neighbouring bars meet without gaps
            x0, x1 = (left + round(k * (right - left) / count) for k in (i, i + 1))
            draw.rectangle([x0, round(_PLOT_BOTTOM - height), max(x1 - 1, x0), _PLOT_BOTTOM], fill=colour)
    draw.line([(left, _PLOT_TOP), (left, _PLOT_BOTTOM), (right, _PLOT_BOTTOM)], fill=_FG, width=1)
    for value, y in ((y_min, _PLOT_BOTTOM), (y_max, _PLOT_TOP)):
        text = y_format(value)
        draw.text((left - 6 - draw.textlength(text, font=font), y - 7), text, fill=_FG, font=font)
    draw.text((left, _PLOT_TOP - 18), label, fill=_FG, font=font)
    axis = "t (1 = pure noise; model timestep 1000 t)"
    draw.text(((left + right - draw.textlength(axis, font=font)) / 2, _PLOT_BOTTOM + 26), axis, fill=_FG, font=font)


def _save_atomic(image: Image.Image, path: Path) -> Path:
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
