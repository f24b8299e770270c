"""Dataset scanning: turn one musubi-tuner style dataset entry into training items (one per image or video clip).

`scan_dataset` reads a dataset dict with musubi-tuner's keys (`image_directory` or
`video_directory`, `resolution`, `target_frames`, ...; see `DATASET_KEYS`), matches media files to
same-stem caption files in that folder, picks each item's bucket and, for videos, its clips. It
reads only headers and container metadata, so it is cheap enough to run at validation time; pixels
are decoded later by the latent cache stage. Media that cannot be used come back as `Skip`s with a
reason (the caller counts and logs them) instead of being dropped silently.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from musubi_pipe.data.buckets import select_bucket
from musubi_pipe.data.frames import FRAME_EXTRACTION_MODES, count_after_fps, extract_clips, round_target_frames
from musubi_pipe.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, image_size, list_media, probe_video
from musubi_pipe.errors import ConfigError, MediaError

logger = logging.getLogger(__name__)

_COMMON_KEYS = {
    "resolution": (960, 544),
    "caption_extension": ".txt",
    "batch_size": 1,
    "num_repeats": 1,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    # accepted so musubi-tuner TOML files load unchanged; our caches live in the content-addressed store
    "cache_directory": None,
}
IMAGE_DATASET_KEYS = MappingProxyType({"image_directory": None, **_COMMON_KEYS})
VIDEO_DATASET_KEYS = MappingProxyType(
    {
        "video_directory": None,
        **_COMMON_KEYS,
        "target_frames": (1,),
        "frame_extraction": "head",
        "frame_stride": 1,
        "frame_sample": 1,
        "max_frames": 129,
        "source_fps": None,
    }
)
# Allowed keys of an image / a video dataset entry and their defaults (None: unset).
DATASET_KEYS = MappingProxyType({"image": IMAGE_DATASET_KEYS, "video": VIDEO_DATASET_KEYS})


@dataclass(frozen=True)
class Item:
    """One training item: an image, or one clip of a video, at its bucket size."""

    dataset_index: int
    media_path: str
    caption: str
    caption_path: str | None
    kind: str  # "image" or "video"
    start: int  # first frame of the clip, counted after fps conversion; 0 for images
    frames: int  # 1 for images
    bucket: tuple[int, int]  # (w, h) the media is resized and cropped to
    source_size: tuple[int, int]  # (w, h) of the image or first video frame
    source_fps: float | None  # None: use every frame (always None for images)
    target_fps: float | None  # the model's fps; None for images

    @property
    def key(self) -> str:
        """Readable id, unique within a dataset: `<stem>_<start:05d>-<frames:03d>_<bucket w>x<bucket h>`."""
        return f"{Path(self.media_path).stem}_{self.start:05d}-{self.frames:03d}_{self.bucket[0]}x{self.bucket[1]}"


@dataclass
class Skip:
    """A media file left out of the dataset, and why (with how to fix it)."""

    path: str
    reason: str


@dataclass(frozen=True)
class _Settings:
    kind: str
    directory: Path
    caption_extension: str
    resolution: tuple[int, int]
    enable_bucket: bool
    bucket_no_upscale: bool
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None


def _positive_int(value, key: str, problems: list) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append((key, f"must be an integer >= 1, got {value!r}"))
        return 1
    return value


def _resolution(value, key: str, problems: list) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (_positive_int(value[0], key, problems), _positive_int(value[1], key, problems))
    problems.append((key, f"must be an integer or [width, height], got {value!r}"))
    return (1, 1)


def _video_settings(values: dict, prefix: str, problems: list) -> dict:
    """Check and normalise the video-only keys; problems are appended as (key, message)."""
    frame_extraction = values["frame_extraction"]
    if frame_extraction not in FRAME_EXTRACTION_MODES:
        problems.append((f"{prefix}.frame_extraction", f"must be one of {', '.join(FRAME_EXTRACTION_MODES)}, "
                         f"got {frame_extraction!r}"))
    target_frames = values["target_frames"]
    if not isinstance(target_frames, (list, tuple)) or not target_frames:
        problems.append((f"{prefix}.target_frames", f"must be a non-empty list of frame counts, got {target_frames!r}"))
        target_frames = (1,)
    target_frames = [_positive_int(t, f"{prefix}.target_frames", problems) for t in target_frames]
    source_fps = values["source_fps"]
    if source_fps is not None and (isinstance(source_fps, bool) or not isinstance(source_fps, (int, float))
                                   or source_fps <= 0):
        problems.append((f"{prefix}.source_fps", f"must be a number > 0 (e.g. 30.0) or unset, got {source_fps!r}"))
        source_fps = None
    settings = {
        "target_frames": tuple(round_target_frames(target_frames, key=f"{prefix}.target_frames")),
        "frame_extraction": frame_extraction,
        "source_fps": None if source_fps is None else float(source_fps),
    }
    for name in ("frame_stride", "frame_sample", "max_frames"):
        settings[name] = _positive_int(values[name], f"{prefix}.{name}", problems)
    if frame_extraction == "uniform" and settings["frame_sample"] == 1:
        logger.warning("%s.frame_extraction='uniform' with frame_sample=1 takes one clip per length: using 'head'",
                       prefix)
    return settings


def _directory(values: dict, kind: str, prefix: str, problems: list) -> Path:
    key = f"{prefix}.{kind}_directory"
    directory = values[f"{kind}_directory"]
    if directory is None:
        problems.append((f"{prefix}.image_directory", "not set; give image_directory (images) or video_directory "
                         "(videos), each a folder of media files with same-named caption files"))
    elif not Path(directory).is_dir():
        problems.append((key, f"folder {directory} does not exist; fix the path (relative paths are from the "
                         "current working directory)"))
    return Path(directory) if directory is not None else Path()


def _settings(entry: dict, prefix: str) -> _Settings:
    """Entry values with defaults filled in and checked; raises ConfigError listing every problem."""
    kind = "video" if entry.get("video_directory") is not None else "image"
    values = {**DATASET_KEYS[kind], **{k: v for k, v in entry.items() if v is not None}}
    problems: list[tuple[str, str]] = []
    directory = _directory(values, kind, prefix, problems)
    caption_extension = values["caption_extension"]
    if not isinstance(caption_extension, str) or not caption_extension:
        problems.append((f"{prefix}.caption_extension", f"must be a file suffix such as '.txt', got "
                         f"{caption_extension!r}"))
    video = _video_settings(values, prefix, problems) if kind == "video" else {}
    settings = _Settings(
        kind=kind,
        directory=directory,
        caption_extension=str(caption_extension),
        resolution=_resolution(values["resolution"], f"{prefix}.resolution", problems),
        enable_bucket=bool(values["enable_bucket"]),
        bucket_no_upscale=bool(values["bucket_no_upscale"]),
        **video,
    )
    if problems:
        raise ConfigError(problems)
    return settings


def read_caption(caption_path: Path) -> str:
    """Caption text, stripped. Raises MediaError (message starts with what is wrong) if unusable."""
    name = caption_path.name
    try:
        data = caption_path.read_bytes()
    except FileNotFoundError:
        raise MediaError(caption_path, f"no caption file {name}; write one next to the media file or remove "
                         "the media file") from None
    except OSError as exc:
        raise MediaError(caption_path, f"caption file {name} cannot be read ({exc}); fix its permissions") from None
    try:
        # utf-8-sig: a byte-order mark written by some editors must not end up in the prompt
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise MediaError(caption_path, f"caption file {name} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); re-save it as UTF-8") from None
    if not text:
        raise MediaError(caption_path, f"caption file {name} is empty; write a caption or remove the media file")
    return text


def _reason(exc: MediaError) -> str:
    """A MediaError's message without its path prefix (a Skip names the path itself)."""
    return str(exc).removeprefix(f"{exc.path}: ")


