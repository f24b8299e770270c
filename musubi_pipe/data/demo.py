"""A tiny synthetic dataset (four images, one video, captions) for the demo recipe and the tests.

`make_demo_dataset(root)` draws simple coloured shapes with numpy (no fonts, no downloads) and
returns the two folders in the form a dataset entry takes them. The files are byte-identical on
every call, so the cache stages see the same inputs and reuse their entries; a version file written
last marks a complete dataset and lets later calls return without writing.
"""

import os
from pathlib import Path

import numpy as np

from musubi_pipe.data.media import atomic_target, write_mp4, write_png

# Bump when the drawn content changes, so existing demo folders are rewritten.
DEMO_VERSION = "1"
_MARKER = ".musubi_pipe_demo"

_WHITE, _BLACK, _GRAY = (255, 255, 255), (0, 0, 0), (160, 160, 160)
_RED, _GREEN, _BLUE, _YELLOW, _ORANGE = (220, 30, 30), (30, 180, 60), (40, 70, 210), (240, 210, 40), (240, 140, 20)


def _canvas(width: int, height: int, colour) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plain [H,W,3] image and its pixel-centre coordinate grids (y, x)."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = colour
    y, x = np.mgrid[0:height, 0:width] + 0.5
    return image, y, x


def _circle(width: int, height: int, background, colour, cx: float, cy: float, radius: float) -> np.ndarray:
    image, y, x = _canvas(width, height, background)
    image[(x - cx) ** 2 + (y - cy) ** 2 <= radius**2] = colour
    return image


def _images() -> dict[str, tuple[np.ndarray, str]]:
    """File stem -> (pixels, caption). The 80x48 image has another aspect ratio, to exercise bucketing."""
    square, _, _ = _canvas(64, 64, _BLACK)
    square[16:48, 16:48] = _GREEN
    triangle, y, x = _canvas(64, 64, _BLUE)
    triangle[(y >= 14) & (y <= 50) & (np.abs(x - 32) <= (y - 14) * 0.6)] = _YELLOW
    rectangle, _, _ = _canvas(80, 48, _GRAY)
    rectangle[14:34, 12:68] = _ORANGE
    return {
        "red_circle": (_circle(64, 64, _WHITE, _RED, 32, 32, 18), "a red circle on a white background"),
        "green_square": (square, "a green square on a black background"),
        "yellow_triangle": (triangle, "a yellow triangle on a blue background"),
        "orange_rectangle": (rectangle, "a wide orange rectangle on a gray background"),
    }


def _ball_frames(frames: int = 24, size: int = 64, radius: float = 8) -> np.ndarray:
    """A blue ball moving at constant speed from the left edge to the right edge."""
    xs = np.linspace(radius, size - radius, frames)
    return np.stack([_circle(size, size, _WHITE, _BLUE, x, size / 2, radius) for x in xs])


def _write_text(path: Path, text: str) -> None:
    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text + "\n")


def _is_complete(root: Path, expected: list[Path]) -> bool:
    marker = root / _MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == DEMO_VERSION and all(
        p.is_file() for p in expected
    )


def make_demo_dataset(root: str | os.PathLike) -> dict[str, str]:
    """Write (if needed) the demo dataset under `root`; return {"image_directory": ..., "video_directory": ...}.

    Images go to `root/images` (four PNGs, 64x64 and one 80x48, with .txt captions); the video is
    `root/video/ball.mp4` (24 frames, 16 fps, 64x64) with caption "a blue ball moving from left to right".
    Every file is written atomically and the version marker last, so an interrupted call is redone.
    """
    root = Path(root)
    image_dir, video_dir = root / "images", root / "video"
    images = _images()
    expected = [image_dir / f"{stem}{ext}" for stem in images for ext in (".png", ".txt")]
    expected += [video_dir / "ball.mp4", video_dir / "ball.txt"]
    if not _is_complete(root, expected):
        for stem, (pixels, caption) in images.items():
            write_png(image_dir / f"{stem}.png", pixels)
            _write_text(image_dir / f"{stem}.txt", caption)
        write_mp4(video_dir / "ball.mp4", _ball_frames(), fps=16)
        _write_text(video_dir / "ball.txt", "a blue ball moving from left to right")
        _write_text(root / _MARKER, DEMO_VERSION)
    return {"image_directory": str(image_dir), "video_directory": str(video_dir)}
