"""The artifact store: one folder per (stage, fingerprint), published atomically, never edited in place.

Layout under the cache root:

    <stage>/<fingerprint>/            published outputs + manifest.json (written last)
    <stage>/last.json                 input document of the entry used most recently (for plan diffs)
    <stage>/.tmp/<fp>-<pid>-<n>/      where a running stage writes; renamed into place on success
    <stage>/.partial/<fingerprint>/   resumable state of a long stage (train checkpoints)
    <stage>/.locks/<fingerprint>.lock per-key lock shared by parallel jobs
    <stage>/.trash/                   entries found corrupt, moved aside rather than trusted
    items/<kind>/<ab>/<key>.safetensors   content-addressed item entries (latents, text embeddings)

A published entry is valid only if its manifest reads and every output it lists exists with the
recorded size (and, with verify="full", the recorded sha256). Anything else is a miss.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path

from musubi_pipe.pipeline.fingerprint import sha256_file

MANIFEST = "manifest.json"
_counter = itertools.count()


class Store:
    """Stage artifacts and item entries under one cache root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- stage artifacts -------------------------------------------------------------------
    def entry_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def lookup(self, stage: str, fp: str, verify: str = "size") -> dict | None:
        """Return the manifest of a valid published entry, or None (a corrupt entry is moved aside)."""
        entry = self.entry_dir(stage, fp)
        if not entry.exists():
            return None
        problem = self._check_entry(entry, verify)
        if problem is None:
            return json.loads((entry / MANIFEST).read_text())
        trash = self.root / stage / ".trash" / f"{fp}-{int(time.time())}-{os.getpid()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(entry, trash)
        print(f"[store] {stage}/{fp[:12]} was invalid ({problem}); moved to {trash} and recomputing")
        return None

    @staticmethod
    def _check_entry(entry: Path, verify: str) -> str | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            outputs = manifest["outputs"]
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable manifest"
        for rel, info in outputs.items():
            path = entry / rel
            if not path.is_file():
                return f"missing output {rel}"
            if path.stat().st_size != info["size"]:
                return f"output {rel} has {path.stat().st_size} bytes, manifest says {info['size']}"
            if verify == "full" and sha256_file(path) != info["sha256"]:
                return f"output {rel} does not match its sha256"
        return None

    def new_tmp_dir(self, stage: str, fp: str) -> Path:
        """Return a fresh private directory to run a stage in; stale ones of dead processes are removed."""
        tmp_root = self.root / stage / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp(tmp_root)
        path = tmp_root / f"{fp}-{os.getpid()}-{next(_counter)}"
        path.mkdir()
        return path

    @staticmethod
    def _remove_stale_tmp(tmp_root: Path) -> None:
        for path in tmp_root.iterdir():
            try:
                pid = int(path.name.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)

    def publish(self, stage: str, fp: str, tmp_dir: Path, manifest: dict) -> Path:
        """Record outputs in the manifest, write it last, and rename `tmp_dir` into place atomically."""
        outputs = {}
        for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp_dir).as_posix()
            outputs[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = dict(manifest, outputs=outputs, stage=stage, fingerprint=fp)
        _write_json_durable(tmp_dir / MANIFEST, manifest)
        final = self.entry_dir(stage, fp)
        if final.exists():  # a corrupt leftover that lookup could not move: replace it
            shutil.rmtree(final)
        os.rename(tmp_dir, final)
        _fsync_dir(final.parent)
        return final

    def partial_dir(self, stage: str, fp: str) -> Path:
        """Return (creating) the resumable-state directory of a stage run."""
        path = self.root / stage / ".partial" / fp
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_partial(self, stage: str, fp: str) -> None:
        """Remove the resumable state of a stage run once its artifact is published."""
        shutil.rmtree(self.root / stage / ".partial" / fp, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, stage: str, fp: str):
        """Hold an exclusive inter-process lock on (stage, fp) for the duration of the block."""
        lock_dir = self.root / stage / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{fp}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def last_inputs(self, stage: str) -> dict | None:
        """Return the input document of the entry this stage used last, if any."""
        try:
            return json.loads((self.root / stage / "last.json").read_text())
        except (OSError, ValueError):
            return None

    def remember(self, stage: str, inputs: dict) -> None:
        """Record `inputs` as the stage's most recent input document."""
        path = self.root / stage / "last.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"last.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(inputs))
        os.replace(tmp, path)

    # -- item entries ----------------------------------------------------------------------
    def item_path(self, kind: str, key: str) -> Path:
        """Return where the content-addressed item `key` of `kind` lives (it may not exist yet)."""
        return self.root / "items" / kind / key[:2] / f"{key}.safetensors"

    def has_item(self, kind: str, key: str) -> bool:
        return self.item_path(kind, key).is_file()


def _write_json_durable(path: Path, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
