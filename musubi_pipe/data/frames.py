"""Which frames of a video become training clips: target-frame rounding, clip extraction, fps decimation.

Pure index arithmetic (no decoding), shared by the dataset scanner (`sources.scan_dataset` decides
the clips of each video) and the decoder (`media.load_video_frames` maps clip positions back to
decoded frames). Semantics follow musubi-tuner's `VideoDataset` and `load_video` so that a dataset
TOML written for musubi-tuner yields the same clips here.
"""

import itertools
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from musubi_pipe.data.dataset_config import FRAME_EXTRACTION as FRAME_EXTRACTION_MODES

logger = logging.getLogger(__name__)


def round_to_4n1(frames: int) -> int:
    """Round a frame count down to the nearest 4n+1 (the video VAEs compress time 4:1 after frame 0)."""
    return (frames - 1) // 4 * 4 + 1


def round_target_frames(target_frames: Sequence[int], key: str = "target_frames") -> list[int]:
    """Return `target_frames` rounded down to 4n+1, deduplicated and sorted; warn naming `key` if that changed them.

    Raises ValueError for a count below 1 (it has no 4n+1 value to round to).
    """
    bad = [t for t in target_frames if int(t) < 1]
    if bad:
        raise ValueError(f"{key}: frame counts must be >= 1, got {bad}")
    rounded = sorted({round_to_4n1(int(t)) for t in target_frames})
    if rounded != list(target_frames):
        logger.warning("%s=%s rounded down to 4n+1 (deduplicated, sorted): %s", key, list(target_frames), rounded)
    return rounded


def extract_clips(
    total_frames: int,
    target_frames: Sequence[int],
    mode: str,
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
) -> list[tuple[int, int]]:
    """Return the clips `(start, count)` that `mode` takes from a video of `total_frames` frames.

    `target_frames` should already be rounded (see `round_target_frames`). Clips come grouped by target
    length in the order of `target_frames`, then by start; a clip that would repeat an earlier one
    (possible with `uniform` on a short video) is dropped, since it would be the same training item.
    `uniform` with `frame_sample=1` behaves as `head`, as in musubi-tuner. Raises ValueError for an
    unknown mode or a stride/sample count below 1.
    """
    if mode not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"frame_extraction must be one of {FRAME_EXTRACTION_MODES}, got {mode!r}")
    if frame_stride < 1 or frame_sample < 1:
        raise ValueError(f"frame_stride and frame_sample must be >= 1, got {frame_stride} and {frame_sample}")
    if mode == "uniform" and frame_sample == 1:
        mode = "head"
    if mode == "full":
        count = round_to_4n1(min(total_frames, max_frames))
        return [(0, count)] if count >= 1 else []

    clips: list[tuple[int, int]] = []
    for t in target_frames:
        if total_frames < t:
            continue
        last_start = total_frames - t
        if mode == "head":
            starts = [0]
        elif mode == "chunk":
            starts = list(range(0, last_start + 1, t))
        elif mode == "slide":
            starts = list(range(0, last_start + 1, frame_stride))
        else:
            # integer linspace truncates toward zero, matching numpy's dtype=int cast in musubi-tuner
            starts = np.linspace(0, last_start, frame_sample).astype(int).tolist()
        for start in starts:
            if (start, t) not in clips:
                clips.append((start, t))
    return clips


def fps_kept_indices(source_fps: float, target_fps: float) -> Iterator[int]:
    """Yield, forever, the indices of the source frames kept when converting `source_fps` to `target_fps`.

    musubi-tuner's rule: a running fractional index starts at 0 and advances by target/source per
    source frame; a frame is kept when the integer part differs from the last kept one. This only
    drops frames (no interpolation, no duplication). The float is accumulated by repeated addition, as
    there, because rounding in that sum decides which frames survive.
    """
    if source_fps is None or target_fps is None or source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"source_fps and target_fps must be > 0, got {source_fps} and {target_fps}")
    delta = target_fps / source_fps
    position = 0.0
    previous = -1
    for index in itertools.count():
        current = int(position)
        position += delta
        if current != previous:
            previous = current
            yield index


def count_after_fps(total_frames: int, source_fps: float | None, target_fps: float | None) -> int:
    """Number of frames left from `total_frames` after fps decimation (all of them when `source_fps` is None)."""
    if source_fps is None:
        return total_frames
    kept = 0
    for index in fps_kept_indices(source_fps, target_fps):
        if index >= total_frames:
            break
        kept += 1
    return kept
