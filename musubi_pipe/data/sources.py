"""Dataset scanning: turn one musubi-tuner style dataset entry into training items (one per image or video clip).

`scan_dataset` reads a dataset entry with musubi-tuner's keys (see `dataset_config`): media come
from a folder (`image_directory` / `video_directory`, each file with a same-stem caption file) or
from JSONL metadata (`image_jsonl_file` / `video_jsonl_file`); controls from `control_directory`
or the JSONL `control_path` keys (see `controls`). It picks each item's bucket and, for videos, its
clips. It reads only headers and container metadata, so it is cheap enough to run at plan time;
pixels are decoded later by the latent cache stage. Media that cannot be used come back as `Skip`s
with a reason (the caller counts and logs them, or with `dataset.strict` reports them as errors)
instead of being dropped silently as musubi-tuner does.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from musubi_pipe.data import dataset_config
from musubi_pipe.data.buckets import select_bucket
from musubi_pipe.data.controls import control_bucket, match_control_images, match_control_video
from musubi_pipe.data.frames import count_after_fps, extract_clips, round_target_frames
from musubi_pipe.data.jsonl import Record, read_jsonl
from musubi_pipe.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, image_info, image_size, probe_video, scan_folder
from musubi_pipe.errors import ConfigError, MediaError

logger = logging.getLogger(__name__)

# Allowed keys of an image / a video dataset entry and their defaults (None: unset).
DATASET_KEYS = dataset_config.DATASET_KEYS


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
    # control media (musubi-tuner's control_directory / control_path): images in order, or one video
    # (a file or a folder of frames) that follows the item's clip; each resized to its own bucket (w, h)
    controls: tuple[str, ...] = ()
    control_buckets: tuple[tuple[int, int], ...] = ()

    @property
    def key(self) -> str:
        """Readable id, unique within a dataset: `<stem>_<start:05d>-<frames:03d>_<bucket w>x<bucket h>`."""
        return f"{Path(self.media_path).stem}_{self.start:05d}-{self.frames:03d}_{self.bucket[0]}x{self.bucket[1]}"


@dataclass
class Skip:
    """A media file left out of the dataset, and why (with how to fix it)."""

    path: str
    reason: str


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


def _folder_exists(settings: dict, key: str, prefix: str) -> list[tuple[str, str]]:
    value = settings.get(key)
    if value is not None and Path(value).exists() and not Path(value).is_dir():
        return [(f"{prefix}.{key}", f"{value} is a file, not a folder; point {key} at the folder that holds the "
                 "media (or use image_jsonl_file / video_jsonl_file for a metadata file)")]
    if value is not None and not Path(value).is_dir():
        return [(f"{prefix}.{key}", f"folder {value} does not exist; fix the path (relative paths are from the "
                 "current working directory)")]
    return []


def _records(settings: dict, prefix: str) -> tuple[list[Record], list["Skip"]]:
    """The entry's media files with their captions (folder datasets) or JSONL lines, and the other files of a
    folder dataset with the reason each is not used."""
    kind = settings["kind"]
    directory = settings[f"{kind}_directory"]
    if directory is None:
        jsonl_key = f"{kind}_jsonl_file"
        return read_jsonl(settings[jsonl_key], kind, f"{prefix}.{jsonl_key}"), []
    extensions = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    extension = settings["caption_extension"]
    files, unused = scan_folder(directory, extensions, companions=(extension,))
    if not files:
        suffixes = " ".join(extensions[: len(extensions) // 2])
        found = f" (it holds {len(unused)} other entr{'y' if len(unused) == 1 else 'ies'}, e.g. {unused[0][0].name}: " \
                f"{unused[0][1]})" if unused else ""
        raise ConfigError([(f"{prefix}.{kind}_directory", f"folder {directory} holds no {kind} files ({suffixes})"
                            f"{found}; add some or point the key at the right folder")])
    records = [Record(media=f, caption=None, caption_path=f.with_name(f.stem + extension), controls=None, where="")
               for f in files]
    return records, [Skip(str(path), reason) for path, reason in unused]


def _control_lists(records: list[Record], settings: dict) -> dict[Path, list[Path] | MediaError]:
    """Controls of every record that takes them from control_directory (JSONL lines carry their own)."""
    control_dir = settings.get("control_directory")
    wanting = [r.media for r in records if r.controls is None]
    if control_dir is None or not wanting:
        return {}
    control_dir = Path(control_dir)
    if settings["kind"] == "image":
        return match_control_images(wanting, control_dir)
    found: dict[Path, list[Path] | MediaError] = {}
    for media in wanting:
        try:
            found[media] = [match_control_video(media, control_dir)]
        except MediaError as exc:
            found[media] = exc
    return found


def _clips(media: Path, settings: dict, target_fps: float) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(first-frame size, clips) of a video; raises MediaError if no clip fits."""
    info = probe_video(media)
    source_fps = settings["source_fps"]
    total = count_after_fps(info.frames, source_fps, target_fps)
    clips = extract_clips(total, settings["target_frames"], settings["frame_extraction"], settings["frame_stride"],
                          settings["frame_sample"], settings["max_frames"])
    if not clips:
        after = f" after converting {source_fps} to {target_fps} fps" if source_fps else ""
        raise MediaError(media, f"video has {total} frame(s){after}, fewer than every target_frames value "
                         f"{list(settings['target_frames'])}; lower target_frames or remove the video")
    return (info.width, info.height), clips


