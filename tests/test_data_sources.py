"""Dataset sources beyond plain folders: JSONL metadata, control images and videos, frame folders."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from musubi_pipe.data import media
from musubi_pipe.data.controls import control_bucket, match_control_images, match_control_video, resolution_bucket
from musubi_pipe.data.sources import scan_dataset
from musubi_pipe.errors import ConfigError, MediaError


def _png(path: Path, width: int = 64, height: int = 64, value: int = 100) -> Path:
    media.write_png(path, np.full((height, width, 3), value, np.uint8))
    return path


def _names(paths) -> list[str]:
    return [os.path.basename(p) for p in paths]


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# ---------------------------------------------------------------- JSONL


def test_image_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are read from the working directory, as in musubi-tuner
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", 96, 48)
    _png(tmp_path / "c.png")
    lines = [
        {"image_path": str(tmp_path / "a.png"), "caption": " a grey square "},
        "",  # blank lines are ignored
        {"image_path": "b.png", "caption": "a wide one"},
        {"image_path": "missing.png", "caption": "gone"},
        {"image_path": "c.png", "caption": ""},
    ]
    meta = _write_jsonl(tmp_path / "meta.jsonl", lines)
    entry = {"image_jsonl_file": str(meta), "resolution": 64, "enable_bucket": True}
    items, skips = scan_dataset(entry, 0, 16.0, "d")
    assert [(i.media_path, i.caption, i.caption_path, i.bucket) for i in items] == [
        (str(tmp_path / "a.png"), "a grey square", None, (64, 64)),
        ("b.png", "a wide one", None, (80, 48)),
    ]
    assert [(s.path, s.reason.split(";")[0]) for s in skips] == [
        ("missing.png", "line 4 of meta.jsonl: file not found"),
        ("c.png", "line 5 of meta.jsonl: caption '' is empty or not text"),
    ]


def test_jsonl_errors_name_the_line(tmp_path):
    _png(tmp_path / "a.png")
    meta = _write_jsonl(tmp_path / "meta.jsonl", [{"image_path": str(tmp_path / "a.png"), "caption": "x"},
                                                  '{"image_path": "b.png", caption: "unquoted"}', "[1, 2]"])
    with pytest.raises(ConfigError) as err:
        scan_dataset({"image_jsonl_file": str(meta)}, 0, 16.0, "d")
    assert [key for key, _ in err.value.problems] == [f"{meta}:2", f"{meta}:3"]
    assert err.value.problems[0][1].startswith("line 2 is not JSON (Expecting property name")
    assert "not an object" in err.value.problems[1][1]

    _write_jsonl(meta, [{"video_path": "a.mp4", "caption": "wrong media key"}])
    with pytest.raises(ConfigError, match=r'line 1 has no "image_path" string'):
        scan_dataset({"image_jsonl_file": str(meta)}, 0, 16.0, "d")
    with pytest.raises(ConfigError) as err:
        scan_dataset({"image_jsonl_file": str(tmp_path / "nope.jsonl")}, 0, 16.0, "dataset.datasets[3]")
    assert err.value.problems == [("dataset.datasets[3].image_jsonl_file", f"file {tmp_path / 'nope.jsonl'} does not "
                                   "exist; fix the path (relative paths are from the current working directory)")]


def test_video_jsonl_with_frame_folder_and_controls(tmp_path):
    frames = tmp_path / "clip_frames"
    for i in range(12):
        _png(frames / f"{i:04d}.png", 48, 32, 8 * i)
    media.write_mp4(tmp_path / "a.mp4", np.zeros((10, 32, 48, 3), np.uint8), fps=16)
    control = tmp_path / "ctrl"
    for i in range(3):
        _png(control / f"{i:04d}.png", 48, 32)
    lines = [
        {"video_path": str(frames), "caption": "frames as a video", "control_path": str(control)},
        {"video_path": str(tmp_path / "a.mp4"), "caption": "no control"},
    ]
    meta = _write_jsonl(tmp_path / "v.jsonl", lines)
    entry = {"video_jsonl_file": str(meta), "resolution": [48, 32], "target_frames": [5, 9],
             "frame_extraction": "chunk"}
    items, skips = scan_dataset(entry, 1, 16.0, "d")
    assert [(i.start, i.frames, i.controls, i.control_buckets) for i in items] == [
        (0, 5, (str(control),), ((48, 32),)),
        (5, 5, (str(control),), ((48, 32),)),
        (0, 9, (str(control),), ((48, 32),)),
    ]
    assert [s.reason for s in skips] == [
        "line 2 of v.jsonl: no control_path, though other lines have one; add it or remove the line"]


def test_jsonl_numbered_controls_are_ordered(tmp_path):
    target = _png(tmp_path / "t.png")
    controls = {name: _png(tmp_path / f"{name}.png", 32, 32) for name in ("c10", "c2", "c0", "plain")}
    record = {"image_path": str(target), "caption": "x", "control_path_10": str(controls["c10"]),
              "control_path_2": str(controls["c2"]), "control_path": str(controls["plain"]),
              "control_path_0": str(controls["c0"])}
    meta = _write_jsonl(tmp_path / "m.jsonl", [record])
    items, _ = scan_dataset({"image_jsonl_file": str(meta), "resolution": 64}, 0, 16.0, "d")
    assert _names(items[0].controls) == ["plain.png", "c0.png", "c2.png", "c10.png"]
    assert items[0].control_buckets == ((64, 64),) * 4  # resized to the item's bucket by default


# ---------------------------------------------------------------- control matching


def test_control_image_matching_rules(tmp_path):
    images, controls = tmp_path / "images", tmp_path / "controls"
    targets = [_png(images / f"{stem}.png") for stem in ("a", "a_1", "b", "c", "d")]
    for name in ("a.jpg", "a_0.png", "a_2.webp", "a_1.png", "a_1_0.png", "b_mask.png", "d_10.png", "d_9.png"):
        _png(controls / name, 32, 32)
    (controls / "a_3.txt").write_text("not an image: ignored")
    found = match_control_images(targets, controls)
    assert _names(found[targets[0]]) == ["a.jpg", "a_0.png", "a_2.webp"]  # unsuffixed, then by number
    assert _names(found[targets[1]]) == ["a_1.png", "a_1_0.png"]  # the longer stem claims its files first
    assert isinstance(found[targets[2]], MediaError) and "suffix 'mask' is not a number" in str(found[targets[2]])
    assert isinstance(found[targets[3]], MediaError) and "no control image" in str(found[targets[3]])
    assert _names(found[targets[4]]) == ["d_9.png", "d_10.png"]  # numeric order, not name order


def test_control_video_matching(tmp_path):
    controls = tmp_path / "controls"
    controls.mkdir()
    media.write_mp4(controls / "same.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=16)
    _png(controls / "folder" / "0000.png", 16, 16)
    media.write_mp4(controls / "other.mkv", np.zeros((3, 16, 16, 3), np.uint8), fps=16)
    assert match_control_video(Path("/v/same.mp4"), controls) == controls / "same.mp4"
    assert match_control_video(Path("/v/folder.mp4"), controls) == controls / "folder"
    assert match_control_video(Path("/v/other.mp4"), controls) == controls / "other.mkv"
    with pytest.raises(MediaError, match="no control video"):
        match_control_video(Path("/v/none.mp4"), controls)


def test_control_buckets():
    # default: the item's bucket; control_resolution: its own bucket by aspect ratio; no_resize: native size
    assert control_bucket((300, 200), (512, 512), None, False) == (512, 512)
    assert resolution_bucket(300, 200, 512 * 512) == (624, 416)
    assert control_bucket((300, 200), (512, 512), (512, 512), False) == (624, 416)
    assert control_bucket((300, 200), (512, 512), None, True) == (288, 192)
    assert control_bucket((300, 200), (512, 512), (128, 128), True) == (160, 96)  # a maximum when both are set
    assert control_bucket((300, 200), (512, 512), (1024, 1024), True) == (288, 192)
    with pytest.raises(ValueError, match="smaller than one 16-pixel step"):
        control_bucket((10, 200), (512, 512), None, True)


def test_scan_with_control_directory(tmp_path):
    images, controls = tmp_path / "images", tmp_path / "controls"
    for stem in ("a", "b"):
        _png(images / f"{stem}.png", 128, 64)
        (images / f"{stem}.txt").write_text(stem)
    _png(controls / "a.png", 40, 40)
    _png(controls / "a_1.png", 128, 48)
    entry = {"image_directory": str(images), "control_directory": str(controls), "resolution": [128, 64],
             "control_resolution": 64, "no_resize_control": True}
    items, skips = scan_dataset(entry, 0, 16.0, "d")
    # a.png fits in 64x64 pixels: native size, floored; a_1.png does not: resized to a 64x64-area bucket
    assert [(os.path.basename(i.media_path), _names(i.controls), i.control_buckets) for i in items] == [
        ("a.png", ["a.png", "a_1.png"], ((32, 32), (96, 32)))]
    assert len(skips) == 1 and skips[0].reason.startswith("no control image in")

    with pytest.raises(ConfigError, match=r"d.control_directory: folder .*nope does not exist"):
        scan_dataset({**entry, "control_directory": str(tmp_path / "nope")}, 0, 16.0, "d")


def test_scan_video_directory_with_control_videos(tmp_path):
    videos, controls = tmp_path / "videos", tmp_path / "controls"
    for stem in ("x", "y"):
        media.write_mp4(videos / f"{stem}.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps=16)
        (videos / f"{stem}.txt").write_text(stem)
    controls.mkdir()
    (controls / "x.mp4").write_bytes(b"broken control")
    entry = {"video_directory": str(videos), "control_directory": str(controls), "resolution": 32,
             "target_frames": [9]}
    items, skips = scan_dataset(entry, 0, 16.0, "d")
    assert items == []
    assert _names(s.path for s in skips) == ["x.mp4", "y.mp4"]
    assert skips[0].reason.startswith(f"control video {controls / 'x.mp4'}: cannot decode the video")
    assert skips[1].reason.startswith(f"no control video in {controls} (expected y.mp4, a folder y/ of frames")


def test_video_folder_problems_and_buckets(tmp_path):
    frames = np.zeros((9, 40, 72, 3), np.uint8)
    media.write_mp4(tmp_path / "small.mp4", frames, fps=16)
    media.write_mp4(tmp_path / "nocap.mp4", frames, fps=16)
    media.write_png(tmp_path / "fake.png", frames[0])
    os.rename(tmp_path / "fake.png", tmp_path / "image.mkv")  # a PNG in a video container's name
    (tmp_path / "audio.webm").write_bytes(b"\x1aE\xdf\xa3 not really matroska")
    for stem in ("small", "image", "audio"):
        (tmp_path / f"{stem}.txt").write_text(stem)
    entry = {"video_directory": str(tmp_path), "resolution": [128, 128], "target_frames": [9],
             "enable_bucket": True, "bucket_no_upscale": True}
    items, skips = scan_dataset(entry, 0, 16.0, "d")
    # bucket_no_upscale means for videos what it means for images: a small clip keeps its size (floored to 16)
    assert [(i.key, i.bucket) for i in items] == [("small_00000-009_64x32", (64, 32))]
    reasons = {os.path.basename(s.path): s.reason for s in skips}
    assert set(reasons) == {"nocap.mp4", "audio.webm", "image.mkv"}
    assert reasons["nocap.mp4"].startswith("no caption file nocap.txt")
    assert reasons["audio.webm"].startswith("cannot decode the video")
    # FFmpeg sniffs the content, not the name: a still image is a one-frame video, too short here
    assert reasons["image.mkv"].startswith("video has 1 frame(s), fewer than every target_frames value [9]")

    items, _ = scan_dataset({**entry, "bucket_no_upscale": False}, 0, 16.0, "d")
    assert items[0].bucket == (160, 96)  # upscaled to the closest-ratio bucket of 128x128 area
