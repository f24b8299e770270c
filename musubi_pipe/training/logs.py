"""Training logs for TensorBoard and Weights & Biases (musubi-tuner's `--log_with`).

`TrainingLog` is what the training loop writes its numbers, timestep histograms and samples to. The
loop creates it on the main process only. `log_with` picks the backends:

- "none": nothing is written and no folder is created. Every method does nothing.
- "tensorboard": event files under `log_dir/run_name/`, written by `torch.utils.tensorboard.SummaryWriter`.
- "wandb": a W&B run (`wandb.init(project=run_name)`). Needs `pip install wandb`.
- "all": TensorBoard, plus W&B when wandb is installed (a warning says so when it is not).

W&B goes through accelerate's `WandBTracker` (its start, configuration and scalar logging; the
histograms, images and videos it has no method for go to its `wandb` run). Accelerate's trackers need
an accelerate state, so one is created first (`PartialState()`; a single process has none
otherwise, see `pipeline/distributed.py`). TensorBoard is written with `torch.utils.tensorboard`
directly: accelerate's `TensorBoardTracker` gives no access to histograms or videos and writes
`hparams.yml` into a timestamped subfolder.

Tags, named as musubi-tuner names them (section 4.13 of the contract):

- `loss/current`: the loss of the last step. `loss/average`: the moving average over the epoch.
  `loss/epoch`: the epoch's mean loss. `loss/validation`: the validation loss.
- `lr/<group>`: learning rate per optimizer parameter group (`lr/unet`, `lr/unet plus` with LoRA+,
  `lr/group{i}` otherwise), `lr/d*lr/<group>` for D-Adaptation and Prodigy.
- `grad_norm`, `max_norm/*`.
- `timesteps`: a histogram of the timesteps drawn since the last log (`histogram`).
- the sample images and videos made during training (`images`, `video`).

Logging must not end a long run. A failure while writing (full disk, network down, a bad value) is
logged as a warning the first time it happens for a given backend and kind (scalars, histogram,
images, video, close), and counted after that. `close()` reports the totals. Only the constructor
raises, with `UserError`, because its errors come from the config: an unknown `log_with`, a missing
package, a log folder that cannot be created, or a W&B run that cannot start.

`read_scalars(log_dir)` reads the scalars back from the TensorBoard event files. Tests use it, and
so can users' own scripts.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musubi_pipe.errors import UserError

log = logging.getLogger("musubi_pipe")

LOG_WITH_CHOICES = ("none", "tensorboard", "wandb", "all")
SECRET_ENDINGS = ("token", "api_key", "apikey", "password", "secret")  # huggingface_token, wandb_api_key, ...


class TrainingLog:
    """Write scalars, histograms, images and videos to TensorBoard and/or W&B.

    `config` (optional) is stored with the run. Nested keys are flattened to `a.b.c`, and keys that
    look like secrets (ending in token, api_key, password or secret) are dropped first. TensorBoard
    gets it as the text `config`, W&B as the run config. `tracker_kwargs` is musubi's `--log_tracker_config`:
    keyword arguments for each backend, e.g. `{"wandb": {"name": "my-run", "entity": "me"},
    "tensorboard": {"flush_secs": 30}}` (passed to `wandb.init` and to `SummaryWriter`). W&B's
    `dir` defaults to `log_dir`.
    """

    def __init__(self, log_dir: Path, log_with: str | None, run_name: str, config: Mapping[str, Any] | None = None,
                 *, tracker_kwargs: Mapping[str, Mapping[str, Any]] | None = None):
        self.log_dir = Path(log_dir)
        self.log_with = _check_log_with(log_with)
        self.run_name = run_name
        self._failures: Counter[tuple[str, str]] = Counter()
        self._closed = False
        kwargs = dict(tracker_kwargs or {})
        wants_tensorboard, wants_wandb = _backends(self.log_with)
        self._tensorboard: _TensorBoard | None = None
        self._wandb: _WandB | None = None
        if wants_tensorboard:
            self._tensorboard = _TensorBoard.start(self.log_dir / run_name, dict(kwargs.get("tensorboard", {})))
        if wants_wandb:
            try:
                self._wandb = _WandB.start(self.log_dir, run_name, dict(kwargs.get("wandb", {})))
            except UserError:
                self.close()  # the TensorBoard writer, if any
                raise
        if config:
            flat = flatten_config(config)
            self._each("config", None, lambda backend: backend.config(flat))

    # ----- what is running ------------------------------------------------------------------------

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends in use, e.g. ("tensorboard", "wandb"), or () for log_with="none"."""
        return tuple(backend.name for backend in self._backends())

    @property
    def enabled(self) -> bool:
        """True when at least one backend is writing."""
        return bool(self._backends()) and not self._closed

    @property
    def run_dir(self) -> Path | None:
        """The folder holding the TensorBoard event files (`log_dir/run_name`), None without TensorBoard."""
        return self._tensorboard.run_dir if self._tensorboard is not None else None

    # ----- logging --------------------------------------------------------------------------------

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log numbers (floats, ints, 0-d tensors, numpy scalars) under their tags at `step`."""
        if not self.enabled or not values:
            return
        floats = {}
        for tag, value in values.items():
            number = self._guard("bad input", "scalars", step, lambda value=value: float(value))
            if number is not None:
                floats[tag] = number
        if floats:
            self._each("scalars", step, lambda backend: backend.scalars(floats, step))

    def histogram(self, tag: str, values: torch.Tensor | np.ndarray | Sequence[float], step: int) -> None:
        """Log the distribution of `values` (e.g. the timesteps drawn since the last log). Empty input is skipped."""
        if not self.enabled:
            return
        array = self._guard("bad input", "histogram", step, lambda: _as_float_array(values))
        if array is not None and array.size > 0:
            self._each("histogram", step, lambda backend: backend.histogram(tag, array, step))

    def images(self, tag: str, images: Sequence[np.ndarray], step: int, captions: Sequence[str] | None = None) -> None:
        """Log uint8 HWC (or HW) images. One image goes under `tag`, several under `tag/00`, `tag/01`, ...

        TensorBoard has no image captions, so each caption is logged as text under `<image tag>/caption`.
        W&B gets one list of `wandb.Image` with their captions under `tag`.
        """
        if not self.enabled or len(images) == 0:
            return
        arrays = self._guard("bad input", "images", step, lambda: [_check_image(image) for image in images])
        texts = [str(c) for c in captions] if captions is not None else []
        if arrays is not None:
            self._each("images", step, lambda backend: backend.images(tag, arrays, step, texts))

    def video(self, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
        """Log a uint8 video, frames [F, H, W, 3].

        TensorBoard's `add_video` encodes a GIF with `moviepy.editor`. That needs moviepy < 2.0, since
        moviepy 2.0 removed `moviepy.editor`. Without it, the first, middle and last frames are logged
        instead, side by side in one image under `tag/frames`. W&B gets a `wandb.Video` (its own encoder may need
        moviepy or imageio. If it fails, a warning is logged and training goes on).
        """
        if not self.enabled:
            return
        array = self._guard("bad input", "video", step, lambda: _check_frames(frames))
        if array is not None:
            self._each("video", step, lambda backend: backend.video(tag, array, step, fps))

    # ----- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close every backend (safe to call twice), then report the logging failures there were."""
        if self._closed:
            return
        self._each("close", None, lambda backend: backend.close())
        self._closed = True
        repeated = {key: n for key, n in self._failures.items() if n > 1}
        if repeated:
            summary = ", ".join(f"{backend} {kind}: {n}" for (backend, kind), n in sorted(repeated.items()))
            log.warning("TrainingLog: logging failures during this run (only the first of each was reported): %s",
                        summary)

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- internals ------------------------------------------------------------------------------

    def _backends(self) -> list[_TensorBoard | _WandB]:
        return [backend for backend in (self._tensorboard, self._wandb) if backend is not None]

    def _each(self, kind: str, step: int | None, action: Callable[[Any], None]) -> None:
        """Run `action(backend)` for every backend; one backend failing does not stop the others."""
        for backend in self._backends():
            self._guard(backend.name, kind, step, lambda backend=backend: action(backend))

    def _guard(self, source: str, kind: str, step: int | None, action: Callable[[], Any]) -> Any:
        """Run `action`. If it fails, warn the first time for (source, kind), then count; return None."""
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - a broken logger must not end a training run
            key = (source, kind)
            self._failures[key] += 1
            if self._failures[key] == 1:
                at = f" at step {step}" if step is not None else ""
                log.warning("TrainingLog: %s (%s) failed%s: %s: %s. Training goes on; further failures of this "
                            "kind are counted, not reported.", kind, source, at, type(error).__name__, error)
            return None


