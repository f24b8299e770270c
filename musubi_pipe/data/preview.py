"""Dataset preview: contact sheets and tables of what training will see, without loading any model.

`write_preview` takes the items and skips of a dataset scan (`sources.scan_dataset`) and writes into
a folder:

- `sheet_000.png`, `sheet_001.png`, ...: contact sheets of up to `max_items` items, each cell showing
  the bucketed, cropped pixels exactly as `loader.load_item_frames` produces them (for a video the
  first, middle and last frame of the clip), the first frame of each control, a label line
  "<file name> [start:end] WxH" and the caption (wrapped, cut to a few lines). An item whose media
  cannot be decoded gets a red cell saying why.
- `clips.tsv`: every item, one row each (dataset, media, start, frames, bucket, source size,
  controls, caption).
- `skipped.tsv`: every media file the scan left out, with the reason.

It lets a user check buckets, crops, clip boundaries, captions and controls before spending GPU time.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from musubi_pipe.data.loader import iter_loaded, load_control_frames, load_item_frames
from musubi_pipe.data.media import atomic_target
from musubi_pipe.data.sources import Item, Skip
from musubi_pipe.errors import MediaError

ROWS_PER_SHEET = 4
CAPTION_LINES = 4
_PAD = 6  # margin inside a cell and between frames
_BACKGROUND = (40, 40, 40)
_CELL = (245, 245, 245)
_FAILED = (190, 30, 30)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)


@dataclass
class _Thumbs:
    """What one cell shows: the clip's first/middle/last frames and each control's first frame."""

    frames: list[np.ndarray]
    controls: list[np.ndarray]


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (no files to download), at a readable size where FreeType is available."""
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _load_thumbs(item: Item) -> _Thumbs:
    """Decode the item and its controls; keep only the frames a cell shows, so workers hold little memory."""
    frames = load_item_frames(item)
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    return _Thumbs([frames[i] for i in picks], [control[0] for control in load_control_frames(item)])


def _fit(frame: np.ndarray, height: int) -> Image.Image:
    """`frame` as a PIL image scaled to `height` pixels high, keeping its aspect ratio."""
    image = Image.fromarray(frame)
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.BILINEAR)


def _strip(frames: Sequence[np.ndarray], height: int, max_width: int) -> Image.Image:
    """Frames side by side at `height`, separated by a gap, then shrunk to fit `max_width` if wider."""
    thumbs = [_fit(frame, height) for frame in frames]
    width = sum(t.width for t in thumbs) + _PAD * (len(thumbs) - 1)
    strip = Image.new("RGB", (width, height), _CELL)
    x = 0
    for thumb in thumbs:
        strip.paste(thumb, (x, 0))
        x += thumb.width + _PAD
    if width > max_width:
        strip = strip.resize((max_width, max(1, round(height * max_width / width))), Image.Resampling.BILINEAR)
    return strip


