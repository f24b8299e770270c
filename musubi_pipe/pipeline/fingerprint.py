"""Fingerprints: sha256 of a canonical JSON input document, and remembered file digests.

A stage's fingerprint is `fingerprint(doc)` where `doc` holds the stage name and version, the
resolved values of its declared config keys, its upstream fingerprints and the content digests of
its input files. File digests are remembered by (path, size, mtime_ns, inode) in one JSON file under
the cache root, so a 30 GB checkpoint is hashed once per change, not once per run.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def canonical_json(doc) -> str:
    """Return `doc` as canonical JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(doc) -> str:
    """Return the sha256 hex digest of the canonical JSON of `doc`."""
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Return the sha256 hex digest of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class DigestCache:
    """Content digests of files, remembered by (path, size, mtime_ns, inode).

    `digest(path)` hashes a file only when its stat signature changed since it was last hashed.
    `save()` writes the table atomically; a lost update only costs one re-hash later.
    """

    def __init__(self, table_path: str | os.PathLike, trust_stat: bool = True):
        self.table_path = Path(table_path)
        self.trust_stat = trust_stat  # False (pipeline.verify=full): hash every file once, whatever the table says
        self._lock = threading.Lock()
        self._dirty = False
        self.hashed = 0  # files actually read this session (tests assert warm runs read none)
        self._fresh: set[str] = set()  # hashed by this instance
        try:
            self._table = json.loads(self.table_path.read_text())
        except (OSError, ValueError):
            self._table = {}

    def digest(self, path: str | os.PathLike) -> str:
        """Return the sha256 of `path`, from the table when its stat signature is unchanged."""
        path = os.path.abspath(path)
        st = os.stat(path)
        signature = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            known = self._table.get(path)
            if known and known["stat"] == signature and (self.trust_stat or path in self._fresh):
                return known["sha256"]
        value = sha256_file(path)
        with self._lock:
            self._fresh.add(path)
            self._table[path] = {"stat": signature, "sha256": value}
            self._dirty = True
            self.hashed += 1
        return value

    def save(self) -> None:
        """Write the table atomically if anything changed."""
        with self._lock:
            if not self._dirty:
                return
            self.table_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.table_path.with_name(f"{self.table_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._table))
            os.replace(tmp, self.table_path)
            self._dirty = False


def diff_documents(old, new, prefix: str = "") -> list[str]:
    """Return human-readable differences between two input documents (`key old -> new`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                changes.append(f"{sub} added ({_short(new[key])})")
            elif key not in new:
                changes.append(f"{sub} removed")
            else:
                changes.extend(diff_documents(old[key], new[key], sub))
        return changes
    if old != new:
        return [f"{prefix} {_short(old)} -> {_short(new)}"]
    return []


def _short(value) -> str:
    text = canonical_json(value) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return text if len(text) <= 60 else text[:57] + "..."
