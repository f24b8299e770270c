"""Attention for a loaded diffusers DiT: the backend (memory.attention) and split attention (memory.split_attn).

    use_backend(dit, "flash")     # through diffusers' attention dispatcher (Wan, HunyuanVideo processors use it)
    split_attention(dit)          # each sample of a batch attends alone: a B-times smaller attention workspace

Backends are diffusers' (`ModelMixin.set_attention_backend`); the names users give are musubi-tuner's
(memory.settings.ATTENTION_BACKENDS maps them). Whether a backend's package is installed is checked at
validation, before anything loads.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from musubi_pipe.memory.settings import ATTENTION_BACKENDS

log = logging.getLogger("musubi_pipe")

# the processor arguments that carry one row per sample; rotary embeddings are shared by the batch
_PER_SAMPLE = ("hidden_states", "encoder_hidden_states", "attention_mask")


def use_backend(dit, name: str) -> None:
    """Route the DiT's attention through backend `name` ("sdpa", "flash", "flash3", "sage", "xformers")."""
    backend = ATTENTION_BACKENDS[name][0]
    if backend == "native" and not _has_backend(dit):
        return  # sdpa is what every processor does without a backend: nothing to set
    # diffusers logs a warning that attention backends are experimental on every call: not news to users here
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        dit.set_attention_backend(backend)
    finally:
        logger.setLevel(level)
    log.info("memory.attention=%s: attention through diffusers' %s backend", name, backend)


def _has_backend(dit) -> bool:
    return any(getattr(getattr(m, "processor", None), "_attention_backend", None) is not None for m in dit.modules())


def split_attention(dit) -> int:
    """Make every attention processor of `dit` run one sample at a time; return how many were changed.

    Equal to the batched result (attention never mixes samples); only the peak of the attention
    workspace shrinks, by the batch size. musubi-tuner's --split_attn."""
    changed = 0
    for module in dit.modules():
        processor = getattr(module, "processor", None)
        if processor is None or getattr(processor, "_splits_batch", False):
            continue
        # a subclass made per processor class: attention modules read the processor's __call__
        # signature to decide which keyword arguments to pass, so it must stay the original's
        processor.__class__ = _splitting(type(processor))
        changed += 1
    return changed


@functools.cache
def _splitting(cls: type) -> type:
    signature = inspect.signature(cls.__call__)

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        hidden = bound.arguments["hidden_states"]
        batch = hidden.shape[0]
        if batch == 1:
            return cls.__call__(self, *args, **kwargs)
        outputs = []
        for b in range(batch):
            one = signature.bind(self, *args, **kwargs)
            for name in _PER_SAMPLE:
                value = one.arguments.get(name)
                if isinstance(value, torch.Tensor) and value.shape[0] == batch:
                    one.arguments[name] = value[b : b + 1]
            outputs.append(cls.__call__(*one.args, **one.kwargs))
        if isinstance(outputs[0], tuple):  # dual-stream attention returns (image, text) states
            return tuple(torch.cat(parts) if parts[0] is not None else None for parts in zip(*outputs))
        return torch.cat(outputs)

    __call__.__signature__ = signature
    return type(f"Split{cls.__name__}", (cls,), {"__call__": __call__, "_splits_batch": True})
