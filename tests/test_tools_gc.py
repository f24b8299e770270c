"""`python -m musubi_pipe.tools gc` on a store built by hand: roots, grace, dry run, bytes, CLI.

No torch, no models: artifacts are folders with manifest.json + index.json, items are files with a
few bytes, run records are run.json files whose mtimes are set with os.utime.
"""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musubi_pipe.errors import UserError
from musubi_pipe.tools.gc import collect_garbage, human_bytes

REPO = Path(__file__).resolve().parents[1]
DAY = 86400
OLD = time.time() - 3 * 3600  # past the default 60-minute grace period
DEAD_PID = 2_000_000_000  # above any pid_max: never a live process


def _age(path: Path, when: float) -> Path:
    """Set the mtime of `path` and, for a folder, of everything under it."""
    targets = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in targets:
        os.utime(p, (when, when))
    return path


class FakeStore:
    """A cache + runs layout as Store and the runner write it."""

    def __init__(self, root: Path):
        self.cache = root / "cache"
        self.runs = root / "runs"
        self.cache.mkdir(parents=True)
        self.runs.mkdir()

    def item(self, kind: str, key: str, size: int = 100, when: float = OLD) -> Path:
        path = self.cache / "items" / kind / key[:2] / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        return _age(path, when)

    def artifact(self, stage: str, fp: str, index=None, files: dict | None = None, upstream: dict | None = None,
                 when: float = OLD) -> Path:
        path = self.cache / stage / fp
        path.mkdir(parents=True)
        if index is not None:
            (path / "index.json").write_text(json.dumps(index))
        for name, data in (files or {}).items():
            (path / name).write_bytes(data)
        manifest = {"stage": stage, "fingerprint": fp, "outputs": {}, "inputs": {"upstream": upstream or {}}}
        (path / "manifest.json").write_text(json.dumps(manifest))
        return _age(path, when)

    def latents(self, fp: str, keys: list[str], **kw) -> Path:
        return self.artifact("cache_latents", fp, [{"item_key": f"m{i}", "entry": k} for i, k in enumerate(keys)], **kw)

    def text(self, fp: str, keys: dict[str, str], **kw) -> Path:
        return self.artifact("cache_text", fp, keys, **kw)

    def run(self, name: str, artifacts: list[Path], days_ago: float) -> Path:
        run_dir = self.runs / name
        run_dir.mkdir(parents=True)
        stages = [{"name": a.parent.name, "status": "cached", "fingerprint": a.name, "artifact": str(a)} for a in artifacts]
        record = run_dir / "run.json"
        record.write_text(json.dumps({"version": 1, "name": name, "stages": stages}))
        return _age(record, time.time() - days_ago * DAY)


def _key(c: str) -> str:
    return c * 64


def _gc(store: FakeStore, **kw) -> dict:
    return collect_garbage(store.cache, store.runs, kw.pop("keep_days", 30), kw.pop("grace_minutes", 60),
                           kw.pop("dry_run", False))


@pytest.fixture
def store(tmp_path) -> FakeStore:
    return FakeStore(tmp_path)


def test_old_run_items_go_recent_run_items_stay(store):
    shared, old_only, recent_only = store.item("latents", _key("a")), store.item("latents", _key("b")), store.item("latents", _key("c"))
    old_idx = store.latents("f" * 64, [_key("a"), _key("b")])
    new_idx = store.latents("e" * 64, [_key("a"), _key("c")])
    store.run("old", [old_idx], days_ago=40)
    store.run("new", [new_idx], days_ago=1)

    report = _gc(store)

    assert shared.exists() and recent_only.exists() and new_idx.exists()
    assert not old_only.exists() and not old_idx.exists()
    assert not old_only.parent.exists(), "an emptied <ab> folder is removed"
    assert report["recent_runs"] == 1
    assert report["removed"]["items"] == {"count": 1, "bytes": 100}
    assert report["removed"]["indexes"]["count"] == 1
    assert report["kept"]["items"] == 2 and report["kept"]["indexes"] == 1 and report["kept"]["roots"] == 1
    assert "freed " in report["summary"] and "1 item," in report["summary"]


def test_text_index_and_kinds(store):
    kept, gone = store.item("text", _key("1")), store.item("text", _key("2"))
    store.run("new", [store.text("d" * 64, {"a cat": _key("1")})], days_ago=0)
    store.text("c" * 64, {"a dog": _key("2")})  # named by no run
    _gc(store)
    assert kept.exists() and not gone.exists()


def test_remaining_non_root_index_keeps_its_items(store):
    """A non-root item-stage artifact kept (here: by the grace period) still protects its items."""
    item = store.item("latents", _key("a"))
    fresh_idx = store.latents("f" * 64, [_key("a")], when=time.time())
    store.run("new", [], days_ago=0)
    report = _gc(store)
    assert fresh_idx.exists() and item.exists()
    assert report["kept"]["fresh_indexes"] == 1


