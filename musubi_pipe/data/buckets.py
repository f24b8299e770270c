"""Aspect-ratio buckets: the list of bucket sizes, which bucket a picture goes to, and the resize into it.

Used by `sources.scan_dataset` (bucket per item, decided from the image or first video frame size)
and by the latent cache stage (resize decoded frames before the VAE). Follows musubi-tuner's
`BucketSelector` and `resize_image_to_bucket`; all sizes are (width, height).
"""

import math

import numpy as np
from PIL import Image


def floor_to(value: int, step: int) -> int:
    """Round `value` down to a multiple of `step`."""
    return value - value % step


def bucket_resolutions(resolution: tuple[int, int], enable_bucket: bool, step: int = 16) -> list[tuple[int, int]]:
    """Return the sorted bucket sizes (w, h) for a target `resolution` (W, H).

    Without bucketing there is one bucket, `resolution` floored to `step` (so the latent grid is
    whole). With bucketing, for A = W*H and r = floor(sqrt(A)): every w from floor_step(r/2) up to
    (exclusive) r+step in steps of `step` gives h = floor_step(A // w); both (w, h) and (h, w) are
    buckets. No bucket has more than A pixels.
    """
    width, height = resolution
    if not enable_bucket:
        return [(floor_to(width, step), floor_to(height, step))]
    area = width * height
    root = math.isqrt(area)
    sizes = set()
    for w in range(floor_to(root // 2, step), root + step, step):
        h = floor_to(area // w, step)
        sizes.add((w, h))
        sizes.add((h, w))
    return sorted(sizes)


def select_bucket(
    width: int,
    height: int,
    resolution: tuple[int, int],
    enable_bucket: bool,
    bucket_no_upscale: bool,
    step: int = 16,
) -> tuple[int, int]:
    """Return the bucket (w, h) for a picture of `width` x `height`.

    With `bucket_no_upscale` (only honoured when bucketing is on) a picture of at most W*H pixels keeps
    its own size floored to `step`, so it is cropped, never scaled. Otherwise the bucket with the
    smallest absolute difference of aspect ratios w/h wins; ties go to the first in sorted order.
    Raises ValueError for a picture that would floor to an empty bucket.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"picture size must be positive, got {width}x{height}")
    if enable_bucket and bucket_no_upscale and width * height <= resolution[0] * resolution[1]:
        bucket = (floor_to(width, step), floor_to(height, step))
        if 0 in bucket:
            raise ValueError(f"a {width}x{height} picture is smaller than one {step}-pixel step")
        return bucket
    buckets = bucket_resolutions(resolution, enable_bucket, step)
    ratio = width / height
    errors = [abs(w / h - ratio) for w, h in buckets]
    return buckets[errors.index(min(errors))]


def resize_to_bucket(frames: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Cover-resize `frames` ([H,W,3] or [F,H,W,3] uint8) to the bucket (w, h) and centre-crop; same rank out.

    scale = max(bw/w, bh/h) so the bucket is fully covered; the scaled size is rounded to nearest.
    Upscaling uses Lanczos; downscaling uses a box filter (area average, like OpenCV's INTER_AREA).
    All frames of a clip get the identical resize and crop.
    """
    if frames.ndim == 3:
        return resize_to_bucket(frames[None], bucket)[0]
    if frames.ndim != 4:
        raise ValueError(f"expected frames of shape [H,W,C] or [F,H,W,C], got {frames.shape}")
    bucket_w, bucket_h = bucket
    height, width = frames.shape[1:3]
    if (width, height) == (bucket_w, bucket_h):
        return frames
    scale = max(bucket_w / width, bucket_h / height)
    # max() guards against float error leaving the scaled side one pixel short of the bucket
    new_w = max(bucket_w, int(width * scale + 0.5))
    new_h = max(bucket_h, int(height * scale + 0.5))
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
        frames = np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), resample)) for f in frames])
    left = (new_w - bucket_w) // 2
    top = (new_h - bucket_h) // 2
    return np.ascontiguousarray(frames[:, top : top + bucket_h, left : left + bucket_w])
