"""Publishing files: temporary files beside their target, with the permissions a plain open() gives.

`tempfile.mkstemp` creates files readable by their owner only (0600). A LoRA, sample or checkpoint
published from such a file could not be read by a ComfyUI service running as another user, so every
temporary file that becomes a published one is given 0666 minus the process umask, like any tool's output.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (reading it means setting it; it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: str | os.PathLike) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder (so a rename onto `path` is atomic), with the
    permissions open() would give it under the current umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (where the platform can open a folder; the file is complete either way)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed onto it: readers see the old or the new file."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
