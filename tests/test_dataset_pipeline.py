"""The dataset layer inside real runs: musubi-tuner dataset files, strict mode, decode-time failures,
removed and resized items, control latents, preview, and a cache stage killed halfway."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from musubi_pipe.data import media
from musubi_pipe.errors import ConfigError, MediaError
from tests.conftest import stage

pytestmark = pytest.mark.pipeline

LATENTS = "pipeline.stages=[cache_latents]"


def _demo_dirs(demo) -> tuple[Path, Path]:
    data = demo.root / "demo_data"
    return data / "images", data / "video"


def _entries(demo, record) -> dict:
    """Item key -> entry tensors of a run's cache_latents index."""
    index = json.loads((Path(stage(record, "cache_latents")["artifact"]) / "index.json").read_text())
    store = demo.root / "cache" / "items" / "latents"
    return {r["key"]: load_file(str(store / r["entry"][:2] / f"{r['entry']}.safetensors")) for r in index}


def test_musubi_dataset_toml_reads_unchanged(demo, tmp_path):
    native = demo(LATENTS)
    images, video = _demo_dirs(demo)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[general]
resolution = [64, 64]
caption_extension = ".txt"
enable_bucket = true

[[datasets]]
image_directory = "{images}"
cache_directory = "{tmp_path}/musubi_cache"  # accepted; our cache is the store

