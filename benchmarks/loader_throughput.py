"""Benchmark: item decoding throughput of `loader.iter_loaded`, one thread against a thread pool, in one go.

    python benchmarks/loader_throughput.py [--items 32] [--workers 4] [--frames 33] [--size 832x480]
    python benchmarks/loader_throughput.py --quick    # 4 small clips (tests/test_benchmarks.py)

Writes a synthetic dataset into a temp folder (`--items` MP4 clips of `--frames` frames at `--size`,
plus a quarter as many PNG images at the same size, each with a caption; only 4 distinct clips are
encoded, the rest are copies, since encoding is what is slow here), scans it with
`sources.scan_dataset` as a training run would (target_frames = [--frames], bucketing on, a
resolution of 3/4 of --size so every frame is also resized, as with real footage), then decodes
every item with `loader.load_item_frames` through `iter_loaded(workers=1)` and
`iter_loaded(workers=N)`. Prints items/s and frames/s of both and their ratio. Files are read from
the page cache (just written), so this measures decode + resize, not disk. Writing the dataset is
not timed; with the defaults the whole script takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from musubi_pipe.data import media
from musubi_pipe.data.loader import iter_loaded, load_item_frames
from musubi_pipe.data.sources import Item, scan_dataset


def synthetic_frames(count: int, width: int, height: int, seed: int) -> np.ndarray:
    """A colour pattern sliding sideways with a grain texture: compresses and decodes like plain footage."""
    rng = np.random.default_rng(seed)
    xs = np.arange(2 * width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)[:, None]
    base = np.empty((height, 2 * width, 3), np.uint8)
    base[..., 0] = 127 + 120 * np.sin(2 * np.pi * (xs / width + seed / 7))
    base[..., 1] = ys * 255 / height
    base[..., 2] = (xs + ys + 40 * seed) % 256
    base += rng.integers(0, 8, base.shape, dtype=np.uint8)  # grain, so the encoder has detail to keep
    step = max(1, width // (2 * count))
    return np.stack([base[:, i * step : i * step + width] for i in range(count)])


def build_dataset(root: Path, items: int, frames: int, width: int, height: int,
                  distinct: int = 4) -> tuple[Path, Path]:
    """Write `items` clips and items // 4 images with captions; return (video folder, image folder).

    Only `distinct` clips are encoded (x264 at crf 16 is slow on small machines); the others are
    copies, which decode at exactly the same cost.
    """
    videos, images = root / "videos", root / "images"
    for i in range(items):
        target = videos / f"clip_{i:03d}.mp4"
        if i < distinct:
            media.write_mp4(target, synthetic_frames(frames, width, height, i), fps=16)
        else:
            shutil.copyfile(videos / f"clip_{i % distinct:03d}.mp4", target)
        (videos / f"clip_{i:03d}.txt").write_text(f"synthetic clip {i}", encoding="utf-8")
    for i in range(max(1, items // 4)):
        media.write_png(images / f"image_{i:03d}.png", synthetic_frames(1, width, height, 1000 + i)[0])
        (images / f"image_{i:03d}.txt").write_text(f"synthetic image {i}", encoding="utf-8")
    return videos, images


def scan(videos: Path, images: Path, frames: int, resolution: tuple[int, int]) -> list[Item]:
    """Items of both folders, scanned as a training run would."""
    common = {"resolution": list(resolution), "enable_bucket": True, "caption_extension": ".txt"}
    items: list[Item] = []
    for index, entry in enumerate([{"video_directory": str(videos), "target_frames": [frames], **common},
                                   {"image_directory": str(images), **common}]):
        found, skips = scan_dataset(entry, index, 16.0, f"bench[{index}]")
        if skips:
            raise SystemExit(f"unexpected skips: {skips}")
        items.extend(found)
    return items


def throughput(items: list[Item], workers: int) -> tuple[float, float]:
    """(items/s, frames/s) of decoding every item through iter_loaded with `workers` threads."""
    started = time.perf_counter()
    frames = 0
    for item, result in iter_loaded(items, load_item_frames, workers=workers):
        if isinstance(result, Exception):
            raise SystemExit(f"{item.media_path}: {result}")
        frames += len(result)
    seconds = time.perf_counter() - started
    return len(items) / seconds, frames / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=32, help="number of video clips (plus a quarter as many PNGs)")
    parser.add_argument("--workers", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                        help="threads for the parallel run (default: CPU count, 2 to 8)")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip (4n+1)")
    parser.add_argument("--size", default="832x480", help="WxH of the synthetic media (even numbers)")
    parser.add_argument("--quick", action="store_true", help="4 clips of 5 frames at 64x48 (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.items, args.frames, args.size, args.workers = 4, 5, "64x48", 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    resolution = (width * 3 // 4, height * 3 // 4)
    with tempfile.TemporaryDirectory() as root:
        began = time.perf_counter()
        videos, images = build_dataset(Path(root), args.items, args.frames, width, height)
        items = scan(videos, images, args.frames, resolution)
        print(f"dataset:   {len(items)} items ({args.items} clips of {args.frames} frames + "
              f"{len(items) - args.items} images) at {width}x{height} -> bucket {items[0].bucket[0]}x"
              f"{items[0].bucket[1]}, written in {time.perf_counter() - began:.1f} s; {os.cpu_count()} CPUs")
        single = throughput(items, 1)
        pooled = throughput(items, args.workers)
    print(f"workers=1: {single[0]:7.2f} items/s {single[1]:8.1f} frames/s")
    print(f"workers={args.workers}: {pooled[0]:7.2f} items/s {pooled[1]:8.1f} frames/s")
    print(f"speed-up:  {pooled[0] / single[0]:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
