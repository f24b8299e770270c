"""Shared fixtures: the tiny Wan model built once per session, and in-process demo runs."""

import itertools
import logging
import os
import warnings
from pathlib import Path

import pytest

_run_counter = itertools.count()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet fork warnings in subprocess tests


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """One tiny-model folder for the whole session (built on first use by the first run)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def demo(tmp_path, models_dir):
    """Return run(*overrides) -> run record, for the demo recipe in a private outputs root.

    Steps are cut down so a whole run takes a few seconds on 2 CPU cores.
    """
    from musubi_pipe.config import compose
    from musubi_pipe.runner import run

    base = [
        "+recipe=demo",
        f"paths.root={tmp_path}",
        f"paths.models={models_dir}",
        "training.max_train_steps=6",
        "training.save_every_n_steps=3",
        "sampling.steps=3",
        "runtime.progress=false",
    ]

    def run_demo(*overrides):
        cfg = compose(base + list(overrides))
        return run(cfg, tmp_path / "runs" / f"run{next(_run_counter)}", overrides=base + list(overrides))

    run_demo.root = tmp_path
    return run_demo


def stage(record: dict, name: str) -> dict:
    """Return the run record of stage `name`."""
    return next(s for s in record["stages"] if s["name"] == name)



def capture_diffusers_messages(action) -> list[str]:
    """Run `action()`; return what the `diffusers` logger said at WARNING and up, plus Python warnings
    (PEFT reports adapter/state-dict inconsistencies as warnings)."""
    import diffusers

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    old_level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()
    diffusers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action()
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers.utils.logging.set_verbosity(old_level)
    return [r.getMessage() for r in records] + [str(w.message) for w in caught]
