"""Unit tests for musubi_pipe.data.loader (item/control decoding, ordered parallel loading) and preview (contact sheets)."""

import threading
import time

import numpy as np
import pytest
from PIL import Image

from musubi_pipe.data import media
from musubi_pipe.data.loader import iter_loaded, load_control_frames, load_item_frames
from musubi_pipe.data.preview import write_preview
from musubi_pipe.data.sources import Item, Skip
from musubi_pipe.errors import MediaError

TOL = 3  # grey levels a lossy codec may shift a flat frame by


def _grey(count: int, height: int = 32, width: int = 48, offset: int = 0) -> np.ndarray:
    """Frame i is a flat grey of value 8*i + offset: identifiable after decoding, even through a lossy codec."""
    return np.stack([np.full((height, width, 3), 8 * i + offset, np.uint8) for i in range(count)])


def _levels(frames: np.ndarray) -> list[int]:
    return [int(round(float(f.mean()))) for f in frames]


def _close(levels: list[int], expected: list[int]) -> bool:
    return len(levels) == len(expected) and all(abs(a - b) <= TOL for a, b in zip(levels, expected))


def _image_item(path, bucket=(16, 32), source=(48, 32), caption="a cat", **kw) -> Item:
    return Item(dataset_index=0, media_path=str(path), caption=caption, caption_path=None, kind="image", start=0,
                frames=1, bucket=bucket, source_size=source, source_fps=None, target_fps=None, **kw)


def _video_item(path, start, frames, bucket=(32, 32), caption="a clip", **kw) -> Item:
    return Item(dataset_index=1, media_path=str(path), caption=caption, caption_path=None, kind="video",
                start=start, frames=frames, bucket=bucket, source_size=(48, 32), source_fps=None,
                target_fps=16.0, **kw)


# ---------------------------------------------------------------- load_item_frames / load_control_frames


def test_load_item_frames_image_is_bucketed_and_centre_cropped(tmp_path):
    frame = np.zeros((32, 48, 3), np.uint8)
    frame[:, :16] = 200  # left third bright, so a centre crop to 16 wide keeps only the dark middle
    frame[:, 32:] = 100
    media.write_png(tmp_path / "a.png", frame)
    out = load_item_frames(_image_item(tmp_path / "a.png", bucket=(16, 32)))
    assert out.shape == (1, 32, 16, 3) and out.dtype == np.uint8
    assert out.max() == 0


def test_load_item_frames_video_clip(tmp_path):
    media.write_mp4(tmp_path / "v.mp4", _grey(12), fps=16)
    out = load_item_frames(_video_item(tmp_path / "v.mp4", start=3, frames=5, bucket=(16, 16)))
    assert out.shape == (5, 16, 16, 3)
    assert _close(_levels(out), [8 * i for i in range(3, 8)])


def test_image_controls_each_at_their_bucket(tmp_path):
    media.write_png(tmp_path / "a.png", _grey(1)[0])
    media.write_png(tmp_path / "c0.png", np.full((40, 40, 3), 50, np.uint8))
    media.write_png(tmp_path / "c1.png", np.full((20, 60, 3), 90, np.uint8))
    item = _image_item(tmp_path / "a.png", controls=(str(tmp_path / "c0.png"), str(tmp_path / "c1.png")),
                       control_buckets=((16, 16), (48, 16)))
    controls = load_control_frames(item)
    assert [c.shape for c in controls] == [(1, 16, 16, 3), (1, 16, 48, 3)]
    assert _levels(controls[0]) == [50] and _levels(controls[1]) == [90]
    assert load_control_frames(_image_item(tmp_path / "a.png")) == []


def test_control_video_shorter_repeats_last_frame_longer_is_cut(tmp_path):
    media.write_mp4(tmp_path / "v.mp4", _grey(12), fps=16)
    media.write_mp4(tmp_path / "short.mp4", _grey(6, offset=2), fps=16)
    media.write_mp4(tmp_path / "long.mp4", _grey(20, offset=2), fps=16)
    short = load_control_frames(_video_item(tmp_path / "v.mp4", 3, 5, controls=(str(tmp_path / "short.mp4"),),
                                            control_buckets=((16, 16),)))
    assert len(short) == 1 and short[0].shape == (5, 16, 16, 3)
    assert _close(_levels(short[0]), [26, 34, 42, 42, 42])  # frames 3, 4, 5, then frame 5 again
    long = load_control_frames(_video_item(tmp_path / "v.mp4", 3, 5, controls=(str(tmp_path / "long.mp4"),),
                                           control_buckets=((32, 16),)))
    assert long[0].shape == (5, 16, 32, 3)
    assert _close(_levels(long[0]), [26, 34, 42, 50, 58])
    # a clip that starts after the control's end sees the control's last frame throughout
    past = load_control_frames(_video_item(tmp_path / "v.mp4", 7, 3, controls=(str(tmp_path / "short.mp4"),)))
    assert past[0].shape == (3, 32, 32, 3) and _close(_levels(past[0]), [42, 42, 42])


def test_load_video_frames_pad_on_frame_folder(tmp_path):
    folder = tmp_path / "frames"
    for i, frame in enumerate(_grey(4)):
        media.write_png(folder / f"{i:05d}.png", frame)
    with pytest.raises(MediaError, match="folder holds 4 frame images"):
        media.load_video_frames(folder, 2, 4)
    assert _levels(media.load_video_frames(folder, 2, 4, pad=True)) == [16, 24, 24, 24]
    assert _levels(media.load_video_frames(folder, 1, 2, pad=True)) == [8, 16]  # long enough: unchanged
    assert _levels(media.load_video_frames(folder, 6, 2, pad=True)) == [24, 24]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError):
        media.load_video_frames(empty, 0, 2, pad=True)


