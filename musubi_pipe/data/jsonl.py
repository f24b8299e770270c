"""Dataset metadata in JSONL files: one JSON object per line naming a media file and its caption.

musubi-tuner's formats (`image_jsonl_file`, `video_jsonl_file`):

    {"image_path": "/data/a.png", "caption": "a cat", "control_path": "/data/a_ref.png"}
    {"image_path": "/data/b.png", "caption": "a dog", "control_path_0": "...", "control_path_1": "..."}
    {"video_path": "/data/clip.mp4", "caption": "waves", "control_path": "/data/clip_depth/"}

A `video_path` or video `control_path` may be a folder of frame images. Numbered control keys are
ordered by their numeric suffix (`control_path` first). Relative paths are read from the working
directory, as in musubi-tuner. Blank lines are ignored.

A line that is not JSON, not an object, or lacks its media path is an error naming the file and
line: the metadata itself is broken, and skipping it would hide that. A missing or empty caption, or
a missing control where other lines have one, is a per-item problem: the item is skipped with the
line in its reason (or, with `dataset.strict`, reported as an error by the caller).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from musubi_pipe.errors import ConfigError


@dataclass(frozen=True)
class Record:
    """One media file of a dataset, wherever it was listed (a folder scan or a JSONL line)."""

    media: Path
    caption: str | None  # None: read from `caption_path`
    caption_path: Path | None
    controls: tuple[Path, ...] | None  # None: matched in control_directory (folder datasets)
    where: str  # e.g. "line 3 of meta.jsonl", prefixed to skip reasons; "" for folder datasets
    problem: str | None = None  # why the item cannot be used (skipped, or an error with strict)


def _control_paths(obj: dict) -> list[str]:
    """The control paths of a record: `control_path`, then `control_path_<n>` by n."""
    numbered = []
    for key, value in obj.items():
        if key == "control_path":
            numbered.append((-1, value))
        elif key.startswith("control_path_") and key[len("control_path_") :].isdigit():
            numbered.append((int(key[len("control_path_") :]), value))
    return [value for _, value in sorted(numbered, key=lambda pair: pair[0])]


def _parse_lines(path: Path, key: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; raises ConfigError naming every bad line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([(key, f"file {path} does not exist; fix the path (relative paths are from the "
                            "current working directory)")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([(key, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it "
                            "as UTF-8")]) from None
    objects, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((f"{path}:{number}", f"line {number} is not JSON ({exc.msg} at column {exc.colno}); "
                             "each line must be one JSON object"))
            continue
        if not isinstance(obj, dict):
            problems.append((f"{path}:{number}", f"line {number} is a JSON {type(obj).__name__}, not an object "
                             "like {\"image_path\": ..., \"caption\": ...}"))
            continue
        objects.append((number, obj))
    if problems:
        raise ConfigError(problems)
    return objects


def read_jsonl(path: str | Path, kind: str, key: str) -> list[Record]:
    """Records of a JSONL metadata file for a dataset of `kind` ("image" or "video").

    `key` is the config key that named the file (for messages). Raises ConfigError for a missing
    file or malformed lines; per-item problems come back in `Record.problem`.
    """
    path = Path(path)
    media_key = f"{kind}_path"
    objects = _parse_lines(path, key)
    if not objects:
        raise ConfigError([(key, f"{path} lists no {kind}s; add lines like "
                            f"{{\"{media_key}\": \"...\", \"caption\": \"...\"}}")])
    problems = []
    for number, obj in objects:
        if not isinstance(obj.get(media_key), str) or not obj[media_key]:
            problems.append((f"{path}:{number}", f"line {number} has no \"{media_key}\" string; every line "
                             f"needs one (keys found: {sorted(obj)})"))
    if problems:
        raise ConfigError(problems)
    any_controls = any(_control_paths(obj) for _, obj in objects)
    records = []
    for number, obj in objects:
        where = f"line {number} of {path.name}"
        caption, problem = obj.get("caption"), None
        if not isinstance(caption, str) or not caption.strip():
            problem = "no caption" if caption is None else f"caption {caption!r} is empty or not text"
            problem += "; add a \"caption\" string to the line or remove the line"
        controls = tuple(Path(p) for p in _control_paths(obj) if isinstance(p, str))
        if any_controls and not controls and problem is None:
            problem = "no control_path, though other lines have one; add it or remove the line"
        records.append(Record(media=Path(obj[media_key]), caption=caption.strip() if problem is None else None,
                              caption_path=None, controls=controls if any_controls else None, where=where,
                              problem=problem))
    return records
