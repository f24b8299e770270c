"""Several processes, one run: which process this is, and the few collective operations the pipeline needs.

`accelerate launch --num_processes N -m musubi_pipe ...` (or torchrun) starts N copies of the same
run. Every process plans the same stages; a stage that must run is run by all of them together:
cache stages shard their items across processes, training averages gradients across processes
(each process trains on different batches), and only the main process (rank 0) writes the
artifact and publishes it to the store while the others wait at a barrier. A single process (the
usual case) never imports torch here.

The process group is set up through accelerate's `PartialState` (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Dist:
    """This process's place among the run's processes; collective calls are no-ops for one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (any picklable value)."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj if self.main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def mean_(self, tensors) -> None:
        """Average tensors in place across processes (gradients after a step's backward passes)."""
        if not self.active:
            return
        import torch
        import torch.distributed as td

        tensors = list(tensors)
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def shard(self, items: list) -> list:
        """This process's share of `items` (every world-th item from its rank)."""
        return items[self.rank :: self.world]


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch --use_fsdp`, or ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def shard_frozen(model, blocks, dist: Dist) -> None:
    """Shard a frozen model's weights across the processes with FSDP2 (`fully_shard`): each block and
    then the rest. Every process then holds 1/N of the weights; a block's are gathered just for its
    forward and backward. LoRA modules hooked into the model's Linear layers stay whole, outside it.
    `FSDP_OFFLOAD_PARAMS=true` (accelerate's fsdp_offload_params) keeps the shards in CPU memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true", "yes")
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, offload_policy=policy)
    fully_shard(model, offload_policy=policy)


@lru_cache(maxsize=1)
def current() -> Dist:
    """The Dist of this process: from the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    from accelerate import PartialState

    # initialises the process group: nccl on GPUs; gloo on CPUs (accelerate needs cpu=True to use it)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE={world} but accelerate set up {state.num_processes} process(es)")
    return Dist(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index)
