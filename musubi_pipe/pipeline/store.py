"""The artifact store: one folder per (stage, fingerprint), published atomically, never edited in place.

Layout under the cache root:

    <stage>/<fingerprint>/            published outputs + manifest.json (written last)
    <stage>/.last/<run name>.json     input document of the entry a run of that name used last (plan diffs)
    <stage>/.tmp/<fp>-<pid>-<n>/      where a running stage writes; renamed into place on success
    <stage>/.partial/<fingerprint>/   resumable state of a long stage (train checkpoints)
    <stage>/.locks/<fingerprint>.lock per-key lock shared by parallel jobs
    <stage>/.trash/                   entries found corrupt, moved aside rather than trusted
    items/<kind>/<ab>/<key>.safetensors   content-addressed item entries (latents, text embeddings)
    items/.trash/<kind>/              item entries found corrupt, moved aside

Every file is checked against the sha256 recorded when it was published (in the manifest for stage
outputs, in the file's own metadata for items; pipeline/items.py) before a run uses it, once per run:
`verify` is "digest" (the default) or "full" (the same here; `full` also re-hashes input files, see
runner.py). `verify="size"` only compares sizes, which misses same-size corruption. A manifest that
does not read, a missing output or a digest mismatch is a miss: the entry is moved aside and recomputed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path

from musubi_pipe.pipeline.fingerprint import sha256_file
from musubi_pipe.pipeline.items import item_problem, write_item

MANIFEST = "manifest.json"
VERIFY_MODES = ("digest", "full", "size")
_counter = itertools.count()
log = logging.getLogger("musubi_pipe")


class Store:
    """Stage artifacts and item entries under one cache root."""

    def __init__(self, root: str | os.PathLike, verify: str = "digest"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.verify = verify
        self._verified: dict[str, tuple] = {}  # path -> stat signature of a file hashed and found good this run
        self.moved_aside: list[str] = []  # what this run found corrupt, for its record

    def _hash_once(self, path: Path, check) -> str | None:
        """Run `check(path)` (a hash) unless this run already found the file, unchanged since, good."""
        st = path.stat()
        signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if self._verified.get(str(path)) == signature:
            return None
        problem = check(path)
        if problem is None:
            self._verified[str(path)] = signature
        return problem

    # -- stage artifacts -------------------------------------------------------------------
    def entry_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def lookup(self, stage: str, fp: str, verify: str | None = None) -> dict | None:
        """Return the manifest of a valid published entry, or None (a corrupt entry is moved aside)."""
        entry = self.entry_dir(stage, fp)
        if not entry.exists():
            return None
        problem = self._check_entry(entry, verify or self.verify)
        if problem is None:
            return json.loads((entry / MANIFEST).read_text())
        trash = self.root / stage / ".trash" / f"{fp}-{int(time.time())}-{os.getpid()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(entry, trash)
        self._report_aside(f"{stage}/{fp[:12]}", problem, trash)
        return None

    def _report_aside(self, what: str, problem: str, trash: Path) -> None:
        message = f"[store] {what} was invalid ({problem}); moved to {trash} and recomputing"
        self.moved_aside.append(message)
        log.warning(message)

    def _check_entry(self, entry: Path, verify: str) -> str | None:
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
        if verify == "size":
            return None
        for rel, info in outputs.items():
            def same(path, want=info["sha256"]):
                return None if sha256_file(path) == want else "differs from the sha256 recorded when it was published"

            problem = self._hash_once(entry / rel, same)
            if problem:
                return f"output {rel} {problem}"
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

    def last_inputs(self, stage: str, name: str | None = None) -> dict | None:
        """Return the input document of the entry this stage used last in a run named `name`, if any."""
        try:
            return json.loads(self._last_path(stage, name).read_text())
        except (OSError, ValueError):
            return None

    def remember(self, stage: str, inputs: dict, name: str | None = None) -> None:
        """Record `inputs` as the stage's most recent input document for runs named `name`."""
        path = self._last_path(stage, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(inputs))
        os.replace(tmp, path)

    def _last_path(self, stage: str, name: str | None) -> Path:
        """<stage>/.last/<run name>.json: plans compare a run with the last of the same name (recipe), not
        with whatever another recipe ran last."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or "_")).lstrip(".") or "_"
        return self.root / stage / ".last" / f"{safe}.json"

    # -- item entries ----------------------------------------------------------------------
    def item_path(self, kind: str, key: str) -> Path:
        """Return where the content-addressed item `key` of `kind` lives (it may not exist yet)."""
        return self.root / "items" / kind / key[:2] / f"{key}.safetensors"

    def has_item(self, kind: str, key: str) -> bool:
        """Whether item `key` is stored and (unless verify="size") its content matches its recorded digest.

        A corrupt entry is moved to items/.trash/ and reported, so the caller recomputes it.
        """
        path = self.item_path(kind, key)
        if not path.is_file():
            return False
        if self.verify == "size":
            return True
        problem = self._hash_once(path, item_problem)
        if problem is None:
            return True
        trash = self.root / "items" / ".trash" / kind / f"{key}-{int(time.time())}-{os.getpid()}.safetensors"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(path, trash)
        self._report_aside(f"{kind} item {key[:12]}", problem, trash)
        return False

    def save_item(self, kind: str, key: str, tensors: dict, metadata: dict | None = None) -> Path:
        """Publish item `key` atomically, with the digest of its content in its metadata; return its path."""
        path = self.item_path(kind, key)
        write_item(path, tensors, metadata)
        st = path.stat()
        self._verified[str(path)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        return path


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