[[datasets]]
video_directory = "{video}"
target_frames = [9]
frame_extraction = "head"
""")
    from_toml = demo(LATENTS, f"dataset.musubi_config={toml}", "dataset.datasets=[]")
    latents = stage(from_toml, "cache_latents")
    # the same items as the native YAML config: nothing to encode
    assert (latents["items_total"], latents["items_computed"]) == (5, 0)
    assert latents["fingerprint"] == stage(native, "cache_latents")["fingerprint"]
    assert "image_directory" in (Path(from_toml["run_dir"]) / "config.yaml").read_text()  # what ran is recorded

    toml.write_text(toml.read_text().replace("target_frames", "target_frame").replace("enable_bucket", "enable_buckets"))
    with pytest.raises(ConfigError) as err:
        demo(LATENTS, f"dataset.musubi_config={toml}", "dataset.datasets=[]")
    assert {key for key, _ in err.value.problems} == {f"{toml}: general.enable_buckets",
                                                      f"{toml}: datasets[1].target_frame"}
    assert "did you mean 'target_frames'" in str(err.value)
    with pytest.raises(ConfigError, match="dataset.musubi_config: is set .* and so is dataset.datasets"):
        demo(LATENTS, f"dataset.musubi_config={toml}")


def test_strict_turns_skips_into_errors_before_loading(demo):
    images, _ = _demo_dirs(demo)
    demo(LATENTS)
    shutil.copy(next(images.glob("*.png")), images / "uncaptioned.png")
    assert stage(demo(LATENTS), "cache_latents")["items_skipped"] == 1
    with pytest.raises(ConfigError) as err:
        demo(LATENTS, "dataset.strict=true")
    assert err.value.problems[0][0] == str(images / "uncaptioned.png")
    assert "no caption file uncaptioned.txt" in err.value.problems[0][1] and "dataset.strict=true" in err.value.problems[0][1]


def _frames_video(folder: Path, count: int = 12) -> Path:
    for i in range(count):
        media.write_png(folder / f"{i:04d}.png", np.full((64, 64, 3), 10 * i, np.uint8))
    return folder


def test_media_failing_at_decode_time_is_skipped_counted_and_strict_stops(demo, tmp_path):
    good = _frames_video(tmp_path / "good_clip")
    bad = _frames_video(tmp_path / "bad_clip")
    (bad / "0007.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")  # the probe reads only frame 0
    meta = tmp_path / "clips.jsonl"
    meta.write_text("\n".join(json.dumps({"video_path": str(p), "caption": f"clip {p.name}"})
                              for p in (good, bad)))
    entry = f"dataset.datasets=[{{video_jsonl_file:'{meta}',target_frames:[9]}}]"
    record = demo(LATENTS, entry)
    latents = stage(record, "cache_latents")
    assert (latents["items_total"], latents["items_computed"], latents["items_skipped"]) == (2, 1, 1)
    assert latents["skipped"][0]["path"] == str(bad) and "0007.png" in latents["skipped"][0]["reason"]
    assert len(_entries(demo, record)) == 1  # the failed clip is not in the index
    again = stage(demo(LATENTS, entry), "cache_latents")
    assert again["status"] == "cached" and again["items_skipped"] == 1  # still reported from the stored stats

    with pytest.raises(MediaError, match="0007.png"):
        demo(LATENTS, entry, "dataset.strict=true")
    media.write_png(bad / "0007.png", np.full((64, 64, 3), 99, np.uint8))  # fixed: only that clip is encoded
    fixed = stage(demo(LATENTS, entry, "dataset.strict=true"), "cache_latents")
    assert (fixed["items_computed"], fixed["items_skipped"]) == (1, 0)


def test_removed_file_keeps_entries_and_resolution_changes_keys(demo, tmp_path):
    demo("pipeline.stages=[cache_text]")  # writes the demo data
    images = shutil.copytree(_demo_dirs(demo)[0], tmp_path / "images")  # the demo folder rewrites itself
    entry = f"dataset.datasets=[{{image_directory:'{images}'}}]"
    demo(LATENTS, entry)
    entries_before = {p.name for p in (demo.root / "cache" / "items" / "latents").rglob("*.safetensors")}
    victim = sorted(images.glob("*.png"))[0]
    victim.rename(victim.with_suffix(".bak"))
    assert demo(LATENTS, entry, "pipeline.dry_run=true")["plan"][0]["reason"] == "1 item removed"
    after = stage(demo(LATENTS, entry), "cache_latents")
    assert (after["items_total"], after["items_computed"]) == (3, 0)
    # the removed image's entry stays in the store for any run that uses it
    assert {p.name for p in (demo.root / "cache" / "items" / "latents").rglob("*.safetensors")} == entries_before
    victim.with_suffix(".bak").rename(victim)
    assert stage(demo(LATENTS, entry), "cache_latents")["status"] == "cached"

    resized = stage(demo(LATENTS, entry, "dataset.general.resolution=[48,48]"), "cache_latents")
    assert (resized["items_total"], resized["items_computed"]) == (4, 4)  # new sizes, new keys: no stale latents
    unbucketed = stage(demo(LATENTS, entry, "dataset.general.enable_bucket=false"), "cache_latents")
    assert unbucketed["items_computed"] == 1  # only the 80x48 image had a non-square bucket


def test_control_latents_are_encoded_for_tasks_that_use_them(demo, tmp_path, monkeypatch):
    from musubi_pipe.models.wan.family import WanFamily

    images, _ = _demo_dirs(demo)
    demo(LATENTS)  # writes the demo data
    controls = tmp_path / "controls"
    controls.mkdir()
    for path in sorted(images.glob("*.png")):
        Image.new("RGB", (32, 48), (20, 200, 20)).save(controls / f"{path.stem}.png")
    entry = f"dataset.datasets=[{{image_directory:'{images}',control_directory:'{controls}',control_resolution:32}}]"
    plain = demo(LATENTS, entry)  # the Wan tasks do not train with controls: not encoded, not in the key
    assert stage(plain, "cache_latents")["items_computed"] == 0
    assert all(set(t) == {"latents"} for t in _entries(demo, plain).values())

    monkeypatch.setattr(WanFamily, "uses_controls", lambda self, model_cfg: True)
    with_controls = demo(LATENTS, entry)
    assert stage(with_controls, "cache_latents")["items_computed"] == 4
    entries = _entries(demo, with_controls)
    for tensors in entries.values():
        # a 32x48 control at control_resolution 32 (1024 px): of the 16x64, 32x32 and 48x16 buckets, 32x32
        # is closest in aspect ratio -> tiny VAE latents [C, 1, 4, 4] (8x spatial compression)
        assert set(tensors) == {"latents", "control_latents_0"}
        assert tuple(tensors["control_latents_0"].shape[1:]) == (1, 4, 4)
    Image.new("RGB", (32, 48), (200, 20, 20)).save(next(controls.glob("*.png")))
    assert stage(demo(LATENTS, entry), "cache_latents")["items_computed"] == 1  # an edited control: its item only


def test_preview_draws_without_encoding(demo):
    record = demo("dataset.preview=true", "dataset.preview_max_items=3")
    preview = record["preview"]
    assert preview["items"] == 5 and preview["shown"] == 3 and preview["items_skipped"] == 0
    sheet = Image.open(preview["sheets"][0])
    assert sheet.size[0] > 100 and sheet.size[1] > 100
    rows = Path(preview["clips"]).read_text().splitlines()
    assert len(rows) == 6 and "ball" in "".join(rows)
    assert "stages" not in record and not (demo.root / "cache" / "cache_latents").exists()


def test_killed_cache_stage_continues_from_stored_items(demo, monkeypatch):
    from musubi_pipe.pipeline.store import Store

    images, _ = _demo_dirs(demo)
    demo("pipeline.stages=[cache_text]")  # writes the demo data, encodes nothing in cache_latents
    save, calls = Store.save_item, []

    def dies_on_third(self, kind, key, tensors, metadata=None):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a killed process would stop: mid-stage
        return save(self, kind, key, tensors, metadata)

    monkeypatch.setattr(Store, "save_item", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        demo(LATENTS)
    monkeypatch.setattr(Store, "save_item", save)
    published = [p for p in (demo.root / "cache" / "cache_latents").iterdir() if not p.name.startswith((".", "last"))]
    assert published == []  # nothing half-done was published
    resumed = stage(demo(LATENTS), "cache_latents")
    assert (resumed["status"], resumed["items_total"], resumed["items_computed"]) == ("ran", 5, 3)


def test_gc_keeps_what_recent_runs_use_and_missing_items_are_recomputed(demo):
    import os
    import time

    from musubi_pipe.tools.gc import collect_garbage

    old = demo(LATENTS)
    recent = demo(LATENTS, "dataset.general.resolution=[48,48]")
    month_ago = time.time() - 40 * 86400
    os.utime(Path(old["run_dir"]) / "run.json", (month_ago, month_ago))
    report = collect_garbage(demo.root / "cache", demo.root / "runs", keep_days=30, grace_minutes=0)
    assert report["removed"]["items"]["count"] == 5 and report["removed"]["indexes"]["count"] == 1
    assert report["freed_bytes"] > 0

    assert stage(demo(LATENTS, "dataset.general.resolution=[48,48]"), "cache_latents")["status"] == "cached"
    again = stage(demo(LATENTS), "cache_latents")
    assert (again["status"], again["items_computed"]) == ("ran", 5)

    # an index whose entries went missing (deleted by hand) is not trusted: those items are recomputed
    entry = json.loads((Path(stage(recent, "cache_latents")["artifact"]) / "index.json").read_text())[0]["entry"]
    (demo.root / "cache" / "items" / "latents" / entry[:2] / f"{entry}.safetensors").unlink()
    plan = demo(LATENTS, "dataset.general.resolution=[48,48]", "pipeline.dry_run=true")["plan"][0]
    assert plan["reason"] == "1 cached latents item(s) missing from the store"
    fixed = stage(demo(LATENTS, "dataset.general.resolution=[48,48]"), "cache_latents")
    assert (fixed["status"], fixed["items_computed"]) == ("ran", 1)
