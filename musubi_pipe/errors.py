"""Errors users see: each names the file, line or config key at fault and how to fix it."""

import contextlib
import errno
import re


class UserError(Exception):
    """A problem with the user's input (config, files, dataset), reported without a traceback."""


class ConfigError(UserError):
    """One or more config problems, reported together.

    `problems` is a list of (key, message) pairs; str() lists them all, one per line.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"  {key}: {msg}" for key, msg in self.problems]
        super().__init__(f"{len(self.problems)} config problem(s):\n" + "\n".join(lines))


class MediaError(UserError):
    """A media or caption file that cannot be read; `path` names it."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class Terminated(BaseException):
    """The process got SIGTERM (e.g. from SLURM or `kill`): the run records itself as interrupted."""


_STORAGE_FIXES = {
    errno.ENOSPC: ("no space left on the device",
                   "free space there (python -m musubi_pipe.tools gc removes cache entries no recent run uses) or "
                   "move paths.cache / paths.runs to a disk with room, then rerun: finished stages are reused and "
                   "training continues from its last checkpoint"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota or move paths.cache / paths.runs elsewhere, "
                   "then rerun"),
    errno.EACCES: ("permission denied", "make that folder writable by this user, or point paths.root (or "
                   "paths.cache / paths.runs) at a folder you own"),
    errno.EPERM: ("operation not permitted", "make that folder writable by this user, or point paths.root "
                  "elsewhere"),
    errno.EROFS: ("read-only file system", "point paths.root (or paths.cache / paths.runs) at a writable disk"),
}


_WRAPPED_ERRNO = re.compile(r"\[Errno (\d+)\]|os error (\d+)|error code: (\d+)")


def storage_errno(err: BaseException) -> int | None:
    """The errno of a disk-full or permission error, also when a library wrapped it in its own exception
    (torch.save raises RuntimeError, safetensors SafetensorError, with the OS error only in the text)."""
    if isinstance(err, OSError) and err.errno in _STORAGE_FIXES:
        return err.errno
    if isinstance(err, UserError):
        return None
    found = _WRAPPED_ERRNO.search(str(err))
    code = int(next(g for g in found.groups() if g)) if found else None
    return code if code in _STORAGE_FIXES else None


def storage_message(err: BaseException, doing: str, fallback_path=None) -> str | None:
    """A user-facing message for a disk-full or permission error while `doing` something, else None."""
    code = storage_errno(err)
    if code is None:
        return None
    what, fix = _STORAGE_FIXES[code]
    path = getattr(err, "filename", None) or fallback_path or "?"
    return f"{doing}: {what} writing {path}. Fix: {fix}."


@contextlib.contextmanager
def storage_errors(doing: str, path=None):
    """Turn disk-full and permission errors raised inside the block into a UserError naming path and fix."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - libraries wrap OS errors in their own types; others re-raise
        message = storage_message(err, doing, path)
        if message is None:
            raise
        raise UserError(message) from err
