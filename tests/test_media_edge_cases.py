"""Media that used to be wrecked or dropped without a word: high bit depth, palettes, alpha, links, GIFs,
a dataset folder that is a file, and extreme resizing."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musubi_pipe.data import media
from musubi_pipe.data.sources import scan_dataset
from musubi_pipe.errors import ConfigError


def _caption(path: Path, text: str = "a picture") -> Path:
    path.with_suffix(".txt").write_text(text)
    return path


def test_16_bit_grayscale_keeps_its_tones(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = media.load_image(tmp_path / "g16.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(ramp * 255.0 / 65535.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert (rgb == 255).mean() < 0.01  # Pillow's convert("RGB") made 99.6 % of it white
    older = Image.fromarray(ramp.astype(np.int32), mode="I")  # how older Pillow opens 16-bit PNGs
    assert np.array_equal(media.to_rgb8(older)[..., 1], expected)


def test_palette_and_alpha_images_convert_by_value(tmp_path):
    palette = Image.new("P", (8, 8))
    palette.putpalette([200, 30, 90, 10, 250, 40] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png")
    rgb = media.load_image(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (10, 250, 40) and tuple(rgb[1, 1]) == (200, 30, 90)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (40, 80, 120), 0  # fully transparent: the colour underneath is kept
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert tuple(media.load_image(tmp_path / "a.png")[3, 3]) == (40, 80, 120)
    assert media.image_info(tmp_path / "a.png") == ((8, 8), True)
    assert media.image_info(tmp_path / "p.png") == ((8, 8), False)


def test_every_unused_file_is_listed_with_its_reason(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("good.png", "alpha.png"):
        Image.new("RGBA" if name == "alpha.png" else "RGB", (64, 64)).save(images / name)
        _caption(images / name)
    Image.new("RGB", (64, 64)).save(images / "anim.gif")
    _caption(images / "anim.gif")
    (images / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (images / "loop.png").symlink_to(images / "loop.png")
    (images / "sub").mkdir()
    (images / ".hidden.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        items, skips = scan_dataset({"image_directory": str(images), "resolution": 64}, 0, 16.0, "dataset.datasets[0]")
    assert sorted(Path(i.media_path).name for i in items) == ["alpha.png", "good.png"]
    reasons = {Path(s.path).name: s.reason for s in skips}
    assert sorted(reasons) == ["anim.gif", "dangling.png", "loop.png", "sub"]
    assert reasons["anim.gif"].startswith("not a supported media format (supported: .avif, .bmp, .jpeg")
    assert reasons["dangling.png"].startswith(f"broken symlink to {tmp_path / 'nowhere.png'}")
    assert reasons["loop.png"].startswith("symlink loop")
    assert reasons["sub"].startswith("a folder")
    assert "dataset.datasets[0]: 1 image(s) with an alpha channel: it is dropped" in caplog.text
    assert "alpha.png" in caplog.text


def test_the_demo_run_lists_unused_files_in_its_record(demo):
    images = demo.root / "demo_data" / "images"
    demo("pipeline.stages=[cache_text]")  # writes the demo data
    Image.new("RGB", (64, 64)).save(images / "extra.gif")
    record = demo("pipeline.stages=[cache_latents]")
    latents = record["stages"][0]
    assert latents["items_skipped"] == 1 and latents["skipped"][0]["path"].endswith("extra.gif")
    assert "not a supported media format" in latents["skipped"][0]["reason"]
    assert "extra.gif" in (Path(record["run_dir"]) / "run.log").read_text()


def test_an_image_folder_that_is_a_file_says_so(tmp_path):
    path = tmp_path / "images"
    path.write_text("not a folder")
    with pytest.raises(ConfigError) as caught:
        scan_dataset({"image_directory": str(path), "resolution": 64}, 0, 16.0, "dataset.datasets[0]")
    assert caught.value.problems == [("dataset.datasets[0].image_directory",
                                      f"{path} is a file, not a folder; point image_directory at the folder that "
                                      "holds the media (or use image_jsonl_file / video_jsonl_file for a metadata "
                                      "file)")]


def test_extreme_upscale_and_crop_are_warned(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (1, 1)).save(_caption(images / "dot.png"))
    Image.new("RGB", (12000, 16)).save(_caption(images / "strip.png"))
    Image.new("RGB", (200, 100)).save(_caption(images / "fine.png"))
    with caplog.at_level(logging.WARNING):
        items, _ = scan_dataset({"image_directory": str(images), "resolution": [128, 32]}, 0, 16.0, "d")
    assert len(items) == 3
    assert "d: 1 media upscaled more than 4x to their bucket" in caplog.text and "dot.png (1x1 -> 128x32, 128x)" in caplog.text
    assert "d: 1 media cropped to less than 25% of their area" in caplog.text
    assert "strip.png (12000x16 -> 128x32 keeps 0.5%)" in caplog.text
    assert "fine.png" not in caplog.text
