"""Unit tests for musubi_pipe.data: media I/O, fps decimation, buckets, clip extraction, dataset scanning, demo data."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from musubi_pipe.data import media
from musubi_pipe.data.buckets import bucket_resolutions, resize_to_bucket, select_bucket
from musubi_pipe.data.demo import make_demo_dataset
from musubi_pipe.data.frames import count_after_fps, extract_clips, round_target_frames
from musubi_pipe.data.sources import DATASET_KEYS, Item, scan_dataset
from musubi_pipe.errors import ConfigError, MediaError


def _grey_frames(count: int, size: int = 32) -> np.ndarray:
    """Frame i is a flat grey of value 8*i: identifiable after decoding, even through a lossy codec."""
    return np.stack([np.full((size, size, 3), 8 * i, np.uint8) for i in range(count)])


def _moving_square(count: int = 12) -> np.ndarray:
    frames = np.full((count, 48, 64, 3), 230, np.uint8)
    for i in range(count):
        frames[i, 16:32, 2 * i : 2 * i + 16] = (200, 30, 30)
    return frames


# ---------------------------------------------------------------- media


def test_png_round_trip_and_rgba(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    media.write_png(tmp_path / "a.png", frame)
    assert np.array_equal(media.load_image(tmp_path / "a.png"), frame)
    assert media.image_size(tmp_path / "a.png") == (30, 20)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind

    rgba = np.dstack([frame, np.full((20, 30), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    assert np.array_equal(media.load_image(tmp_path / "b.png"), frame)


def test_unreadable_images_raise_media_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    with pytest.raises(MediaError, match="not a readable image.*re-export"):
        media.load_image(tmp_path / "bad.png")
    with pytest.raises(MediaError, match="file not found"):
        media.load_image(tmp_path / "missing.png")
    media.write_png(tmp_path / "whole.png", _grey_frames(1, 64)[0] + 1)
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:80])
    with pytest.raises(MediaError, match="corrupt or truncated"):
        media.load_image(tmp_path / "cut.png")


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_mp4_round_trip(tmp_path, monkeypatch, codec):
    if codec == "mpeg4":
        monkeypatch.setattr(media, "_pick_video_codec", lambda: "mpeg4")
    frames = _moving_square()
    media.write_mp4(tmp_path / "v.mp4", frames, fps=16)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    assert media.probe_video(tmp_path / "v.mp4") == media.VideoInfo(frames=12, fps=16.0, width=64, height=48)
    decoded = media.load_video_frames(tmp_path / "v.mp4", 0, 12)
    assert decoded.shape == (12, 48, 64, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0
    part = media.load_video_frames(tmp_path / "v.mp4", 4, 3)
    assert np.abs(part.astype(int) - frames[4:7]).mean() < 3.0


def test_probe_counts_frames_when_container_does_not(tmp_path):
    import av

    with av.open(str(tmp_path / "v.mkv"), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in _grey_frames(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")))
        container.mux(stream.encode(None))
    with av.open(str(tmp_path / "v.mkv")) as container:
        assert container.streams.video[0].frames == 0  # Matroska does not record a frame count
    assert media.probe_video(tmp_path / "v.mkv") == media.VideoInfo(frames=10, fps=16.0, width=32, height=32)


def test_write_mp4_rejects_odd_sizes_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        media.write_mp4(tmp_path / "o.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=16)
    with pytest.raises(ValueError, match="uint8"):
        media.write_mp4(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=16)
    assert list(tmp_path.iterdir()) == []


def test_broken_and_short_videos_raise_media_error(tmp_path):
    media.write_mp4(tmp_path / "v.mp4", _grey_frames(8), fps=16)
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "v.mp4").read_bytes()[:300])
    with pytest.raises(MediaError, match="cannot decode the video.*re-encode"):
        media.probe_video(tmp_path / "cut.mp4")
    with pytest.raises(MediaError, match="cannot decode the video"):
        media.load_video_frames(tmp_path / "cut.mp4", 0, 1)
    with pytest.raises(MediaError, match="ended after 8 frame"):
        media.load_video_frames(tmp_path / "v.mp4", 5, 4)
    with pytest.raises(MediaError, match="file not found"):
        media.probe_video(tmp_path / "nope.mp4")


def test_frame_folder_is_a_video(tmp_path):
    frames = _grey_frames(5)
    for i, frame in enumerate(frames):
        media.write_png(tmp_path / "clip" / f"{i:03d}.png", frame)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    assert media.probe_video(tmp_path / "clip") == media.VideoInfo(frames=5, fps=0.0, width=32, height=32)
    assert np.array_equal(media.load_video_frames(tmp_path / "clip", 1, 3), frames[1:4])
    with pytest.raises(MediaError, match="holds 5 frame images"):
        media.load_video_frames(tmp_path / "clip", 3, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="no frame images"):
        media.probe_video(tmp_path / "empty")


# 30 -> 16 fps by musubi-tuner's running-sum rule: mostly every other frame, but the float sum reaches
# 7.999... (not 8.0) at frame 15, so frame 15 is dropped and frames 16 and 17 are both kept.
KEPT_30_TO_16 = [0, 2, 4, 6, 8, 10, 12, 14, 16, 17, 19, 21, 23, 25, 27, 29]


def test_fps_decimation_30_to_16(tmp_path):
    assert count_after_fps(30, 30.0, 16.0) == 16
    assert count_after_fps(30, None, None) == 30
    assert count_after_fps(10, 8.0, 16.0) == 10  # no duplication when the source is slower
    frames = _grey_frames(30)
    for i, frame in enumerate(frames):
        media.write_png(tmp_path / "clip" / f"{i:03d}.png", frame)
    got = media.load_video_frames(tmp_path / "clip", 0, 16, source_fps=30.0, target_fps=16.0)
    assert np.array_equal(got, frames[KEPT_30_TO_16])
    got = media.load_video_frames(tmp_path / "clip", 8, 4, source_fps=30.0, target_fps=16.0)
    assert np.array_equal(got, frames[KEPT_30_TO_16[8:12]])

    media.write_mp4(tmp_path / "v.mp4", frames, fps=30)
    got = media.load_video_frames(tmp_path / "v.mp4", 6, 5, source_fps=30.0, target_fps=16.0)
    identified = [int(round(f.mean() / 8)) for f in got]
    assert identified == KEPT_30_TO_16[6:11]


# ---------------------------------------------------------------- buckets

BUCKETS_256 = [
    (128, 512), (144, 448), (160, 400), (176, 368), (192, 336), (208, 304), (224, 288), (240, 272), (256, 256),
    (272, 240), (288, 224), (304, 208), (336, 192), (368, 176), (400, 160), (448, 144), (512, 128),
]  # fmt: skip

# A = 522240, r = 722, widths 352..736 (range end r+16 exclusive, so 736 > r is included); (704, 736),
# (736, 704) and (720, 720) arise twice and appear once.
BUCKETS_960x544 = [
    (352, 1472), (368, 1408), (384, 1360), (400, 1296), (416, 1248), (432, 1200), (448, 1152), (464, 1120),
    (480, 1088), (496, 1040), (512, 1008), (528, 976), (544, 960), (560, 928), (576, 896), (592, 880),
    (608, 848), (624, 832), (640, 816), (656, 784), (672, 768), (688, 752), (704, 736), (720, 720),
    (736, 704), (752, 688), (768, 672), (784, 656), (816, 640), (832, 624), (848, 608), (880, 592),
    (896, 576), (928, 560), (960, 544), (976, 528), (1008, 512), (1040, 496), (1088, 480), (1120, 464),
    (1152, 448), (1200, 432), (1248, 416), (1296, 400), (1360, 384), (1408, 368), (1472, 352),
]  # fmt: skip


def test_bucket_tables():
    assert bucket_resolutions((256, 256), True) == BUCKETS_256 and len(BUCKETS_256) == 17
    assert bucket_resolutions((960, 544), True) == BUCKETS_960x544 and len(BUCKETS_960x544) == 47
    assert all(w * h <= 960 * 544 and w % 16 == 0 and h % 16 == 0 for w, h in BUCKETS_960x544)
    assert bucket_resolutions((960, 544), False) == [(960, 544)]
    assert bucket_resolutions((500, 300), False) == [(496, 288)]


@pytest.mark.parametrize(
    "size, resolution, enable, no_upscale, expected",
    [
        ((1920, 1080), (960, 544), True, False, (960, 544)),
        ((1080, 1920), (960, 544), True, False, (544, 960)),
        ((1000, 1000), (960, 544), True, False, (720, 720)),
        ((64, 64), (960, 544), True, True, (64, 64)),  # small enough: native size, cropped only
        ((80, 50), (960, 544), True, True, (80, 48)),
        ((2000, 2000), (960, 544), True, True, (720, 720)),  # too large: normal aspect match
        ((80, 48), (256, 256), True, False, (336, 192)),  # 1.667: 1.75 beats 1.46
        ((48, 80), (256, 256), True, False, (192, 336)),
        ((64, 64), (256, 256), True, False, (256, 256)),
        ((80, 48), (960, 544), False, True, (960, 544)),  # no_upscale is ignored without bucketing
    ],
)
def test_select_bucket(size, resolution, enable, no_upscale, expected):
    assert select_bucket(*size, resolution, enable, no_upscale) == expected


def test_resize_to_bucket():
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :64] = (255, 0, 0)
    image[:, 64:] = (0, 0, 255)
    # downscale: scale max(32/128, 32/64) = 0.5 -> 64x32, centre crop keeps columns 16..47
    out = resize_to_bucket(image, (32, 32))
    assert out.shape == (32, 32, 3)
    assert (out[:, :16] == (255, 0, 0)).all() and (out[:, 16:] == (0, 0, 255)).all()
    # upscale: 80x48 -> scale 4.2 -> 336x202 -> crop 5 rows off the top
    video = np.repeat(image[None, :48, :80], 3, axis=0)
    out = resize_to_bucket(video, (336, 192))
    assert out.shape == (3, 192, 336, 3) and np.array_equal(out[0], out[2])
    same = resize_to_bucket(image, (128, 64))
    assert np.array_equal(same, image)
    assert resize_to_bucket(image[:50, :80], (80, 48)).shape == (48, 80, 3)  # no_upscale case: crop only


# ---------------------------------------------------------------- frames


def test_round_target_frames(caplog):
    with caplog.at_level(logging.WARNING):
        assert round_target_frames([1, 13, 25]) == [1, 13, 25]
    assert caplog.records == []
    with caplog.at_level(logging.WARNING):
        assert round_target_frames([30, 12, 13, 7, 1, 25], key="d.target_frames") == [1, 5, 9, 13, 25, 29]
    assert "d.target_frames" in caplog.text
    with pytest.raises(ValueError, match=">= 1"):
        round_target_frames([0, 5])


ALL_SINGLE = [(i, 1) for i in range(30)]


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("head", {}, [(0, 1), (0, 13), (0, 25)]),
        ("chunk", {}, ALL_SINGLE + [(0, 13), (13, 13), (0, 25)]),
        ("slide", {}, ALL_SINGLE + [(i, 13) for i in range(18)] + [(i, 25) for i in range(6)]),
        ("slide", {"frame_stride": 5}, [(i, 1) for i in range(0, 30, 5)] + [(0, 13), (5, 13), (10, 13), (15, 13),
                                                                           (0, 25), (5, 25)]),
        ("uniform", {"frame_sample": 4}, [(0, 1), (9, 1), (19, 1), (29, 1), (0, 13), (5, 13), (11, 13), (17, 13),
                                          (0, 25), (1, 25), (3, 25), (5, 25)]),
        ("uniform", {"frame_sample": 1}, [(0, 1), (0, 13), (0, 25)]),  # same as head
        ("full", {}, [(0, 29)]),
        ("full", {"max_frames": 20}, [(0, 17)]),
    ],
)
def test_extract_clips_30_frames(mode, kwargs, expected):
    assert extract_clips(30, [1, 13, 25], mode, **kwargs) == expected


def test_extract_clips_edge_cases():
    assert extract_clips(10, [13, 25], "head") == []
    assert extract_clips(10, [13, 25], "slide") == []
    assert extract_clips(14, [13], "uniform", frame_sample=4) == [(0, 13), (1, 13)]  # repeats dropped
    assert extract_clips(3, [13], "full") == [(0, 1)]
    with pytest.raises(ValueError, match="frame_extraction"):
        extract_clips(30, [1], "random")


# ---------------------------------------------------------------- scanning


def _image_entry(directory, **extra):
    return {"image_directory": str(directory), "resolution": 256, "enable_bucket": True, **extra}


def test_scan_images_with_caption_problems(tmp_path):
    pixels = _grey_frames(1, 64)[0]
    for stem in ("a", "b", "c", "d"):
        media.write_png(tmp_path / f"{stem}.png", pixels)
    (tmp_path / "e.png").write_bytes(b"garbage bytes, not an image")
    (tmp_path / "a.txt").write_text("  a grey square \n", encoding="utf-8")
    (tmp_path / "c.txt").write_text(" \n", encoding="utf-8")
    (tmp_path / "d.txt").write_bytes(b"caf\xe9 au lait")  # latin-1, not UTF-8
    (tmp_path / "e.txt").write_text("garbage")
    media.write_png(tmp_path / "sub" / "z.png", pixels)  # subfolders are not scanned (and are listed)
    items, skips = scan_dataset(_image_entry(tmp_path), 2, 16.0, "dataset.datasets[2]")

    assert items == [
        Item(dataset_index=2, media_path=str(tmp_path / "a.png"), caption="a grey square",
             caption_path=str(tmp_path / "a.txt"), kind="image", start=0, frames=1, bucket=(256, 256),
             source_size=(64, 64), source_fps=None, target_fps=None)
    ]  # fmt: skip
    assert items[0].key == "a_00000-001_256x256"
    assert [os.path.basename(s.path) for s in skips] == ["b.png", "c.png", "d.png", "e.png", "sub"]
    assert skips[0].reason.startswith("no caption file b.txt")
    assert skips[1].reason.startswith("caption file c.txt is empty")
    assert skips[2].reason.startswith("caption file d.txt is not UTF-8")
    assert skips[3].reason.startswith("not a readable image")
    assert skips[4].reason.startswith("a folder: folders inside a dataset folder are not read")


def test_scan_images_buckets_and_same_stem(tmp_path):
    media.write_png(tmp_path / "wide.png", np.zeros((48, 80, 3), np.uint8))
    media.write_png(tmp_path / "wide.PNG", np.zeros((48, 80, 3), np.uint8))  # upper-case suffix counts too
    media.write_png(tmp_path / "x.jpg", np.zeros((48, 80, 3), np.uint8))  # content is PNG; PIL sniffs it
    (tmp_path / "wide.txt").write_text("wide")
    (tmp_path / "x.txt").write_text("x")
    items, skips = scan_dataset(_image_entry(tmp_path, bucket_no_upscale=True), 0, 16.0, "d")
    assert [(os.path.basename(i.media_path), i.bucket) for i in items] == [("wide.PNG", (80, 48)), ("x.jpg", (80, 48))]
    assert [(os.path.basename(s.path), s.reason) for s in skips] == [
        ("wide.png", "same name stem as wide.PNG; rename one of them")
    ]


def test_scan_videos(tmp_path):
    media.write_mp4(tmp_path / "long.mp4", _grey_frames(24), fps=32)
    media.write_mp4(tmp_path / "short.mp4", _grey_frames(5), fps=32)
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "long.mp4").read_bytes()[:300])
    for stem in ("long", "short", "cut"):
        (tmp_path / f"{stem}.txt").write_text(f"{stem} video")
    entry = {"video_directory": str(tmp_path), "resolution": [64, 64], "target_frames": [9, 17]}
    items, skips = scan_dataset(entry, 1, 16.0, "d")
    assert [(i.key, i.start, i.frames, i.bucket, i.source_size) for i in items] == [
        ("long_00000-009_64x64", 0, 9, (64, 64), (32, 32)),
        ("long_00000-017_64x64", 0, 17, (64, 64), (32, 32)),
    ]
    assert items[0].kind == "video" and items[0].source_fps is None and items[0].target_fps == 16.0
    assert [os.path.basename(s.path) for s in skips] == ["cut.mp4", "short.mp4"]
    assert skips[0].reason.startswith("cannot decode the video")
    assert skips[1].reason.startswith("video has 5 frame(s), fewer than every target_frames value [9, 17]")

    # 32 -> 16 fps halves the frames: 24 become 12, so only the 9-frame clip fits
    items, _ = scan_dataset({**entry, "source_fps": 32.0, "frame_extraction": "chunk"}, 1, 16.0, "d")
    assert [(i.start, i.frames, i.source_fps) for i in items] == [(0, 9, 32.0)]


def test_scan_folder_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        scan_dataset(_image_entry(tmp_path / "nope"), 0, 16.0, "dataset.datasets[0]")
    assert err.value.problems[0][0] == "dataset.datasets[0].image_directory"
    assert str(tmp_path / "nope") in err.value.problems[0][1]

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "only.txt").write_text("caption without media")
    with pytest.raises(ConfigError) as err:
        scan_dataset({"video_directory": str(tmp_path / "empty")}, 1, 16.0, "dataset.datasets[1]")
    assert err.value.problems[0][0] == "dataset.datasets[1].video_directory"
    assert "holds no video files" in err.value.problems[0][1]

    with pytest.raises(ConfigError) as err:
        scan_dataset({"resolution": 256}, 0, 16.0, "d")
    assert err.value.problems[0][0] == "d.image_directory"

    bad = {"video_directory": str(tmp_path), "frame_extraction": "random", "frame_stride": 0}
    with pytest.raises(ConfigError) as err:
        scan_dataset(bad, 0, 16.0, "d")
    assert sorted(k for k, _ in err.value.problems) == ["d.frame_extraction", "d.frame_stride"]


def test_dataset_keys():
    assert DATASET_KEYS["image"]["caption_extension"] == ".txt"
    assert DATASET_KEYS["video"]["target_frames"] == (1,) and DATASET_KEYS["video"]["max_frames"] == 129
    assert "target_frames" not in DATASET_KEYS["image"] and "video_directory" not in DATASET_KEYS["image"]


# ---------------------------------------------------------------- demo


def _tree_bytes(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_demo_dataset_is_deterministic_and_scans(tmp_path):
    dirs = make_demo_dataset(tmp_path / "a")
    assert dirs == {"image_directory": str(tmp_path / "a" / "images"), "video_directory": str(tmp_path / "a" / "video")}
    make_demo_dataset(tmp_path / "b")
    first = _tree_bytes(tmp_path / "a")
    assert first == _tree_bytes(tmp_path / "b") and len(first) == 11

    mtimes = {p: os.stat(tmp_path / "a" / p).st_mtime_ns for p in first}
    make_demo_dataset(tmp_path / "a")  # complete: nothing is rewritten
    assert {p: os.stat(tmp_path / "a" / p).st_mtime_ns for p in first} == mtimes
    os.remove(tmp_path / "a" / "video" / "ball.mp4")
    make_demo_dataset(tmp_path / "a")  # incomplete: rewritten, same bytes
    assert _tree_bytes(tmp_path / "a") == first

    images, skips = scan_dataset({"image_directory": dirs["image_directory"], "resolution": 64, "enable_bucket": True},
                                 0, 16.0, "d")
    assert skips == [] and len(images) == 4
    assert {i.caption for i in images} >= {"a red circle on a white background"}
    assert [i.source_size for i in images].count((80, 48)) == 1
    videos, skips = scan_dataset({"video_directory": dirs["video_directory"], "resolution": 64,
                                  "target_frames": [1, 21]}, 0, 16.0, "d")
    assert skips == [] and [(v.start, v.frames) for v in videos] == [(0, 1), (0, 21)]
    assert videos[0].caption == "a blue ball moving from left to right"
    assert media.probe_video(videos[0].media_path) == media.VideoInfo(frames=24, fps=16.0, width=64, height=64)
