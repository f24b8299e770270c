"""Block swap (`memory.blocks_to_swap=N`): keep only B - N of a frozen DiT's B transformer blocks on the device.

musubi-tuner's rotating window. Every block tensor (parameter and buffer) gets a CPU master copy once, at
construction (pinned for CUDA). A block is fetched by copying its masters to the device on a side stream and
pointing each tensor's `.data` at the copies just before the block runs; it is evicted by pointing `.data` back
at the masters (the base is frozen, so nothing is ever copied back). `.data` swaps keep Parameter identity, so
optimizers, LoRA hooks and other references stay valid. Hooks drive the window:

- inference (the model is called with grad disabled): after block i runs, evict i and fetch (i + W) mod B;
- training forward (inside `checkpointing.checkpoint_function`): after block i < N runs, evict i, fetch i + W;
- backward (gradient checkpointing recomputes blocks B-1..0): when block j's recomputation starts, block j+1's
  backward is over: if j+1 >= W, evict j+1 and fetch (j+1) - W.

Each pass leaves (or, in training, the backward leaves) the starting placement: blocks 0..W-1 on the device.
Non-block parts (embeddings, head, norms) always live on the device: `place_rest(model)`.

    swap = BlockSwap(family.blocks(dit), 20, "cuda")
    swap.place_rest(dit)
    swap.attach(dit)
    dit.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(swap=swap))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import chain
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger("musubi_pipe")

NEEDS_CHECKPOINTING = (
    "block swap (memory.blocks_to_swap) in training needs gradient checkpointing (memory.gradient_checkpointing=true, "
    "through checkpointing.checkpoint_function(swap=...)): without it autograd keeps every block's weights alive "
    "until backward, so swapping would save nothing (and fp8 layers save their weight Parameter, which eviction "
    "points at CPU memory)"
)


class Copier(Protocol):
    """Moves one block's master tensors to the device: `start` begins the copies, `finish` hands them over."""

    def start(self, masters: list[torch.Tensor]) -> Any: ...

    def finish(self, handle: Any) -> list[torch.Tensor]: ...


