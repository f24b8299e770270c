"""The stage list, in execution order. A new stage is one module here and one line below.

Stage modules import torch and friends only inside `run`, so building the list stays cheap.
"""

from __future__ import annotations

from musubi_pipe.config.schema import DATASET_STAGES, STAGE_NAMES  # noqa: F401 - the names config/ validates


def all_stages():
    """Return every Stage in execution order."""
    from musubi_pipe.stages import cache_latents, cache_text, ema, generate, merge, sample, train

    return [cache_latents.STAGE, cache_text.STAGE, train.STAGE, sample.STAGE, ema.STAGE, merge.STAGE, generate.STAGE]
