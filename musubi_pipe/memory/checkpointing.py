"""Gradient checkpointing for diffusers DiT blocks, optionally with the saved block inputs offloaded to CPU.

`checkpoint_function(cpu_offload=..., swap=...)` returns the `fn(block, *args)` that diffusers'
`enable_gradient_checkpointing(gradient_checkpointing_func=fn)` installs: each block's activations are dropped
after its forward and recomputed in backward. It tells a `block_swap.BlockSwap` which call is which (first run or
recomputation), so that the swapper can follow the backward order. With `cpu_offload`
(`memory.gradient_checkpointing_cpu_offload`, musubi-tuner's --gradient_checkpointing_cpu_offload) the only
tensors a block keeps for backward, its inputs, wait in CPU memory. Both variants restore the RNG state for the
recomputation, so dropout (LoRA dropouts) draws the same masks twice.

    fn = checkpoint_function(cpu_offload=True, swap=swap)
    dit.enable_gradient_checkpointing(gradient_checkpointing_func=fn)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from musubi_pipe.memory.block_swap import BlockSwap


def checkpoint_function(*, cpu_offload: bool = False, swap: BlockSwap | None = None) -> Callable[..., Any]:
    """Return `fn(block, *args)` -> block(*args)'s output, computed under gradient checkpointing.

    Without cpu_offload: torch's non-reentrant checkpoint (what diffusers uses). With it: the reentrant
    checkpoint inside `torch.autograd.graph.save_on_cpu`, which moves the inputs it saves (pinned memory for
    CUDA tensors); backward must then go through `loss.backward()` (the reentrant variant does not support
    `torch.autograd.grad`). `swap`, when given, must be attached to the model that calls `fn`.
    """

    def checkpointed(block: nn.Module, *args: Any) -> Any:
        run = _runner(block, swap)
        if not cpu_offload:
            return checkpoint(run, *args, use_reentrant=False)
        args = _with_grad_input(args)
        pin = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        # Only what CheckpointFunction saves passes through these hooks: its forward runs under no_grad.
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return checkpoint(run, *args, use_reentrant=True)

    return checkpointed


def _runner(block: nn.Module, swap: BlockSwap | None) -> Callable[..., Any]:
    """`block(*args)` for one checkpointed call: its first run is the forward, any later one the recomputation."""
    runs = 0

    def run(*args: Any) -> Any:
        nonlocal runs
        runs += 1
        if swap is None:
            return block(*args)
        with swap.checkpointed(recompute=runs > 1):
            return block(*args)

    return run


def _with_grad_input(args: tuple) -> tuple:
    """`args`, with the first floating tensor replaced by a detached copy that requires grad when none does.

    HAZARD: the reentrant checkpoint runs the block under no_grad and its output requires grad only if an input
    does. The first block's inputs come from frozen embeddings, so its output would not require grad, backward
    would never reach it, and the LoRA weights inside would silently get no gradient. The stand-in leaf only
    makes the block's output require grad; its own gradient is computed and dropped.
    """
    if not torch.is_grad_enabled():
        return args
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not floats or any(args[i].requires_grad for i in floats):
        return args
    first = floats[0]
    return args[:first] + (args[first].detach().requires_grad_(),) + args[first + 1:]
