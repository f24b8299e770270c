"""Decoding training items to bucketed pixels, in parallel, in order, with bounded memory.

`load_item_frames` and `load_control_frames` turn one `sources.Item` into the uint8 frames training
sees (decoded, fps-converted, resized and centre-cropped to the item's bucket); `iter_loaded` runs
such a load function over many items on a thread pool (PyAV and PIL release the GIL while
decoding) and yields the results in input order, with a `MediaError` returned rather than raised so
that the caller can count the item as skipped. Used by the latent cache stage and by
`preview.write_preview`. numpy and PIL only: no torch here.
"""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from musubi_pipe.data.buckets import resize_to_bucket
from musubi_pipe.data.media import load_image, load_video_frames
from musubi_pipe.data.sources import Item
from musubi_pipe.errors import MediaError

T = TypeVar("T")
R = TypeVar("R")


def load_item_frames(item: Item) -> np.ndarray:
    """The item's pixels as uint8 [F, H, W, 3] at its bucket (F=1 for an image). Raises MediaError."""
    if item.kind == "image":
        frames = load_image(item.media_path)[None]
    else:
        frames = load_video_frames(item.media_path, item.start, item.frames, item.source_fps, item.target_fps)
    return resize_to_bucket(frames, tuple(item.bucket))


def _control_buckets(item: Item) -> tuple[tuple[int, int], ...]:
    """Bucket (w, h) of each control: `item.control_buckets`, or the item's own bucket when none are set."""
    buckets = item.control_buckets or (tuple(item.bucket),) * len(item.controls)
    if len(buckets) != len(item.controls):
        raise ValueError(f"item {item.key}: {len(item.controls)} control(s) but {len(buckets)} control bucket(s)")
    return tuple(tuple(b) for b in buckets)


def load_control_frames(item: Item) -> list[np.ndarray]:
    """The item's control media as uint8 [F, H, W, 3] arrays, one per control, each at its own bucket.

    For an image item every control is an image (F=1). A video item has exactly one control, a video
    file or frame folder that follows the item's clip (same start, length and fps conversion); as in
    musubi-tuner, a control shorter than needed repeats its last frame and a longer one is cut.
    Returns [] for an item without controls. Raises MediaError for unreadable control media.
    """
    buckets = _control_buckets(item)
    if item.kind == "image":
        return [resize_to_bucket(load_image(path)[None], bucket) for path, bucket in zip(item.controls, buckets)]
    if not item.controls:
        return []
    if len(item.controls) != 1:
        raise ValueError(f"video item {item.key} has {len(item.controls)} controls; a video takes exactly one")
    frames = load_video_frames(item.controls[0], item.start, item.frames, item.source_fps, item.target_fps,
                               pad=True)
    return [resize_to_bucket(frames, buckets[0])]


def _call(load: Callable[[T], R], item: T) -> R | MediaError:
    """`load(item)`, or the MediaError it raised (any other exception propagates)."""
    try:
        return load(item)
    except MediaError as exc:
        return exc


def iter_loaded(
    items: Iterable[T],
    load: Callable[[T], R],
    workers: int,
    prefetch: int | None = None,
) -> Iterator[tuple[T, R | MediaError]]:
    """Yield `(item, load(item))` in input order; a MediaError from `load` is yielded as the result.

    With `workers` > 1, loads run on that many threads with at most `prefetch` (default 2 * workers)
    items submitted and not yet yielded, so memory stays bounded however long `items` is; with
    `workers` <= 1 they run in the calling thread. Exceptions other than MediaError propagate, from
    the item they belong to. Closing the generator early cancels the loads not yet started and does
    not wait for the running ones (their results are dropped).
    """
    if workers <= 1:
        for item in items:
            yield item, _call(load, item)
        return
    limit = max(1, 2 * workers if prefetch is None else prefetch)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="musubi-load")
    pending: deque[tuple[T, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(_call, load, item)))
            if len(pending) >= limit:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
