"""Nothing corrupt is reused: item entries and stage outputs are checked against the digests recorded
when they were published, and published files get the permissions the umask allows."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import stage
from musubi_pipe.pipeline.items import DIGEST_KEY, item_problem, write_item

LATENTS = "pipeline.stages=[cache_latents]"


def _flip(path: Path, offset: int, count: int = 16) -> None:
    """Flip `count` bytes at `offset` (from the end when negative) in place, keeping size and mtime."""
    st = path.stat()
    blob = bytearray(path.read_bytes())
    start = offset % len(blob)
    for i in range(start, start + count):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_item_digest_covers_header_and_data(tmp_path):
    path = tmp_path / "a.safetensors"
    digest = write_item(path, {"latents": torch.arange(24.0).reshape(2, 3, 4)}, {"item": "x"})
    assert item_problem(path) is None and len(digest) == 64
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"item": "x", DIGEST_KEY: digest}
    good = path.read_bytes()
    _flip(path, -8, 4)  # tensor bytes
    assert "does not match" in item_problem(path)
    path.write_bytes(good.replace(b"[2,3,4]", b"[3,2,4]"))  # same size, a header field changed
    assert "does not match" in item_problem(path)
    path.write_bytes(good[:5])
    assert "truncated" in item_problem(path)
    save_file({"latents": torch.zeros(2)}, str(path))  # an entry from before digests were recorded
    assert "no recorded digest" in item_problem(path)


def test_corrupt_latent_is_moved_aside_and_recomputed(demo):
    first = demo(LATENTS)
    index = json.loads((Path(stage(first, "cache_latents")["artifact"]) / "index.json").read_text())
    item = demo.root / "cache" / "items" / "latents" / index[0]["entry"][:2] / f"{index[0]['entry']}.safetensors"
    original = item.read_bytes()
    _flip(item, -64)
    from safetensors.torch import load, load_file

    again = demo(LATENTS)
    record = stage(again, "cache_latents")
    assert (record["status"], record["items_computed"]) == ("ran", 1)
    assert "1 cached latents item(s) corrupt (moved aside)" in record["reason"]
    recomputed, before = load_file(item), load(original)  # bitwise equal tensors: nothing corrupt was used
    assert recomputed.keys() == before.keys() and all(torch.equal(recomputed[k], before[k]) for k in before)
    trashed = list((demo.root / "cache" / "items" / ".trash" / "latents").iterdir())
    assert len(trashed) == 1 and item_problem(trashed[0]) and item_problem(item) is None
    assert again["moved_aside"] and "content does not match" in again["moved_aside"][0]
    assert [s["status"] for s in demo(LATENTS)["stages"]] == ["cached"]


def test_corrupt_lora_is_not_handed_back(demo):
    stages = "pipeline.stages=[cache_latents,cache_text,train]"
    first = demo(stages)
    lora = Path(first["lora"][0])
    original = lora.read_bytes()
    _flip(lora, -32)
    size_only = demo(stages, "pipeline.verify=size")  # what verify=size misses (documented)
    assert stage(size_only, "train")["status"] == "cached"
    again = demo(stages)
    assert stage(again, "train")["status"] == "ran"
    assert "differs from the sha256 recorded" in again["moved_aside"][0]
    from safetensors.torch import load, load_file

    retrained, before = load_file(again["lora"][0]), load(original)
    assert retrained.keys() == before.keys() and all(torch.equal(retrained[k], before[k]) for k in before)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_published_files_follow_the_umask(tmp_path, mask):
    from musubi_pipe.network.lora_file import save_lora_file

    import numpy as np

    from musubi_pipe.data.media import write_mp4, write_png
    from musubi_pipe.network.safetensors_stream import plan_layout, write_streaming

    old = os.umask(mask)
    try:
        save_lora_file(tmp_path / "l.safetensors", {"a": torch.zeros(2)}, {})
        write_item(tmp_path / "i.safetensors", {"a": torch.zeros(2)})
        write_png(tmp_path / "s.png", np.zeros((8, 8, 3), np.uint8))
        write_mp4(tmp_path / "s.mp4", np.zeros((3, 16, 16, 3), np.uint8), 16.0)
        order, header, size = plan_layout(["a"], {"a": "F32"}, {"a": (2,)}, {})
        write_streaming(tmp_path / "m.safetensors", header, size, order, lambda name: torch.zeros(2))
    finally:
        os.umask(old)
    for name in ("l.safetensors", "i.safetensors", "s.png", "s.mp4", "m.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
