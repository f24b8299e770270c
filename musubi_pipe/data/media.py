"""Reading and writing images and videos as uint8 RGB numpy arrays.

The dataset scanner uses `list_media`, `image_size` and `probe_video` (cheap: headers and
container metadata); the latent cache stage uses `load_image` and `load_video_frames`; the demo
data set and the sample stage use `write_png` and `write_mp4`. A video is a file PyAV can open or a
folder of frame images (sorted by file name). Every unreadable file raises `MediaError` saying what
is wrong and how to fix it. PyAV is imported inside the functions that need it.
"""

import contextlib
import errno
import importlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image

from musubi_pipe.data.frames import fps_kept_indices
from musubi_pipe.fileio import temp_beside
from musubi_pipe.errors import MediaError

_BASE_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
# JPEG XL counts as an image only where a Pillow plugin for it is installed, as in musubi-tuner.
_JXL_PLUGINS = tuple(name for name in ("pillow_jxl", "jxlpy") if find_spec(name) is not None)
if _JXL_PLUGINS:
    _BASE_IMAGE_EXTENSIONS += (".jxl",)
_BASE_VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")

# Lower and upper case only, like musubi-tuner's globs: "photo.Png" is not picked up.
IMAGE_EXTENSIONS = _BASE_IMAGE_EXTENSIONS + tuple(e.upper() for e in _BASE_IMAGE_EXTENSIONS)
VIDEO_EXTENSIONS = _BASE_VIDEO_EXTENSIONS + tuple(e.upper() for e in _BASE_VIDEO_EXTENSIONS)

_REENCODE = "re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p out.mp4) or remove it"
_REEXPORT = "re-export it as PNG or JPEG, or remove it"


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns: exact frame count, container fps (0.0 if unknown), first-frame size."""

    frames: int
    fps: float
    width: int
    height: int


def list_media(directory: str | os.PathLike, extensions: tuple[str, ...]) -> list[Path]:
    """Files directly in `directory` whose suffix is in `extensions`, sorted by name; hidden files are ignored."""
    return scan_folder(directory, extensions)[0]


def scan_folder(directory: str | os.PathLike, extensions: tuple[str, ...],
                companions: tuple[str, ...] = ()) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(media files, [(path, why it is not used)]) of `directory`, both sorted by name.

    Hidden files and files ending in one of `companions` (caption files) are neither. Everything else
    that is not a readable media file is listed with its reason: another format (a GIF), a subfolder,
    a broken symlink or a symlink loop.
    """
    media, unused = [], []
    names = ", ".join(sorted({e.lower() for e in extensions}))
    for path in sorted(Path(directory).iterdir()):
        if path.name.startswith(".") or (companions and path.name.endswith(companions)):
            continue
        try:
            path.stat()
        except OSError as exc:
            target = os.readlink(path) if path.is_symlink() else "?"
            reason = "symlink loop" if exc.errno == errno.ELOOP else f"broken symlink to {target} (it does not exist)"
            unused.append((path, f"{reason}; fix or remove the link"))
            continue
        if path.is_dir():
            unused.append((path, "a folder: folders inside a dataset folder are not read; move its files up or "
                                 "give it its own dataset entry"))
        elif path.suffix not in extensions:
            unused.append((path, f"not a supported media format (supported: {names}); convert it or move it out"))
        else:
            media.append(path)
    return media, unused