# ----- choosing backends --------------------------------------------------------------------------


def _check_log_with(log_with: str | None) -> str:
    value = "none" if log_with is None else str(log_with).strip().lower()
    if value not in LOG_WITH_CHOICES:
        raise UserError(f"training.log_with: {log_with!r} is not one of {', '.join(LOG_WITH_CHOICES)}")
    return value


def _backends(log_with: str) -> tuple[bool, bool]:
    """(tensorboard, wandb) for a checked log_with. "all" takes W&B only when it is installed."""
    if log_with == "all":
        wandb = _wandb_available()
        if not wandb:
            log.warning("training.log_with=all: wandb is not installed, so logging to TensorBoard only "
                        "(pip install wandb to log to W&B too)")
        return True, wandb
    return log_with == "tensorboard", log_with == "wandb"


def _wandb_available() -> bool:
    from accelerate.utils import is_wandb_available

    return is_wandb_available()


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config → {"a.b": value}, with secret-looking keys dropped and other types turned into str."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if str(key).lower().endswith(SECRET_ENDINGS):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


# ----- the backends -------------------------------------------------------------------------------


class _TensorBoard:
    """A `SummaryWriter` writing to `run_dir`, flushed after every call so a crash loses nothing."""

    name = "tensorboard"

    def __init__(self, writer, run_dir: Path):
        self.writer = writer
        self.run_dir = run_dir

    @classmethod
    def start(cls, run_dir: Path, kwargs: dict[str, Any]) -> _TensorBoard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise UserError("training.log_with: TensorBoard logging needs the tensorboard package: "
                            "pip install tensorboard") from error
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            return cls(SummaryWriter(str(run_dir), **kwargs), run_dir)
        except OSError as error:
            raise UserError(f"training.logging_dir: cannot write TensorBoard logs to {run_dir}: {error}") from error

    def config(self, flat: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in flat.items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}", global_step=0)
        self.writer.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self.writer.add_histogram(tag, values, global_step=step)
        self.writer.flush()

    def images(self, tag: str, images: list[np.ndarray], step: int, captions: list[str]) -> None:
        for i, (name, array) in enumerate(zip(_image_tags(tag, len(images)), images)):
            self.writer.add_image(name, array, global_step=step, dataformats="HW" if array.ndim == 2 else "HWC")
            if i < len(captions):
                self.writer.add_text(f"{name}/caption", captions[i], global_step=step)
        self.writer.flush()

    def video(self, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
        if tensorboard_video_supported():
            video = np.ascontiguousarray(frames.transpose(0, 3, 1, 2)[None])  # [1, F, 3, H, W]
            self.writer.add_video(tag, video, global_step=step, fps=fps)
        else:
            self.writer.add_images(f"{tag}/frames", np.stack(key_frames(frames)), global_step=step, dataformats="NHWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run through accelerate's `WandBTracker` (`wandb.init(project=run_name, dir=log_dir, **kwargs)`)."""

    name = "wandb"

    def __init__(self, tracker):
        self.tracker = tracker
        self.run = tracker.tracker

    @classmethod
    def start(cls, log_dir: Path, run_name: str, kwargs: dict[str, Any]) -> _WandB:
        if not _wandb_available():
            raise UserError("training.log_with: logging to W&B needs the wandb package, which is not installed: "
                            "pip install wandb (or set training.log_with=tensorboard)")
        from accelerate import PartialState
        from accelerate.tracking import WandBTracker

        PartialState()  # accelerate's trackers need its state; a single process has none until now
        kwargs.setdefault("dir", str(log_dir))
        try:
            Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            tracker = WandBTracker(run_name, **kwargs)
            tracker.start()
            return cls(tracker)
        except Exception as error:  # noqa: BLE001 - wandb raises many kinds (auth, network, usage)
            raise UserError(f"training.log_with: cannot start the W&B run {run_name!r}: {type(error).__name__}: "
                            f"{error}. Run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline.") from error

    def config(self, flat: Mapping[str, Any]) -> None:
        self.tracker.store_init_configuration(dict(flat))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.tracker.log(dict(values), step=step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Histogram(values)}, step=step)

    def images(self, tag: str, images: list[np.ndarray], step: int, captions: list[str]) -> None:
        import wandb

        texts = list(captions) + [None] * (len(images) - len(captions))
        items = [wandb.Image(array, caption=text) for array, text in zip(images, texts)]
        self.run.log({tag: items}, step=step)

    def video(self, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
        import wandb

        video = wandb.Video(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), fps=max(1, round(fps)), format="mp4")
        self.run.log({tag: video}, step=step)

    def close(self) -> None:
        self.run.finish()


# ----- converting ---------------------------------------------------------------------------------


def _as_float_array(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_image(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image must be uint8 HW or HWC with 1, 3 or 4 channels, got {array.dtype} {array.shape}")
    return array


def _check_frames(frames: np.ndarray) -> np.ndarray:
    array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or array.shape[0] == 0:
        raise ValueError(f"video frames must be uint8 [F, H, W, 3] with F >= 1, got {array.dtype} {array.shape}")
    return array


def _image_tags(tag: str, count: int) -> list[str]:
    return [tag] if count == 1 else [f"{tag}/{i:02d}" for i in range(count)]


def key_frames(frames: np.ndarray) -> list[np.ndarray]:
    """The first, middle and last frames (fewer when the video is that short)."""
    indices = sorted({0, len(frames) // 2, len(frames) - 1})
    return [frames[i] for i in indices]


@functools.lru_cache(maxsize=1)
def tensorboard_video_supported() -> bool:
    """Whether TensorBoard's add_video can encode: torch imports `moviepy.editor` (moviepy < 2.0)."""
    try:
        importlib.import_module("moviepy.editor")
    except Exception:  # noqa: BLE001 - missing, or moviepy >= 2 without `editor`, or its own deps missing
        return False
    return True


# ----- reading back -------------------------------------------------------------------------------


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every TensorBoard event file under `log_dir`, sorted by step.

    Point it at one run's folder (`TrainingLog.run_dir`, or the `log_dir` given to one TrainingLog).
    Files of several runs under one folder are merged. Values come back as TensorBoard stores them,
    as float32.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    merged: dict[str, list[tuple[float, int, float]]] = {}
    for folder in _event_folders(Path(log_dir)):
        accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            merged.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: [(step, value) for _, step, value in sorted(events, key=lambda e: (e[1], e[0]))]
            for tag, events in sorted(merged.items())}


def _event_folders(root: Path) -> list[Path]:
    return sorted({path.parent for path in root.rglob("events.out.tfevents.*") if path.is_file()})
