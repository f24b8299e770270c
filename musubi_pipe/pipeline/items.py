"""Item entry files: safetensors that carry the digest of their own content.

An item entry (a latent, a text embedding) is published with `musubi_pipe.sha256` in its metadata:
the sha256 of the file's header (as canonical JSON, without that one key) followed by its tensor
bytes. `item_problem(path)` recomputes it, so a flipped byte anywhere (header or data, same size or
not) is found before the entry is used. No torch is needed to check a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from musubi_pipe.pipeline.fingerprint import canonical_json

DIGEST_KEY = "musubi_pipe.sha256"
_CHUNK = 8 * 1024 * 1024


def _header_digest_input(header: dict) -> bytes:
    """The header as it enters the digest: canonical JSON without the digest (and without empty metadata)."""
    header = dict(header)
    metadata = dict(header.pop("__metadata__", None) or {})
    metadata.pop(DIGEST_KEY, None)
    if metadata:
        header["__metadata__"] = metadata
    return canonical_json(header).encode("utf-8")


def _content_digest(header: dict, data_chunks) -> str:
    h = hashlib.sha256(_header_digest_input(header))
    for chunk in data_chunks:
        h.update(chunk)
    return h.hexdigest()


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_item(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> str:
    """Write an item entry atomically (temp file, fsync, rename) with its content digest; return the digest.

    A killed run leaves no partial entry; the digest lets every later run check what it reads.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    header, data = _split(save(tensors, metadata=metadata or None))
    digest = _content_digest(header, [data])
    blob = save(tensors, metadata=dict(metadata, **{DIGEST_KEY: digest}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest


def item_problem(path: str | os.PathLike) -> str | None:
    """None when the entry's content matches the digest recorded when it was written, else what is wrong."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return "corrupt safetensors header"
            raw = f.read(n)
            try:
                header = json.loads(raw)
            except ValueError:
                return "corrupt safetensors header"
            if len(raw) < n or not isinstance(header, dict):
                return "corrupt safetensors header"
            recorded = (header.get("__metadata__") or {}).get(DIGEST_KEY)
            if not recorded:
                return "no recorded digest (written by an older musubi_pipe)"
            actual = _content_digest(header, iter(lambda: f.read(_CHUNK), b""))
    except OSError as err:
        return f"unreadable ({err.strerror})"
    return None if actual == recorded else "content does not match the digest recorded when it was written"
