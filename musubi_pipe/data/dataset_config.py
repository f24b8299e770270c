"""Dataset keys in musubi-tuner's schema: the one definition, its checks, and the TOML/JSON reader.

A dataset config is a `general` mapping (keys every dataset inherits) plus a list of `datasets`
entries, each an image or a video dataset. The same shapes come from two places:

- the `dataset` group of our YAML config: `check_datasets(general, datasets, "dataset")`;
- an existing musubi-tuner dataset config file, read unchanged: `load_musubi_config(path)`.

`GENERAL_KEYS`, `IMAGE_KEYS` and `VIDEO_KEYS` map each allowed key to (spec, default); a default of
None means unset. `check_datasets` returns every problem at once as (key path, message) pairs
(`check_entry` does the same for one entry); `merged_entry` resolves one entry's values
(entry > general > default) once they are known good.

Key paths of problems:

- YAML group: `f"{where}.general.{key}"` and `f"{where}.datasets[{i}].{key}"`, e.g.
  `dataset.datasets[1].frame_extraction`;
- musubi config file: `f"{path}: general.{key}"`, `f"{path}: datasets[{i}].{key}"` and
  `f"{path}: {top-level key}"`, e.g. `my_dataset.toml: datasets[1].frame_extraction`, where `path`
  is the path as given. Problems finding or parsing the file itself are reported on
  `dataset.musubi_config` (missing file, wrong extension) or on the path (syntax errors, with line
  and column).

Differences from musubi-tuner, all deliberate:

- `source_fps` accepts an integer (`source_fps = 30` means 30.0); musubi-tuner's schema rejects it
  and only takes a TOML float.
- `caption_extension` defaults to ".txt" (musubi-tuner: unset, which makes directory datasets fail).
- `cache_directory` is accepted so musubi-tuner files load unchanged, but ignored: our caches live
  in the content-addressed store.
- A key set to null (YAML) counts as unset; TOML has no null.
- Problems are collected and reported together, each with its key path and the fix, instead of
  stopping at voluptuous's first error.

Like musubi-tuner, keys not in the tables are errors, per-dataset keys are rejected in `general`,
an entry is a video dataset iff it sets `video_directory` or `video_jsonl_file`, a directory wins
over a JSONL file when both are set, deprecated keys are renamed with a warning, and relative paths
are left as written (they resolve against the working directory).
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from musubi_pipe.config.schema import unknown_key_message
from musubi_pipe.errors import ConfigError

logger = logging.getLogger(__name__)

# musubi-tuner's frame extraction modes (data.frames implements them)
FRAME_EXTRACTION = ("head", "chunk", "slide", "uniform", "full")

# Specs: "count" int >= 1, "index" int >= 0, "suffix" non-empty str, "path" str, "bool",
# "size" int or [W, H], "frames" non-empty list of ints >= 1, "indices" list of ints >= 0,
# "fps" number > 0, a tuple: one of its values. None (null) is always allowed and means unset.
GENERAL_KEYS: Mapping[str, tuple] = MappingProxyType(
    {
        "resolution": ("size", (960, 544)),
        "caption_extension": ("suffix", ".txt"),
        "batch_size": ("count", 1),
        "num_repeats": ("count", 1),
        "enable_bucket": ("bool", False),
        "bucket_no_upscale": ("bool", False),
    }
)
IMAGE_KEYS: Mapping[str, tuple] = MappingProxyType(
    {
        **GENERAL_KEYS,
        "image_directory": ("path", None),
        "image_jsonl_file": ("path", None),
        "cache_directory": ("path", None),  # accepted and ignored: caches live in the store
        "control_directory": ("path", None),
        "multiple_target": ("bool", False),
        "no_resize_control": ("bool", False),
        "control_resolution": ("size", None),
        "fp_latent_window_size": ("count", 9),
        "fp_1f_clean_indices": ("indices", None),
        "fp_1f_target_index": ("index", None),
        "fp_1f_no_post": ("bool", False),
    }
)
VIDEO_KEYS: Mapping[str, tuple] = MappingProxyType(
    {
        **GENERAL_KEYS,
        "video_directory": ("path", None),
        "video_jsonl_file": ("path", None),
        "cache_directory": ("path", None),  # accepted and ignored: caches live in the store
        "control_directory": ("path", None),
        "target_frames": ("frames", (1,)),
        "frame_extraction": (FRAME_EXTRACTION, "head"),
        "frame_stride": ("count", 1),
        "frame_sample": ("count", 1),
        "max_frames": ("count", 129),
        "source_fps": ("fps", None),
        "fp_latent_window_size": ("count", 9),
    }
)
KEYS_BY_KIND: Mapping[str, Mapping[str, tuple]] = MappingProxyType({"image": IMAGE_KEYS, "video": VIDEO_KEYS})
# Where each kind's data comes from: (directory key, JSONL key); the directory wins if both are set.
SOURCE_KEYS = MappingProxyType(
    {"image": ("image_directory", "image_jsonl_file"), "video": ("video_directory", "video_jsonl_file")}
)
# musubi-tuner's deprecated dataset keys and their new names
DEPRECATED_KEYS = MappingProxyType(
    {
        "flux_kontext_no_resize_control": "no_resize_control",
        "qwen_image_edit_no_resize_control": "no_resize_control",
        "qwen_image_edit_control_resolution": "control_resolution",
    }
)


def defaults(kind: str) -> dict:
    """Return {key: default} for every key of an "image" or "video" dataset (None: unset)."""
    return {key: default for key, (_, default) in KEYS_BY_KIND[kind].items()}


# Allowed keys of an image / a video dataset entry and their defaults, as data.sources exports it.
DATASET_KEYS = MappingProxyType({kind: MappingProxyType(defaults(kind)) for kind in KEYS_BY_KIND})


def dataset_kind(entry: dict) -> str:
    """Return "video" if the entry sets video_directory or video_jsonl_file (not null), else "image"."""
    return "video" if any(entry.get(key) is not None for key in SOURCE_KEYS["video"]) else "image"


# ---------------------------------------------------------------------------------------------
# value checks


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_size(value) -> bool:
    return _is_int(value, 1) or (
        isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v, 1) for v in value)
    )


def _is_fps(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _is_int_list(value, minimum: int, allow_empty: bool) -> bool:
    return (isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0)
            and all(_is_int(v, minimum) for v in value))


# spec -> (test, what is expected)
_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "count": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "index": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "suffix": (lambda v: isinstance(v, str) and v != "", "a caption file suffix such as '.txt'"),
    "path": (lambda v: isinstance(v, str) and v != "", "a path (a non-empty string)"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "size": (_is_size, "an integer or [width, height], each >= 1 (e.g. [960, 544])"),
    "frames": (lambda v: _is_int_list(v, 1, allow_empty=False),
               "a non-empty list of frame counts >= 1 (e.g. [1, 25, 45])"),
    "indices": (lambda v: _is_int_list(v, 0, allow_empty=True), "a list of integers >= 0 (e.g. [0, 10])"),
    "fps": (_is_fps, "a number > 0 (e.g. 30 or 30.0)"),
}


def check_dataset_value(spec, value) -> str | None:
    """Return a message saying what is expected if `value` does not fit `spec`, else None (null is unset)."""
    if value is None:
        return None
    if isinstance(spec, tuple):
        return None if value in spec else f"must be one of {', '.join(spec)}, got {value!r}"
    test, expected = _CHECKS[spec]
    return None if test(value) else f"must be {expected}, got {value!r}"


# ---------------------------------------------------------------------------------------------
# structure checks


def _check_general(general: dict, prefix: str) -> list[tuple[str, str]]:
    """Problems of the `general` mapping; `prefix` is the key path of `general` plus its separator."""
    per_dataset = (set(IMAGE_KEYS) | set(VIDEO_KEYS)) - set(GENERAL_KEYS)
    problems = []
    for key, value in general.items():
        path = f"{prefix}{key}"
        if key in per_dataset:
            problems.append((path, "is a per-dataset key; move it into each datasets entry "
                                   "(musubi-tuner rejects it in general too)"))
        elif key not in GENERAL_KEYS:
            problems.append((path, unknown_key_message(key, {**IMAGE_KEYS, **VIDEO_KEYS})))
        elif (message := check_dataset_value(GENERAL_KEYS[key][0], value)) is not None:
            problems.append((path, message))
    return problems


def _wrong_kind_message(kind: str) -> str:
    if kind == "image":
        return ("is a video-dataset key but this entry is an image dataset (it sets no video_directory or "
                "video_jsonl_file); set video_directory or remove the key")
    return ("is an image-dataset key but this entry is a video dataset (it sets video_directory or "
            "video_jsonl_file); remove the key or make the entry an image dataset")


def _check_source(entry: dict, kind: str, prefix: str) -> list[tuple[str, str]]:
    """A problem if the entry names no media source; a warning if it names two."""
    directory_key, jsonl_key = SOURCE_KEYS[kind]
    directory, jsonl = entry.get(directory_key), entry.get(jsonl_key)
    if directory is None and jsonl is None:
        return [(f"{prefix}{directory_key}", "not set; give image_directory or image_jsonl_file for an image "
                 "dataset, or video_directory or video_jsonl_file for a video dataset (a folder of media "
                 "files with same-named caption files, or a JSONL metadata file)")]
    if directory is not None and jsonl is not None:
        logger.warning("%s%s and %s are both set; using %s (as musubi-tuner does)",
                       prefix, directory_key, jsonl_key, directory_key)
    return []


def check_entry(entry: dict, where: str) -> list[tuple[str, str]]:
    """Return the problems of one datasets entry as (f"{where}.{key}", message) pairs.

    `where` is the entry's key path, e.g. "dataset.datasets[0]". The entry may have `general`'s
    values merged in (general keys are valid entry keys). Logs a warning if it sets both a
    directory and a JSONL file (the directory wins).
    """
    prefix = f"{where}."
    kind = dataset_kind(entry)
    keys = KEYS_BY_KIND[kind]
    other = KEYS_BY_KIND["image" if kind == "video" else "video"]
    problems = []
    for key, value in entry.items():
        path = f"{prefix}{key}"
        if key in keys:
            if (message := check_dataset_value(keys[key][0], value)) is not None:
                problems.append((path, message))
        elif key in other:
            if value is not None:  # null is unset, so it cannot be of the wrong kind
                problems.append((path, _wrong_kind_message(kind)))
        else:
            problems.append((path, unknown_key_message(key, keys)))
    return problems + _check_source(entry, kind, prefix)


def check_datasets(general: dict | None, datasets: list, where: str, sep: str = ".") -> list[tuple[str, str]]:
    """Return every problem of a dataset config as (key path, message) pairs; [] if it is good.

    Key paths are `f"{where}{sep}general.{key}"` and `f"{where}{sep}datasets[{i}].{key}"`: with the
    default sep, `dataset.datasets[0].target_frames` for the YAML group; `load_musubi_config` uses
    the file path and sep ": ". A bad value in `general` is reported once, at its general key.
    Logs a warning for an entry that sets both a directory and a JSONL file (the directory wins).
    """
    problems = []
    if general is not None and not isinstance(general, dict):
        problems.append((f"{where}{sep}general", f"must be a mapping of keys to values, got {general!r}"))
    elif general:
        problems += _check_general(general, f"{where}{sep}general.")
    if not isinstance(datasets, (list, tuple)):
        return problems + [(f"{where}{sep}datasets", f"must be a list of dataset entries, got {datasets!r}")]
    for i, entry in enumerate(datasets):
        entry_where = f"{where}{sep}datasets[{i}]"
        if not isinstance(entry, dict):
            problems.append((entry_where, f"must be a mapping of dataset keys (a [[datasets]] table), got {entry!r}"))
        else:
            problems += check_entry(entry, entry_where)
    return problems


def entry_where(dataset_cfg: dict, index: int) -> str:
    """The key path of datasets entry `index` for messages: in the musubi-tuner file it came from, if any."""
    path = dataset_cfg.get("musubi_config")
    return f"{path}: datasets[{index}]" if path else f"dataset.datasets[{index}]"


def merged_entry(general: dict | None, entry: dict) -> dict:
    """Return every key of the entry's kind resolved entry > general > default, plus "kind".

    Null counts as unset. `resolution` (and `control_resolution` when set) become a (W, H) tuple,
    `target_frames` a list, `source_fps` a float or None. Check with `check_datasets` first: values
    that fail the checks are passed through unnormalised.
    """
    kind = dataset_kind(entry)
    general = general or {}
    merged: dict = {"kind": kind}
    for key, (_, default) in KEYS_BY_KIND[kind].items():
        value = entry.get(key)
        if value is None and key in GENERAL_KEYS:
            value = general.get(key)
        merged[key] = default if value is None else value
    for key in ("resolution", "control_resolution"):
        if key in merged and _is_size(merged[key]):
            value = merged[key]
            merged[key] = (value, value) if isinstance(value, int) else tuple(value)
    if isinstance(merged.get("target_frames"), (list, tuple)):
        merged["target_frames"] = list(merged["target_frames"])
    if _is_fps(merged.get("source_fps")):
        merged["source_fps"] = float(merged["source_fps"])
    return merged


# ---------------------------------------------------------------------------------------------
# musubi-tuner config files


def _parse_file(path: Path) -> object:
    """Parse a .toml or .json file; raises ConfigError naming the file (and line) on failure."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError([("dataset.musubi_config", f"{path} must end in .toml or .json (a musubi-tuner "
                            "dataset config file); rename it or point at the right file")])
    try:
        # utf-8-sig: tolerate the byte-order mark some editors write
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([("dataset.musubi_config", f"file {path} does not exist; fix the path (relative "
                            "paths are from the current working directory)")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("dataset.musubi_config", f"file {path} cannot be read ({exc}); fix the file "
                            "or its permissions")]) from None
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        raise ConfigError([(str(path), f"is not valid TOML: {exc}; fix the syntax there")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([(str(path), f"is not valid JSON: {exc.msg} (at line {exc.lineno}, column "
                            f"{exc.colno}); fix the syntax there")]) from None


def _rename_deprecated(entry: dict, prefix: str) -> dict:
    """Return the entry with musubi-tuner's deprecated keys renamed, logging a warning for each."""
    entry = dict(entry)
    for old, new in DEPRECATED_KEYS.items():
        if old not in entry:
            continue
        value = entry.pop(old)
        if new in entry:
            logger.warning("%s%s is deprecated and ignored because %s is also set; remove %s",
                           prefix, old, new, old)
        else:
            logger.warning("%s%s is deprecated; read as %s (rename it in the file)", prefix, old, new)
            entry[new] = value
    return entry


def load_musubi_config(path: str | Path) -> tuple[dict, list[dict]]:
    """Read a musubi-tuner dataset config (.toml or .json) unchanged; return (general, datasets).

    The shapes are those of the YAML `dataset` group; relative paths are returned as written.
    Raises ConfigError listing every problem, keyed `f"{path}: datasets[{i}].{key}"` and alike
    (see the module docstring); a missing file or wrong extension is keyed `dataset.musubi_config`.
    """
    where = str(path)
    data = _parse_file(Path(path))
    if not isinstance(data, dict):
        raise ConfigError([(where, "must hold a general table and a datasets array, got "
                            f"{type(data).__name__}")])
    problems = [(f"{where}: {key}", unknown_key_message(key, ("general", "datasets")))
                for key in data if key not in ("general", "datasets")]
    general = data.get("general")
    if general is None:
        general = {}
    datasets = data.get("datasets")
    if not datasets:
        problems.append((f"{where}: datasets", "is missing or empty; add at least one [[datasets]] table "
                         "with image_directory or video_directory"))
        datasets = []
    if isinstance(datasets, list):
        datasets = [_rename_deprecated(entry, f"{where}: datasets[{i}].") if isinstance(entry, dict) else entry
                    for i, entry in enumerate(datasets)]
    problems += check_datasets(general, datasets, where, sep=": ")
    if problems:
        raise ConfigError(problems)
    return general, datasets