class SyncCopier:
    """Copies on the current stream, at once; always real copies (a CPU "device copy" is a clone of the master)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def start(self, masters: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return the device copies of `masters`."""
        return [m.to(self.device, copy=True) for m in masters]

    def finish(self, handle: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return the copies `start` made."""
        return handle


class CudaCopier:
    """Copies on a side CUDA stream, so that fetching the next block overlaps the current block's compute."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def start(self, masters: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Enqueue the host-to-device copies on the side stream; return (copies, event recorded after them).

        Asynchronous only for pinned masters (others copy synchronously, still correct). The copies are allocated
        on the side stream: `finish` must record them on the compute stream before anything reads them there.
        """
        with torch.cuda.stream(self.stream):
            copies = [m.to(self.device, non_blocking=True) for m in masters]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def finish(self, handle: tuple[list[torch.Tensor], torch.cuda.Event]) -> list[torch.Tensor]:
        """Make the compute (current) stream wait for the copies; return them, safe to use on that stream."""
        copies, event = handle
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for copy in copies:
            # HAZARD: the allocator ties a block to the stream that allocated it (the side stream). Without this,
            # freeing the copy at eviction would let the side stream reuse its memory for the next fetch while
            # kernels queued on the compute stream still read these weights.
            copy.record_stream(compute)
        return copies


def default_copier(device: torch.device | str) -> Copier:
    """Return a CudaCopier for a CUDA device, else a SyncCopier."""
    device = torch.device(device)
    return CudaCopier(device) if device.type == "cuda" else SyncCopier(device)


class BlockSwap:
    """Keeps `len(blocks) - blocks_to_swap` of `blocks` on `device`, swapping the others in from CPU masters.

    Raises ValueError unless 0 < blocks_to_swap < len(blocks), and when a block parameter requires grad: the
    base must be frozen (requires_grad_(False) first), since eviction drops the device copies and never copies
    anything back; for the same reason the block tensors must not be changed in place while swapped.
    """

    def __init__(self, blocks: Sequence[nn.Module], blocks_to_swap: int, device: torch.device | str, *,
                 pinned: bool = True, copier: Copier | None = None):
        self.blocks = list(blocks)
        count = len(self.blocks)
        if not 0 < blocks_to_swap < count:
            raise ValueError(f"memory.blocks_to_swap must be between 1 and {count - 1} for this model "
                             f"({count} blocks), got {blocks_to_swap}")
        trainable = next((n for b in self.blocks for n, p in b.named_parameters() if p.requires_grad), None)
        if trainable is not None:
            raise ValueError(f"block swap needs a frozen base model, but block parameter {trainable!r} requires grad")
        self.device = torch.device(device)
        self.swapped = blocks_to_swap
        self.window = count - blocks_to_swap
        self.copier = copier if copier is not None else default_copier(self.device)
        self.pinned = pinned and self.device.type == "cuda"
        self._tensors = [_block_tensors(block) for block in self.blocks]
        self._masters = [[_to_master(t, self.pinned) for t in tensors] for tensors in self._tensors]
        self._resident: set[int] = set()  # blocks whose tensors point at device copies
        self._pending: dict[int, Any] = {}  # block -> copier handle of a fetch in flight
        self._training = False  # set by the model pre-hook: grad enabled when the pass began
        self._call: str | None = None  # "forward" / "recompute" inside checkpoint_function, else None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    # -- hooks -------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register the pass hook on `model` and the pre/post hooks on every block (logs the memory split)."""
        self.detach()
        self._hooks.append(model.register_forward_pre_hook(self._begin_pass))
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(partial(self._before_block, index)))
            self._hooks.append(block.register_forward_hook(partial(self._after_block, index)))
        sizes = [sum(m.numel() * m.element_size() for m in masters) for masters in self._masters]
        log.info("block swap: %d of %d blocks swapped; %s of block weights in CPU memory%s, at most %s on %s "
                 "(%d blocks at a time)", self.swapped, len(self.blocks), _size(sum(sizes)),
                 " (pinned)" if self.pinned else "", _size(sum(sorted(sizes)[-(self.window + 1):])), self.device,
                 self.window + 1)

    def detach(self) -> None:
        """Remove every hook `attach` registered (the blocks stay where they are)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextlib.contextmanager
    def checkpointed(self, recompute: bool) -> Iterator[None]:
        """Mark the block call inside as made by our checkpoint function: its first run in the training forward
        (recompute=False) or its recomputation in backward (recompute=True)."""
        previous, self._call = self._call, "recompute" if recompute else "forward"
        try:
            yield
        finally:
            # also on early stop: torch's non-reentrant checkpoint aborts a recomputation by raising once it has
            # every tensor it needs, so the block's post-hook does not run then.
            self._call = previous

    def _begin_pass(self, model: nn.Module, args: tuple) -> None:
        self._training = torch.is_grad_enabled()
        self.prepare()

    def _before_block(self, index: int, block: nn.Module, args: tuple) -> None:
        if self._call is None and self._training:
            raise RuntimeError(NEEDS_CHECKPOINTING)
        done = index + 1  # in backward: the block whose backward just finished
        # Safe to evict: autograd runs every node of block j+1 before any of block j (they become ready first and
        # have higher sequence numbers), and block j is recomputed only when its first saved tensor is unpacked,
        # so nothing reads block j+1's weights any more (a saved weight Parameter of an fp8 layer included).
        if self._call == "recompute" and self.window <= done < len(self.blocks):
            self._evict(done)
            self._fetch(done - self.window)
        self.ensure(index)

    def _after_block(self, index: int, block: nn.Module, args: tuple, output: Any) -> None:
        # Evicting right after the block's kernels were *queued* is safe: the copies were recorded on the compute
        # stream, so the allocator reuses their memory only once those kernels are done.
        if self._call == "forward" and index < self.swapped:
            self._evict(index)
            self._fetch(index + self.window)
        elif self._call is None:
            self._evict(index)
            self._fetch((index + self.window) % len(self.blocks))

    # -- placement ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Restore the starting placement: blocks 0..W-1 on the device (or in flight), the rest on CPU."""
        for index in range(self.window, len(self.blocks)):
            # Unconditional: pointing at the masters is free, and it undoes a `model.to(device)` made after
            # construction, which would otherwise keep every block on the device.
            self._evict(index)
        for index in range(self.window):
            self._fetch(index)

    def offload(self) -> None:
        """Point every block at its CPU masters (frees the device copies), e.g. for an inactive expert."""
        for index in range(len(self.blocks)):
            self._evict(index)

    def ensure(self, index: int) -> None:
        """Make block `index` usable on the compute stream now, fetching it if it is neither there nor in flight."""
        if index in self._resident:
            return
        self._fetch(index)
        copies = self.copier.finish(self._pending.pop(index))
        for tensor, copy in zip(self._tensors[index], copies):
            tensor.data = copy
        self._resident.add(index)

    def place_rest(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        """Move every parameter and buffer of `model` that belongs to no block to `device` (default: the swap's
        device; "cpu" parks them), in place: `.data` moves, so Parameter identity is kept."""
        device = self.device if device is None else torch.device(device)
        in_blocks = {id(t) for tensors in self._tensors for t in tensors}
        for tensor in chain(model.parameters(), model.buffers()):
            if id(tensor) not in in_blocks and tensor.device != device:
                tensor.data = tensor.data.to(device)

    def placement(self) -> list[str]:
        """Return each block's state: "device", "fetching" (copy in flight) or "cpu"."""
        return ["device" if i in self._resident else "fetching" if i in self._pending else "cpu"
                for i in range(len(self.blocks))]

    def _fetch(self, index: int) -> None:
        if index not in self._resident and index not in self._pending:
            self._pending[index] = self.copier.start(self._masters[index])

    def _evict(self, index: int) -> None:
        if index in self._pending:
            # completed and dropped, so that every start has its finish (the copy is never read)
            self.copier.finish(self._pending.pop(index))
        for tensor, master in zip(self._tensors[index], self._masters[index]):
            tensor.data = master
        self._resident.discard(index)


def _block_tensors(block: nn.Module) -> list[torch.Tensor]:
    """The block's parameters and buffers, each once."""
    return list({id(t): t for t in chain(block.parameters(), block.buffers())}.values())


def _to_master(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """Make the CPU master of `tensor` and point the tensor at it; return the master.

    The master is the tensor's own storage when that already is in (pinned, if asked) CPU memory, else a copy.
    Pointing at it at once frees the source (device memory, or pageable memory replaced by pinned) before the
    next master is made, so building the masters of a large model needs one tensor of extra memory, not a model.
    """
    data = tensor.detach()
    if pin and not (data.is_cpu and data.is_pinned()):
        data = torch.empty_like(data, device="cpu", pin_memory=True).copy_(data)
    elif not data.is_cpu:
        data = data.to("cpu")
    tensor.data = data
    return data


def _size(count: int) -> str:
    """`count` bytes in MiB or GiB, for the log."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