def test_upstream_of_a_root_is_a_root(store):
    """A run that selected only train still protects the cache_latents artifact its LoRA came from."""
    item = store.item("latents", _key("a"))
    idx = store.latents("f" * 64, [_key("a")])
    train = store.artifact("train", "9" * 64, files={"lora.safetensors": b"w" * 10}, upstream={"cache_latents": "f" * 64})
    store.run("train-only", [train], days_ago=1)
    _gc(store)
    assert idx.exists() and item.exists()


def test_train_and_sample_artifacts_are_never_removed(store):
    train = store.artifact("train", "9" * 64, files={"lora.safetensors": b"w" * 10})
    sample = store.artifact("sample", "8" * 64, files={"sample_00.png": b"p"})
    store.run("old", [train, sample], days_ago=400)
    report = _gc(store, keep_days=1, grace_minutes=0)
    assert (train / "lora.safetensors").exists() and (sample / "sample_00.png").exists()
    assert report["kept"]["other_artifacts"] == 2 and report["kept"]["other_stages"] == ["sample", "train"]


def test_bytes_freed_is_the_sum_removed_and_dry_run_matches(store, tmp_path):
    sizes = {"a": 1000, "b": 2345, "c": 7}
    for c, n in sizes.items():
        store.item("latents", _key(c), size=n)
    old_idx = store.latents("f" * 64, [_key("a"), _key("b")])
    index_bytes = (old_idx / "index.json").stat().st_size + (old_idx / "manifest.json").stat().st_size
    store.run("old", [old_idx], days_ago=31)
    trash = store.cache / "cache_latents" / ".trash" / "dead-1"
    trash.mkdir(parents=True)
    (trash / "manifest.json").write_bytes(b"t" * 50)
    before = sorted(str(p) for p in store.cache.rglob("*"))

    dry = _gc(store, dry_run=True)
    assert sorted(str(p) for p in store.cache.rglob("*")) == before, "a dry run removes nothing"
    assert "would free" in dry["summary"]

    real = _gc(store)
    assert real["removed"] == dry["removed"] and real["freed_bytes"] == dry["freed_bytes"]
    assert real["removed"]["items"] == {"count": 3, "bytes": sum(sizes.values())}
    assert real["removed"]["indexes"] == {"count": 1, "bytes": index_bytes}
    assert real["removed"]["trash"] == {"count": 1, "bytes": 50}
    assert real["freed_bytes"] == sum(sizes.values()) + index_bytes + 50
    assert real["summary"].splitlines()[1].startswith(f"freed {human_bytes(real['freed_bytes'])} (3 items, 1 index, 1 trash entry")
    assert not list((store.cache / "items").rglob("*.safetensors"))


def test_grace_period_protects_a_fresh_unreferenced_item(store):
    fresh = store.item("latents", _key("a"), when=time.time() - 60)
    stale = store.item("latents", _key("b"))
    report = _gc(store)
    assert fresh.exists() and not stale.exists()
    assert report["kept"]["fresh_items"] == 1
    _gc(store, grace_minutes=0)
    assert not fresh.exists()


def test_nested_multirun_record_is_found(store):
    item = store.item("latents", _key("a"))
    idx = store.latents("f" * 64, [_key("a")])
    store.run("sweep_2024/3", [idx], days_ago=2)
    report = _gc(store)
    assert report["recent_runs"] == 1 and idx.exists() and item.exists()


def test_dry_run_record_without_artifacts_adds_no_roots(store):
    idx = store.latents("f" * 64, [])
    record = store.runs / "dry" / "run.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"dry_run": True, "plan": [{"name": "cache_latents", "fingerprint": "f" * 64}]}))
    report = _gc(store)
    assert report["recent_runs"] == 1 and not idx.exists()