def test_load_video_frames_pad_on_file(tmp_path):
    media.write_mp4(tmp_path / "v.mp4", _grey(4), fps=16)
    with pytest.raises(MediaError, match="video ended after 4 frame"):
        media.load_video_frames(tmp_path / "v.mp4", 1, 5)
    assert _close(_levels(media.load_video_frames(tmp_path / "v.mp4", 1, 5, pad=True)), [8, 16, 24, 24, 24])


# ---------------------------------------------------------------- iter_loaded


def _slow_identity(item: int) -> int:
    time.sleep(0.002 * (item % 4))  # later items may finish first
    return item


@pytest.mark.parametrize("workers", [1, 3])
def test_iter_loaded_keeps_order(workers):
    out = list(iter_loaded(range(20), _slow_identity, workers=workers, prefetch=4))
    assert out == [(i, i) for i in range(20)]


@pytest.mark.parametrize("workers", [1, 3])
def test_iter_loaded_returns_media_errors(tmp_path, workers):
    media.write_png(tmp_path / "good.png", _grey(1)[0])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    items = [_image_item(tmp_path / "good.png"), _image_item(tmp_path / "bad.png"), _image_item(tmp_path / "good.png")]
    results = [result for _, result in iter_loaded(items, load_item_frames, workers=workers)]
    assert isinstance(results[1], MediaError) and "bad.png" in str(results[1])
    assert results[0].shape == results[2].shape == (1, 32, 16, 3)


def test_iter_loaded_other_errors_propagate():
    def load(item):
        if item == 2:
            raise KeyError(item)
        return item

    with pytest.raises(KeyError):
        list(iter_loaded(range(5), load, workers=2))


def test_iter_loaded_bounded_prefetch_and_prompt_close():
    started: list[int] = []
    lock = threading.Lock()
    release = threading.Event()

    def load(item):
        with lock:
            started.append(item)
        if item > 0:
            release.wait(5)
        return item

    gen = iter_loaded(range(1000), load, workers=2, prefetch=3)
    assert next(gen) == (0, 0)
    time.sleep(0.05)
    assert len(started) <= 4  # never more than `prefetch` submitted ahead of the consumer
    began = time.perf_counter()
    gen.close()
    assert time.perf_counter() - began < 1.0
    release.set()
    time.sleep(0.05)
    assert len(started) <= 4  # cancelled loads never ran


# ---------------------------------------------------------------- write_preview


def _preview_items(tmp_path) -> tuple[list[Item], list[Skip]]:
    media.write_mp4(tmp_path / "v.mp4", _grey(12), fps=16)
    media.write_png(tmp_path / "a.png", _grey(1, offset=100)[0])
    media.write_png(tmp_path / "c.png", np.full((20, 20, 3), 60, np.uint8))
    (tmp_path / "bad.png").write_bytes(b"broken")
    items = [
        _video_item(tmp_path / "v.mp4", 0, 9, caption="a grey fade " * 30),
        _image_item(tmp_path / "a.png", controls=(str(tmp_path / "c.png"),), control_buckets=((16, 16),)),
        _image_item(tmp_path / "bad.png", caption="tab\there\nnewline"),
    ]
    return items, [Skip(str(tmp_path / "odd.gif"), "not a supported image")]


def test_write_preview_sheets_and_tables(tmp_path):
    items, skips = _preview_items(tmp_path)
    out = write_preview(items, skips, tmp_path / "preview", per_row=2, thumb=48)
    assert out["items"] == 3 and out["shown"] == 3 and len(out["sheets"]) == 1
    with Image.open(out["sheets"][0]) as sheet:
        sheet.load()
        width, height = sheet.size
    assert width > 2 * 3 * 48 and height > 2 * 48  # two columns of cells, two rows
    # the failing item's cell is red
    assert (np.asarray(Image.open(out["sheets"][0]).convert("RGB")) == (190, 30, 30)).all(-1).any()
    rows = (tmp_path / "preview" / "clips.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["dataset", "media", "start", "frames", "bucket", "source", "controls", "caption"]
    assert len(rows) == 4 and all(len(r.split("\t")) == 8 for r in rows)
    assert rows[1].split("\t")[2:5] == ["0", "9", "32x32"]
    assert rows[2].split("\t")[6] == str(tmp_path / "c.png")
    assert rows[3].split("\t")[7] == "tab here newline"
    skipped = (tmp_path / "preview" / "skipped.tsv").read_text().splitlines()
    assert skipped == ["path\treason", f"{tmp_path / 'odd.gif'}\tnot a supported image"]


def test_write_preview_caps_shown_items_but_lists_all(tmp_path):
    items, _ = _preview_items(tmp_path)
    many = items[:2] * 10
    out = write_preview(many, [], tmp_path / "preview", max_items=5, per_row=2, thumb=32)
    assert out["shown"] == 5 and out["items"] == 20
    assert len(out["sheets"]) == 1  # 5 cells fit one sheet of 2 x 4
    assert len((tmp_path / "preview" / "clips.tsv").read_text().splitlines()) == 21
    assert (tmp_path / "preview" / "skipped.tsv").read_text() == "path\treason\n"
    out = write_preview(many, [], tmp_path / "preview", max_items=20, per_row=2, thumb=32)
    assert [p.rsplit("/", 1)[1] for p in out["sheets"]] == ["sheet_000.png", "sheet_001.png", "sheet_002.png"]
    out = write_preview(many, [], tmp_path / "preview", max_items=5, per_row=2, thumb=32)
    assert sorted(p.name for p in (tmp_path / "preview").glob("sheet_*.png")) == ["sheet_000.png"]