@contextlib.contextmanager
def _open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Open an image with PIL, turning every failure into a MediaError."""
    if _JXL_PLUGINS and Path(path).suffix.lower() == ".jxl":
        # importing the plugin registers the format with Pillow
        importlib.import_module("jxlpy.JXLImagePlugin" if _JXL_PLUGINS[0] == "jxlpy" else _JXL_PLUGINS[0])
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise MediaError(path, "file not found; check the path or remove the entry") from None
    except Image.UnidentifiedImageError:
        raise MediaError(path, f"not a readable image (unknown or broken format); {_REEXPORT}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"image data is corrupt or truncated ({exc}); {_REEXPORT}") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels. Raises MediaError."""
    with _open_image(path) as image:
        return image.size


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def image_info(path: str | os.PathLike) -> tuple[tuple[int, int], bool]:
    """((width, height), whether it has an alpha channel), from the header without decoding pixels."""
    with _open_image(path) as image:
        alpha = image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
        return image.size, alpha


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to [H, W, 3] uint8 RGB. Raises MediaError.

    Palette, grayscale, CMYK and 16-bit images are converted by value: a 16-bit grayscale PNG keeps its
    tones (v * 255 / 65535), where Pillow's own convert("RGB") would clip them to white. An alpha channel
    is dropped and the colour under transparent pixels is kept, as musubi-tuner does (the scan warns).
    """
    with _open_image(path) as image:
        image.load()
        return to_rgb8(image)


def to_rgb8(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 RGB of a PIL image of any mode, high bit depths scaled rather than clipped."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values * 255.0 / 65535.0  # 16-bit samples (older Pillow opens 16-bit PNGs as "I")
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.error.FFmpegError, OSError, ValueError)


@contextlib.contextmanager
def _open_video_stream(path: str | os.PathLike):
    """Open a video file's first video stream with PyAV, turning every failure into a MediaError."""
    import av

    if not Path(path).exists():
        raise MediaError(path, "file not found; check the path or remove the entry")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(path, f"no video stream in the file; {_REENCODE}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            yield container, stream
    except _av_errors() as exc:
        raise MediaError(path, f"cannot decode the video ({exc}); {_REENCODE}") from None


def _probe_frame_folder(path: Path) -> VideoInfo:
    frames = list_media(path, IMAGE_EXTENSIONS)
    if not frames:
        raise MediaError(path, "folder holds no frame images; add frames (e.g. 00000.png ...) or remove the folder")
    width, height = image_size(frames[0])
    return VideoInfo(frames=len(frames), fps=0.0, width=width, height=height)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, container fps and size of a video file or frame folder. Raises MediaError.

    The first frame is always decoded, so a file whose stream does not decode is caught here, and its
    real size is used. When the container does not record a frame count, every frame is decoded to
    count them. A frame folder reports fps 0.0 (unknown).
    """
    path = Path(path)
    if path.is_dir():
        return _probe_frame_folder(path)
    with _open_video_stream(path) as (container, stream):
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is None:
            raise MediaError(path, f"the video has no decodable frames; {_REENCODE}")
        frames = stream.frames or 1 + sum(1 for _ in decoded)
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(frames=int(frames), fps=float(rate or 0.0), width=first.width, height=first.height)


def _wanted_indices(start: int, count: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    """Source frame indices of the `count` frames from position `start` after fps decimation."""
    if start < 0 or count < 1:
        raise ValueError(f"need start >= 0 and count >= 1, got start={start}, count={count}")
    if source_fps is None:
        return list(range(start, start + count))
    if target_fps is None:
        raise ValueError("source_fps needs target_fps (the fps the model is trained at)")
    return list(itertools.islice(fps_kept_indices(source_fps, target_fps), start, start + count))


def _too_short(path, got: int, wanted: int) -> MediaError:
    return MediaError(path, f"video ended after {got} frame(s) but frame {wanted} was needed; the file may be "
                      f"truncated: {_REENCODE}")


def _decode_file_frames(path: Path, wanted: list[int], earlier: set[int] | None = None) -> list[np.ndarray]:
    """Frames at source indices `wanted` of a video file.

    `earlier` (pad mode only) holds the kept source indices before the clip: a file that ends early
    then returns the frames it has, padded with its last kept frame, instead of raising.
    """
    wanted_set = set(wanted)
    frames = []
    decoded = 0
    with _open_video_stream(path) as (container, stream):
        last_earlier = None  # the latest kept frame before the clip, in case the file ends before it
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted_set:
                frames.append(frame.to_ndarray(format="rgb24"))
            elif earlier is not None and index in earlier:
                last_earlier = frame
            if index == wanted[-1]:
                break  # stop decoding as soon as the clip is complete
        if len(frames) < len(wanted) and earlier is not None and not frames and last_earlier is not None:
            frames.append(last_earlier.to_ndarray(format="rgb24"))
    if len(frames) < len(wanted):
        if earlier is None or not frames:
            raise _too_short(path, decoded, wanted[-1] + 1)
        frames.extend([frames[-1]] * (len(wanted) - len(frames)))
    return frames


def _folder_frames(path: Path, wanted: list[int], earlier: set[int] | None = None) -> list[np.ndarray]:
    """Frames at source indices `wanted` of a frame folder; `earlier` as in `_decode_file_frames`."""
    files = list_media(path, IMAGE_EXTENSIONS)
    if wanted[-1] < len(files):
        return [load_image(files[i]) for i in wanted]
    present = [i for i in wanted if i < len(files)]
    if earlier is not None and not present:
        present = sorted(i for i in earlier if i < len(files))[-1:]  # the clip starts after the last frame
    if earlier is None or not present:
        raise MediaError(path, f"folder holds {len(files)} frame images but frame {wanted[-1] + 1} was needed; "
                         "add the missing frames or lower target_frames")
    frames = [load_image(files[i]) for i in present]
    return frames + [frames[-1]] * (len(wanted) - len(frames))


def load_video_frames(
    path: str | os.PathLike,
    start: int,
    count: int,
    source_fps: float | None = None,
    target_fps: float | None = None,
    pad: bool = False,
) -> np.ndarray:
    """Decode `count` frames from position `start` as [count, H, W, 3] uint8 RGB. Raises MediaError.

    With `source_fps`, frames are first decimated from source_fps to target_fps (see
    `frames.fps_kept_indices`) and `start`/`count` index the kept frames; without it every frame
    counts, whatever the container's fps. Decoding stops at the last frame needed.

    A video that ends before the last wanted frame raises MediaError, unless `pad` is set: then the
    missing frames repeat the video's last (kept) frame, as musubi-tuner does for control videos
    shorter than their video; this needs at least one decodable frame.
    """
    path = Path(path)
    wanted = _wanted_indices(start, count, source_fps, target_fps)
    earlier = None  # pad mode: kept source indices before the clip, whose last one pads a clip past the end
    if pad:
        earlier = set(_wanted_indices(0, start, source_fps, target_fps)) if start > 0 else set()
    if path.is_dir():
        frames = _folder_frames(path, wanted, earlier)
    else:
        frames = _decode_file_frames(path, wanted, earlier)
    if len({f.shape for f in frames}) > 1:
        raise MediaError(path, f"frame size changes within the video; {_REENCODE} at one size")
    return np.stack(frames)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; move it into place on success, delete it on failure."""
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _pick_video_codec() -> str:
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.error.FFmpegError, ValueError):
        return "mpeg4"  # part of every FFmpeg build, unlike libx264


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write [F, H, W, 3] uint8 RGB frames as an H.264 (or MPEG-4 part 2) yuv420p MP4, atomically.

    H and W must be even (yuv420p halves the chroma planes); padding or cropping is the caller's
    choice, so odd sizes raise ValueError, as do a wrong shape or dtype and fps <= 0.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected non-empty uint8 frames [F,H,W,3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even width and height, got {width}x{height}; pad or crop first")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    codec = _pick_video_codec()
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_target(path) as tmp, av.open(tmp, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "16", "preset": "medium"}
        else:
            # fixed quantiser 2 (FF_QP2LAMBDA = 118): near-lossless, as mpeg4 has no crf
            stream.codec_context.flags |= av.codec.context.Flags.qscale
            stream.codec_context.global_quality = 2 * 118
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))


def write_png(path: str | os.PathLike, frame: np.ndarray) -> None:
    """Write one [H, W, 3] uint8 RGB frame as PNG, atomically. Raises ValueError for another shape or dtype."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame [H,W,3], got {frame.dtype} {frame.shape}")
    with atomic_target(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")