def _control_buckets(controls: list[Path], kind: str, bucket: tuple[int, int], settings: dict,
                     step: int) -> list[tuple[int, int]]:
    """Bucket of each control: a control video follows its clip; control images may have their own."""
    if kind == "video":
        try:
            probe_video(controls[0])  # a broken control is found now, not mid-cache
        except MediaError as exc:
            raise MediaError(controls[0], f"control video {controls[0]}: {_reason(exc)}") from None
        return [bucket]
    buckets = []
    for control in controls:
        try:
            size = image_size(control)
        except MediaError as exc:
            raise MediaError(control, f"control image {control}: {_reason(exc)}") from None
        try:
            buckets.append(control_bucket(size, bucket, settings["control_resolution"],
                                          settings["no_resize_control"], step))
        except ValueError as exc:
            raise MediaError(control, f"control {control.name}: {exc}; use a larger control image or unset "
                             "no_resize_control") from None
    return buckets


def _scan_record(record: Record, controls: list[Path] | MediaError | None, settings: dict, index: int,
                 target_fps: float, step: int, notes: dict[str, list[str]]) -> list[Item]:
    """Items of one media file; raises MediaError if the file, its caption or its controls cannot be used.
    What the user should know about usable media (alpha dropped, extreme resizing) goes into `notes`."""
    if record.problem:
        raise MediaError(record.media, record.problem)
    caption = record.caption if record.caption is not None else read_caption(record.caption_path)
    if isinstance(controls, MediaError):
        raise controls
    kind = settings["kind"]
    if kind == "image":
        (size, alpha), clips, source_fps, item_fps = image_info(record.media), [(0, 1)], None, None
        if alpha:
            notes.setdefault("alpha", []).append(record.media.name)
    else:
        size, clips = _clips(record.media, settings, target_fps)
        source_fps, item_fps = settings["source_fps"], target_fps
    try:
        bucket = select_bucket(size[0], size[1], settings["resolution"], settings["enable_bucket"],
                               settings["bucket_no_upscale"], step)
    except ValueError as exc:
        raise MediaError(record.media, f"{exc}; use a larger picture or set bucket_no_upscale = false") from None
    resized = _extreme_resize(size, bucket)
    if resized:
        notes.setdefault(resized[0], []).append(f"{record.media.name} {resized[1]}")
    controls = list(controls or ())
    control_buckets = _control_buckets(controls, kind, bucket, settings, step) if controls else []
    caption_path = str(record.caption_path) if record.caption_path else None
    return [
        Item(dataset_index=index, media_path=str(record.media), caption=caption, caption_path=caption_path,
             kind=kind, start=start, frames=count, bucket=bucket, source_size=size, source_fps=source_fps,
             target_fps=item_fps, controls=tuple(str(c) for c in controls),
             control_buckets=tuple(control_buckets))
        for start, count in clips
    ]