def test_partial_locks_and_state_files_survive_trash_is_emptied(store):
    partial = store.cache / "train" / ".partial" / ("9" * 64) / "step3.safetensors"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"s" * 10)
    lock = store.cache / "cache_latents" / ".locks" / ("f" * 64 + ".lock")
    lock.parent.mkdir(parents=True)
    lock.touch()
    keep = [store.cache / "digests.json", store.cache / "device_probe.json",
            store.cache / "cache_latents" / ".last" / "demo.json"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    trash = store.cache / "train" / ".trash"
    (trash / "x-1-2").mkdir(parents=True)
    (trash / "x-1-2" / "lora.safetensors").write_bytes(b"z" * 5)
    for path in [partial, lock, *keep]:
        _age(path, time.time() - 400 * DAY)

    _gc(store, keep_days=0, grace_minutes=0)

    assert partial.exists() and lock.exists() and all(p.exists() for p in keep)
    assert trash.is_dir() and not list(trash.iterdir())


def test_tmp_of_dead_process_and_stale_writer_files(store):
    tmp_root = store.cache / "cache_latents" / ".tmp"
    dead = tmp_root / f"{'f' * 64}-{DEAD_PID}-0"
    alive = tmp_root / f"{'e' * 64}-{os.getppid()}-0"
    for path in (dead, alive):
        path.mkdir(parents=True)
        (path / "index.json").write_bytes(b"i" * 9)
        _age(path, OLD)
    stale = store.cache / "items" / "latents" / "ab" / f"{'ab' * 32}.safetensors.{DEAD_PID}.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"t" * 4)
    _age(stale, OLD)
    writing = stale.with_name(f"{'ac' * 32}.safetensors.{os.getpid()}.tmp")
    writing.write_bytes(b"t")

    report = _gc(store)

    assert not dead.exists() and alive.exists() and not stale.exists() and writing.exists()
    assert report["removed"]["tmp"] == {"count": 2, "bytes": 13}


def test_locked_artifact_is_skipped_and_reported(store):
    item = store.item("latents", _key("a"))
    idx = store.latents("f" * 64, [_key("a")])
    lock = idx.parent / ".locks" / f"{idx.name}.lock"
    lock.parent.mkdir()
    with open(lock, "a+") as handle:  # what Store.lock does in another process
        fcntl.flock(handle, fcntl.LOCK_EX)
        report = _gc(store)
    assert idx.exists() and item.exists()
    assert report["kept"]["locked_indexes"] == 1
    assert any(str(lock) in note for note in report["notes"])


def test_computing_stage_blocks_removal_of_its_kind(store):
    """While cache_latents holds a lock (a run is encoding), no latents item is removed; text items are."""
    latent, text = store.item("latents", _key("a")), store.item("text", _key("b"))
    (store.cache / "cache_text").mkdir()
    lock = store.cache / "cache_latents" / ".locks" / ("d" * 64 + ".lock")
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        report = _gc(store)
    assert latent.exists() and not text.exists()
    assert report["kept"]["blocked_items"] == 1


def test_unreadable_index_blocks_item_removal(store):
    item = store.item("latents", _key("a"))
    idx = store.artifact("cache_latents", "f" * 64, files={"index.json": b"{not json"})
    store.run("new", [idx], days_ago=0)
    report = _gc(store)
    assert item.exists()
    assert any("index.json" in note and "Delete" in note for note in report["notes"])


def test_unreadable_recent_run_record_stops_gc(store):
    bad = store.runs / "broken" / "run.json"
    bad.parent.mkdir()
    bad.write_text("{")
    item = store.item("latents", _key("a"))
    with pytest.raises(UserError, match="broken/run.json"):
        _gc(store)
    assert item.exists()


def test_missing_folders_are_user_errors(tmp_path, store):
    with pytest.raises(UserError, match="--cache"):
        collect_garbage(tmp_path / "nope", store.runs, 30, 60, False)
    with pytest.raises(UserError, match="--runs"):
        collect_garbage(store.cache, tmp_path / "nope", 30, 60, False)


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1536, 3 * 2**30)] == ["0 B", "999 B", "1.5 KiB", "3.0 GiB"]


# -- command line ----------------------------------------------------------------------------
def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "musubi_pipe.tools", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_help_lists_verbs_and_semantics():
    top = _cli("--help")
    assert top.returncode == 0 and "gc" in top.stdout and "VERB" in top.stdout
    out = _cli("gc", "--help")
    assert out.returncode == 0, out.stderr
    for text in ("--keep-days", "--grace-minutes", "--dry-run", "never removed", "train loras", ".partial", "outputs/cache"):
        assert text.lower() in out.stdout.lower(), text


def test_cli_bad_arguments_exit_2():
    assert _cli().returncode == 2
    bad = _cli("gc", "--keep-days", "soon")
    assert bad.returncode == 2 and "--keep-days" in bad.stderr
    missing = _cli("gc", "--cache", "/nonexistent/cache", "--runs", "/nonexistent/runs")
    assert missing.returncode == 2 and "/nonexistent/cache" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_gc_prints_the_freed_line_without_torch(store):
    store.item("latents", _key("a"), size=2048)
    code = ("import sys; from musubi_pipe.tools.__main__ import main; rc = main(sys.argv[1:]);"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "gc", "--cache", str(store.cache), "--runs", str(store.runs)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "freed 2.0 KiB (1 item, 0 indexes, 0 trash entries, 0 tmp leftovers)" in out.stdout
    assert out.stdout.strip().endswith("NO_TORCH")
    again = _cli("gc", "--cache", store.cache, "--runs", store.runs, "--dry-run")
    assert again.returncode == 0 and "would free 0 B" in again.stdout


def test_without_the_registry_item_stages_are_found_by_index_json(store, monkeypatch):
    """If the stage registry cannot be imported, folders whose artifacts have index.json are item stages."""
    import musubi_pipe.tools.gc as gc

    monkeypatch.setattr(gc, "registered_item_stages", lambda: None)
    item = store.item("latents", _key("a"))
    idx = store.latents("f" * 64, [_key("a")])
    train = store.artifact("train", "9" * 64, files={"lora.safetensors": b"w"})
    report = _gc(store)
    assert not idx.exists() and not item.exists() and train.exists()
    assert report["removed"]["indexes"]["count"] == 1