def _scan_file(media: Path, settings: _Settings, index: int, target_fps: float, bucket_step: int = 16) -> list[Item]:
    """Items of one media file; raises MediaError if the file or its caption cannot be used."""
    caption_path = media.with_name(media.stem + settings.caption_extension)
    caption = read_caption(caption_path)
    if settings.kind == "image":
        size = image_size(media)
        clips, source_fps, item_fps = [(0, 1)], None, None
    else:
        info = probe_video(media)
        size = (info.width, info.height)
        source_fps, item_fps = settings.source_fps, target_fps
        total = count_after_fps(info.frames, source_fps, target_fps)
        clips = extract_clips(total, settings.target_frames, settings.frame_extraction, settings.frame_stride,
                              settings.frame_sample, settings.max_frames)
        if not clips:
            after = f" after converting {source_fps} to {target_fps} fps" if source_fps else ""
            raise MediaError(media, f"video has {total} frame(s){after}, fewer than every target_frames value "
                             f"{list(settings.target_frames)}; lower target_frames or remove the video")
    try:
        bucket = select_bucket(size[0], size[1], settings.resolution, settings.enable_bucket,
                               settings.bucket_no_upscale, bucket_step)
    except ValueError as exc:
        raise MediaError(media, f"{exc}; use a larger picture or set bucket_no_upscale = false") from None
    return [
        Item(dataset_index=index, media_path=str(media), caption=caption, caption_path=str(caption_path),
             kind=settings.kind, start=start, frames=count, bucket=bucket, source_size=size,
             source_fps=source_fps, target_fps=item_fps)
        for start, count in clips
    ]


def scan_dataset(entry: dict, index: int, target_fps: float, key_prefix: str,
                 bucket_step: int = 16) -> tuple[list[Item], list[Skip]]:
    """Items and skips of one dataset entry, ordered by file name, then clip length, then clip start.

    `index` is the entry's position among the datasets, `target_fps` the model's frame rate (used with
    `source_fps`), `key_prefix` the entry's config path (e.g. "dataset.datasets[0]") for messages,
    `bucket_step` the pixel multiple of bucket sides (16 for Wan2.1, 32 for Wan2.2 TI2V-5B).
    Raises ConfigError for bad settings, a missing folder, or a folder without media files.
    """
    settings = _settings(entry, key_prefix)
    extensions = VIDEO_EXTENSIONS if settings.kind == "video" else IMAGE_EXTENSIONS
    files = list_media(settings.directory, extensions)
    if not files:
        key = f"{key_prefix}.{settings.kind}_directory"
        suffixes = " ".join(extensions[: len(extensions) // 2])
        raise ConfigError([(key, f"folder {settings.directory} holds no {settings.kind} files ({suffixes}); "
                            "add some or point the key at the right folder")])
    items: list[Item] = []
    skips: list[Skip] = []
    seen: dict[str, str] = {}
    for media in files:
        first = seen.setdefault(media.stem, media.name)
        if first != media.name:
            # same stem = same caption file and same item keys: the second would silently replace the first
            skips.append(Skip(str(media), f"same name stem as {first}; rename one of them"))
            continue
        try:
            items.extend(_scan_file(media, settings, index, target_fps, bucket_step))
        except MediaError as exc:
            skips.append(Skip(str(media), _reason(exc)))
    return items, skips