def scan_dataset(entry: dict, index: int, target_fps: float, key_prefix: str,
                 bucket_step: int = 16) -> tuple[list[Item], list[Skip]]:
    """Items and skips of one dataset entry, ordered by file (name, or JSONL line), then clip length and start.

    `entry` holds the entry's keys with `general` already merged in; `index` is the entry's position
    among the datasets, `target_fps` the model's frame rate (used with `source_fps`), `key_prefix` the
    entry's config path (e.g. "dataset.datasets[0]") for messages, `bucket_step` the pixel multiple
    of bucket sides (16 for Wan2.1, 32 for Wan2.2 TI2V-5B). Raises ConfigError for bad settings, a
    missing folder or JSONL file, malformed JSONL, or a source without media.
    """
    problems = dataset_config.check_entry(entry, key_prefix)
    settings = dataset_config.merged_entry(None, entry)
    if settings["kind"] == "video" and not problems:
        settings["target_frames"] = round_target_frames(settings["target_frames"], f"{key_prefix}.target_frames")
        if settings["frame_extraction"] == "uniform" and settings["frame_sample"] == 1:
            logger.warning("%s.frame_extraction='uniform' with frame_sample=1 takes one clip per length: using "
                           "'head'", key_prefix)
    for key in (f"{settings['kind']}_directory", "control_directory"):
        problems += _folder_exists(settings, key, key_prefix)
    if problems:
        raise ConfigError(problems)
    records, skips = _records(settings, key_prefix)
    control_lists = _control_lists(records, settings)
    items: list[Item] = []
    notes: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for record in records:
        media = record.media
        first = seen.setdefault(media.stem, str(media))
        if first != str(media):
            # same stem = same caption file and same item keys: the second would silently replace the first
            other = Path(first).name if Path(first).parent == media.parent else first
            skips.append(Skip(str(media), _where(record, f"same name stem as {other}; rename one of them")))
            continue
        controls = record.controls if record.controls is not None else control_lists.get(media)
        try:
            items.extend(_scan_record(record, controls, settings, index, target_fps, bucket_step, notes))
        except MediaError as exc:
            skips.append(Skip(str(media), _where(record, _reason(exc))))
    if settings[f"{settings['kind']}_directory"] is not None:
        skips.sort(key=lambda skip: skip.path)  # a folder's files by name (JSONL skips stay in line order)
    for kind, names in notes.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        logger.warning("%s: %d %s: %s", key_prefix, len(names), NOTES[kind], shown)
    return items, skips


# What the scan warns about (usable media, but maybe not as the user meant), per dataset entry.
UPSCALE_WARN = 4.0  # the picture is enlarged more than this to cover its bucket
CROP_WARN = 0.25  # less than this share of the picture's area survives the crop to its bucket
NOTES = {
    "alpha": "image(s) with an alpha channel: it is dropped and the colour under transparent pixels is trained "
             "on, as in musubi-tuner; flatten them onto a background first if that colour is not meant to be seen",
    "upscale": f"media upscaled more than {UPSCALE_WARN:g}x to their bucket (blurry training data; use larger "
               "media or a smaller resolution, or set bucket_no_upscale = true)",
    "crop": f"media cropped to less than {CROP_WARN:.0%} of their area by their bucket (the subject may be cut "
            "away; set enable_bucket = true or crop them yourself)",
}


def _extreme_resize(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[str, str] | None:
    """("upscale" | "crop", what happens) when covering `bucket` enlarges the media or crops it too far."""
    (width, height), (bucket_w, bucket_h) = size, bucket
    scale = max(bucket_w / width, bucket_h / height)
    kept = bucket_w * bucket_h / (width * scale * height * scale)
    change = f"{width}x{height} -> {bucket_w}x{bucket_h}"
    if scale > UPSCALE_WARN:
        return "upscale", f"({change}, {scale:.0f}x)"
    if kept < CROP_WARN:
        return "crop", f"({change} keeps {kept:.1%})"
    return None


def _where(record: Record, reason: str) -> str:
    return f"{record.where}: {reason}" if record.where else reason


def _reason(exc: MediaError) -> str:
    """A MediaError's message without its path prefix (messages about a caption or control file name it)."""
    return str(exc).removeprefix(f"{exc.path}: ")
