"""Memory savers for the DiT, applied in one place for training, sampling and generate (the memory group).

    dit = load_dit(family, model_cfg, cfg["memory"], "cuda", torch.bfloat16, training=True)
    move_dit(dit, "cpu")          # park it (an inactive Wan2.2 expert), block swap included

The order matters and is the whole point of this module: the DiT is read into CPU memory when it will
not fit the GPU in its file's precision (fp8, block swap), LoRAs to merge are merged while the weights
are still exact (`before_quantize`), Linear weights become fp8 one layer at a time on the GPU, then the
blocks are placed (all on the GPU, or the block swap window), checkpointing and the attention backend
are set, and the blocks are compiled last, so what gets compiled is what runs.
"""

from __future__ import annotations

import logging

from musubi_pipe.errors import UserError
from musubi_pipe.memory.settings import attention_backend, blocks_to_swap

log = logging.getLogger("musubi_pipe")


def load_dit(family, model_cfg: dict, memory: dict, device, dtype, expert: str = "", *, training: bool = False,
             park: bool = False, before_quantize=None):
    """Load one expert's frozen DiT with the memory settings applied (prepare_dit); return it.

    `before_quantize(dit)` runs on the weights as loaded, before fp8 (e.g. merging LoRAs)."""
    staged = park or blocks_to_swap(memory, family, model_cfg) or memory.get("fp8_base")
    dit = family.load_dit(model_cfg, "cpu" if staged else device, dtype, expert=expert)
    if before_quantize is not None:
        before_quantize(dit)
    return prepare_dit(family, model_cfg, dit, memory, device, training=training, park=park)


def prepare_dit(family, model_cfg: dict, dit, memory: dict, device, *, training: bool = False, park: bool = False):
    """Apply the memory settings to a loaded DiT (on the CPU when fp8 or block swap is on); return it.

    `training` enables gradient checkpointing (memory.gradient_checkpointing) and picks memory.attention
    (else memory.sampling_attention); `park` leaves it in CPU memory (move_dit brings it over)."""
    from musubi_pipe.memory.attention import split_attention, use_backend

    if memory.get("fp8_base"):
        _to_fp8(family, dit, bool(memory.get("fp8_scaled")), device)
    use_backend(dit, attention_backend(memory, sampling=not training))
    if memory.get("split_attn"):
        split_attention(dit)
    swap = None
    swap_count = blocks_to_swap(memory, family, model_cfg)
    if swap_count:
        from musubi_pipe.memory.block_swap import BlockSwap

        try:
            swap = BlockSwap(family.blocks(dit), swap_count, device, pinned=bool(memory.get("pin_memory", True)))
        except ValueError as e:  # a DiT with fewer blocks than its task says (validation counted the task's)
            raise UserError(str(e)) from e
        swap.attach(dit)
        dit._block_swap = swap  # move_dit finds it here
    if not park:
        move_dit(dit, device)
    if training and memory.get("gradient_checkpointing"):
        from musubi_pipe.memory.checkpointing import checkpoint_function

        offload = bool(memory.get("gradient_checkpointing_cpu_offload"))
        dit.enable_gradient_checkpointing(checkpoint_function(cpu_offload=offload, swap=swap))
    if memory.get("compile"):
        compile_blocks(family.blocks(dit), memory)
    return dit


def move_dit(dit, device) -> None:
    """Move a DiT to `device` ("cpu" parks it); with block swap only its GPU window and non-block parts go
    to the GPU, the swapped blocks stay in CPU memory."""
    swap = getattr(dit, "_block_swap", None)
    if swap is None:
        dit.to(device)
    elif str(device) == "cpu":
        swap.offload()
        swap.place_rest(dit, "cpu")
    else:
        swap.place_rest(dit)
        swap.prepare()


def _to_fp8(family, dit, scaled: bool, device) -> None:
    from musubi_pipe.memory.fp8 import fp8_bytes, quantize_linears

    include, exclude = family.fp8_layers
    count = quantize_linears(dit, include=include, exclude=exclude, scaled=scaled, work_device=device)
    log.info("memory.fp8_base: %d Linear layers of the DiT stored in float8_e4m3fn%s (%.2f GiB)", count,
             " with block-wise scales (memory.fp8_scaled)" if scaled else "", fp8_bytes(dit) / 2**30)


def quantize_text_encoder(model, device, exclude=()) -> None:
    """memory.fp8_t5 / fp8_llm: a text encoder's Linear weights in fp8 (plain cast, as musubi-tuner), quantized
    on `device` one layer at a time while the model sits in CPU memory."""
    from musubi_pipe.memory.fp8 import quantize_linears

    count = quantize_linears(model, exclude=exclude, scaled=False, work_device=device)
    log.info("memory: %d Linear layers of the text encoder stored in float8_e4m3fn", count)


def compile_blocks(blocks, memory: dict) -> None:
    """torch.compile each block's forward (memory.compile): the repeated blocks are where the time goes, and
    compiling them one by one keeps the hooks of block swap and LoRA outside the compiled graphs."""
    import torch

    options = {"backend": memory.get("compile_backend") or "inductor", "dynamic": memory.get("compile_dynamic")}
    if options["backend"] == "inductor":
        options["mode"] = memory.get("compile_mode") or "default"
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    log.info("memory.compile: %d blocks compiled with %s", len(blocks), options)
