"""Progress bars that read well on a terminal and in a log file.

On a terminal this is tqdm as usual. When stderr is redirected (a log file, SLURM's output), tqdm would
rewrite one line with carriage returns many times a second, leaving one enormous line; here each
update is a line of its own, at most one every `REDIRECTED_INTERVAL` seconds (and the last one).
"""

from __future__ import annotations

import sys

REDIRECTED_INTERVAL = 10.0  # seconds between progress lines when the output is not a terminal


class _Lines:
    """A stream for tqdm that turns each carriage-return redraw into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs); with stderr redirected, one line per REDIRECTED_INTERVAL seconds."""
    from tqdm import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", REDIRECTED_INTERVAL)
        kwargs.setdefault("maxinterval", REDIRECTED_INTERVAL * 2)
        kwargs.setdefault("ascii", True)
        kwargs["dynamic_ncols"] = False
        stream = _Lines(stream)
    return tqdm(iterable, file=stream, **kwargs)
