"""Control media: which files are an item's controls, and the size each is resized to.

Control images and videos are the extra inputs some tasks train with (FLUX.1 Kontext, Qwen-Image
Edit and FLUX.2 references, Wan Fun-Control videos, one-frame training). The rules are
musubi-tuner's (`dataset/datasources.py`), so a control folder laid out for it works unchanged:

- Control images of target `image1.jpg` are the images in the control folder whose stem is `image1`
  or starts with `image1_`, ordered unsuffixed first, then by the numeric suffix (`_0`, `_1`,
  `_0010`, ...). A non-numeric suffix is an error for that item. Longer target stems claim their
  files first, so `a_1.png` belongs to a target `a_1` rather than to `a` when both exist.
- The control video of target `clip.mp4` is `clip.mp4` in the control folder, else a folder `clip/`
  of frames, else any video file with stem `clip`.

Sizes (`control_bucket`): by default a control is resized to its item's bucket. With
`control_resolution` it gets its own bucket of that area, chosen by aspect ratio; with
`no_resize_control` it keeps its own size floored to the step (cropped, not scaled), and a
`control_resolution` given with it is a maximum area.
"""

from __future__ import annotations

import math
from pathlib import Path

from musubi_pipe.data.buckets import floor_to
from musubi_pipe.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, list_media
from musubi_pipe.errors import MediaError


def _suffix_order(stem: str, control: Path) -> int:
    """Sort position of `control` among the controls of `stem`: -1 unsuffixed, else its numeric suffix."""
    if control.stem == stem:
        return -1
    suffix = control.stem[len(stem) + 1 :]
    if not suffix.isdigit():
        raise MediaError(control, f"control image {control.name}: suffix {suffix!r} is not a number; name controls of "
                         f"{stem} as {stem}.png, {stem}_0.png, {stem}_1.png, ...")
    return int(suffix)


def match_control_images(targets: list[Path], control_dir: Path) -> dict[Path, list[Path] | MediaError]:
    """Map each target image to its ordered control images, or to the MediaError that rules it out."""
    available = list_media(control_dir, IMAGE_EXTENSIONS)
    claimed: set[Path] = set()
    found: dict[Path, list[Path] | MediaError] = {}
    for target in sorted(targets, key=lambda p: (-len(p.stem), p.name)):
        stem = target.stem
        mine = [c for c in available if c not in claimed and (c.stem == stem or c.stem.startswith(stem + "_"))]
        claimed.update(mine)
        if not mine:
            found[target] = MediaError(target, f"no control image in {control_dir} (expected {stem}.png or "
                                       f"{stem}_0.png, any image extension); add one or remove the image")
            continue
        try:
            found[target] = sorted(mine, key=lambda c: (_suffix_order(stem, c), c.name))
        except MediaError as exc:
            found[target] = exc
    return found


def match_control_video(target: Path, control_dir: Path) -> Path:
    """Return the control video (file or frame folder) of a target video; raises MediaError if none."""
    same = control_dir / target.name
    if same.is_file():
        return same
    folder = control_dir / target.stem
    if folder.is_dir():
        return folder
    for candidate in list_media(control_dir, VIDEO_EXTENSIONS):
        if candidate.stem == target.stem:
            return candidate
    raise MediaError(target, f"no control video in {control_dir} (expected {target.name}, a folder "
                     f"{target.stem}/ of frames, or {target.stem} with any video extension); add one or "
                     "remove the video")


def resolution_bucket(width: int, height: int, area: int, step: int = 16) -> tuple[int, int]:
    """The bucket of about `area` pixels closest in aspect ratio to width x height (musubi-tuner's
    control_resolution routine: w0 = floor(sqrt(area * ratio)), w tried at w0 + i*step for i in -2..2)."""
    ratio = width / height
    w0 = floor_to(math.isqrt(int(area * ratio)), step)
    best, best_error = None, math.inf
    for w in (w0 + i * step for i in range(-2, 3)):
        if w <= 0:
            continue
        h = floor_to(area // w, step)
        if h <= 0:
            continue
        error = abs(w / h - ratio)
        if error < best_error:
            best, best_error = (w, h), error
    if best is None:
        raise ValueError(f"control_resolution area {area} is too small for {step}-pixel buckets")
    return best


def control_bucket(
    size: tuple[int, int],
    item_bucket: tuple[int, int],
    control_resolution: tuple[int, int] | None,
    no_resize_control: bool,
    step: int = 16,
) -> tuple[int, int]:
    """The (w, h) a control of `size` is resized and centre-cropped to (see the module docstring)."""
    width, height = size
    area = control_resolution[0] * control_resolution[1] if control_resolution else None
    if no_resize_control and (area is None or width * height <= area):
        bucket = (floor_to(width, step), floor_to(height, step))
        if 0 in bucket:
            raise ValueError(f"a {width}x{height} control is smaller than one {step}-pixel step")
        return bucket
    if area is not None:
        return resolution_bucket(width, height, area, step)
    return item_bucket