def _clip_text(text: str, font, width: int) -> str:
    """`text` cut (with "...") so that it is at most `width` pixels wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` pixels wide; the last line ends in "..." if cut."""
    lines: list[str] = []
    line = ""
    for word in " ".join(text.split()).split(" "):
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    lines = [_clip_text(line, font, width) for line in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _clip_text(lines[-1] + " ...", font, width)
    return lines


def _label(item: Item) -> str:
    """The cell's first text line: file name, clip range and bucket."""
    return f"{Path(item.media_path).name} [{item.start}:{item.start + item.frames}] {item.bucket[0]}x{item.bucket[1]}"


@dataclass(frozen=True)
class _Layout:
    """Pixel geometry shared by every cell of a preview."""

    thumb: int
    line: int  # text line height
    controls: bool  # whether cells have a row for control thumbnails

    @property
    def inner(self) -> int:
        """Usable width inside a cell: room for three square frames side by side."""
        return 3 * self.thumb + 2 * _PAD

    @property
    def width(self) -> int:
        return self.inner + 2 * _PAD

    @property
    def control_height(self) -> int:
        return max(16, self.thumb // 2)

    @property
    def height(self) -> int:
        rows = self.thumb + _PAD + (self.control_height + _PAD if self.controls else 0)
        return _PAD + rows + self.line * (1 + CAPTION_LINES) + _PAD


def _draw_cell(sheet: Image.Image, origin: tuple[int, int], item: Item, result: _Thumbs | MediaError,
               layout: _Layout, font) -> None:
    """Draw one item's cell with its top-left corner at `origin`."""
    x0, y0 = origin
    draw = ImageDraw.Draw(sheet)
    failed = isinstance(result, MediaError)
    draw.rectangle([x0, y0, x0 + layout.width - 1, y0 + layout.height - 1], fill=_FAILED if failed else _CELL)
    x, y = x0 + _PAD, y0 + _PAD
    text_color = (255, 255, 255) if failed else _TEXT
    if failed:
        draw.text((x, y), "CANNOT LOAD", fill=text_color, font=font)
        reason = str(result).removeprefix(f"{result.path}: ")
        reason_lines = max(1, (layout.height - 2 * _PAD) // layout.line - 2 - CAPTION_LINES)  # above the label
        for i, line in enumerate(_wrap(f"{Path(result.path).name}: {reason}", font, layout.inner, reason_lines)):
            draw.text((x, y + (i + 1) * layout.line), line, fill=text_color, font=font)
    else:
        strip = _strip(result.frames, layout.thumb, layout.inner)
        sheet.paste(strip, (x + (layout.inner - strip.width) // 2, y + (layout.thumb - strip.height) // 2))
        if result.controls:
            controls = _strip(result.controls, layout.control_height, layout.inner)
            sheet.paste(controls, (x, y + layout.thumb + _PAD))
    y = y0 + layout.height - _PAD - layout.line * (1 + CAPTION_LINES)
    draw.text((x, y), _clip_text(_label(item), font, layout.inner), fill=text_color, font=font)
    for i, line in enumerate(_wrap(item.caption, font, layout.inner, CAPTION_LINES)):
        draw.text((x, y + (i + 1) * layout.line), line, fill=text_color if failed else _MUTED, font=font)


def _pick(count: int, limit: int) -> list[int]:
    """Indices of at most `limit` of `count` items, spread evenly so every dataset tends to show up."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(1, limit - 1)) for i in range(limit)})


def _save_png(image: Image.Image, path: Path) -> None:
    """Write `image` as PNG atomically (no half-written sheet if interrupted)."""
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")


def _cell(value) -> str:
    """A TSV field: tabs and line breaks become spaces so each item stays on one line."""
    return " ".join(str(value).replace("\t", " ").splitlines())


def _write_tsv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Write a tab-separated table with a header line, atomically."""
    lines = ["\t".join(header)] + ["\t".join(_cell(v) for v in row) for row in rows]
    with atomic_target(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_tables(items: Sequence[Item], skips: Sequence[Skip], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `clips.tsv` (every item) and `skipped.tsv` (every skip) into `out_dir`; return both paths."""
    out_dir = Path(out_dir)
    clips, skipped = out_dir / "clips.tsv", out_dir / "skipped.tsv"
    _write_tsv(clips, ["dataset", "media", "start", "frames", "bucket", "source", "controls", "caption"], [
        (item.dataset_index, item.media_path, item.start, item.frames, f"{item.bucket[0]}x{item.bucket[1]}",
         f"{item.source_size[0]}x{item.source_size[1]}", ";".join(item.controls), item.caption)
        for item in items
    ])
    _write_tsv(skipped, ["path", "reason"], [(skip.path, skip.reason) for skip in skips])
    return clips, skipped


def write_preview(
    items: Sequence[Item],
    skips: Sequence[Skip],
    out_dir: str | os.PathLike,
    max_items: int = 48,
    per_row: int = 4,
    thumb: int = 192,
    workers: int = 2,
) -> dict:
    """Write contact sheets of up to `max_items` items plus `clips.tsv` and `skipped.tsv` into `out_dir`.

    Items shown are spread evenly over `items` (all of them if there are at most `max_items`); sheets
    hold `per_row` x 4 cells, each `thumb` pixels high for the frames. Media that fail to decode get
    a red cell with the reason. Decoding uses `workers` threads. Returns {"sheets": [paths],
    "clips": path, "skipped": path, "items": len(items), "shown": number of cells drawn}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips, skipped = write_tables(items, skips, out_dir)
    shown = [items[i] for i in _pick(len(items), max(0, max_items))]
    font = _font()
    layout = _Layout(thumb=thumb, line=font.getbbox("Ag")[3] + 3, controls=any(item.controls for item in shown))
    per_row = max(1, per_row)
    per_sheet = per_row * ROWS_PER_SHEET
    sheets: list[str] = []
    loaded = iter_loaded(shown, _load_thumbs, workers)
    try:
        for first in range(0, len(shown), per_sheet):
            count = min(per_sheet, len(shown) - first)
            rows = math.ceil(count / per_row)
            columns = min(per_row, count)
            sheet = Image.new("RGB", (_PAD + columns * (layout.width + _PAD), _PAD + rows * (layout.height + _PAD)),
                              _BACKGROUND)
            for n in range(count):
                item, result = next(loaded)
                origin = (_PAD + (n % per_row) * (layout.width + _PAD), _PAD + (n // per_row) * (layout.height + _PAD))
                _draw_cell(sheet, origin, item, result, layout, font)
            path = out_dir / f"sheet_{len(sheets):03d}.png"
            _save_png(sheet, path)
            sheets.append(str(path))
    finally:
        loaded.close()
    for stale in set(out_dir.glob("sheet_*.png")) - {Path(p) for p in sheets}:
        stale.unlink()  # left by an earlier preview with more items
    return {"sheets": sheets, "clips": str(clips), "skipped": str(skipped), "items": len(items), "shown": len(shown)}
