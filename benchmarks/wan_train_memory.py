"""Peak GPU memory and seconds per step of LoRA training steps on real-shaped Wan DiTs (random bf16 weights).

    python benchmarks/wan_train_memory.py                       # the recipes' shapes (needs a CUDA GPU)
    python benchmarks/wan_train_memory.py t2v-1.3B 480 832 33   # one task at one size
    python benchmarks/wan_train_memory.py --quick               # tiny tasks on the CPU (tests/test_benchmarks.py)

Each case builds the task's WanTransformer3DModel with random bf16 weights on the GPU, attaches a
rank-32 LoRA to the default targets, enables gradient checkpointing and runs 3 training steps
(bf16 autocast, AdamW on the LoRA) through the same Family.predict the trainer uses, with image
conditioning for I2V tasks. It prints the peak allocated memory and the mean time of steps 2-3.
Wan2.2 A14B experts have the 14B shape; with memory.offload_inactive_dit only one is on the GPU,
so the 14B rows are what those recipes need. --quick runs the same code on the tiny T2V and I2V twins
on the CPU (no peak memory there), so the script cannot rot without a GPU.
"""

from __future__ import annotations

import sys
import time

import torch

from musubi_pipe.models.wan.family import FAMILY
from musubi_pipe.models.wan.tasks import get_task
from musubi_pipe.network.lora import LoRANetwork

CASES = [("t2v-1.3B", 480, 832, 33), ("t2v-14B", 480, 832, 81), ("i2v-14B", 480, 832, 81), ("ti2v-5B", 704, 1280, 49)]
QUICK_CASES = [("tiny-t2v", 64, 64, 5), ("tiny-i2v", 64, 64, 5)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(task, device: str):
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel(**task.dit_config)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(torch.bfloat16).requires_grad_(False)
    model._wan_task = task
    model.enable_gradient_checkpointing()
    return model


def measure(name: str, height: int, width: int, frames: int, device: str = "cuda") -> tuple[float | None, float]:
    """(peak GiB allocated, None off CUDA; mean seconds of steps 2-3)."""
    task = get_task(name)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dit = build(task, device)
    network = LoRANetwork(FAMILY.lora_targets(dit), 32, 32.0)
    network.to(device, torch.float32)
    network.apply_to()
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=1e-4)
    st, sh, sw = task.vae_stride
    shape = (1, task.latent_channels, (frames - 1) // st + 1, height // sh, width // sw)
    text = [{"embedding": torch.randn(task.text_len, task.dit_config["text_dim"], device=device, dtype=torch.bfloat16)}]
    cond = {}
    if task.conditioning == "image":
        cond["latents_image"] = torch.randn(1, 20, *shape[2:], device=device)
        if task.clip_config:
            cond["clip"] = torch.randn(1, 257, task.clip_config["hidden_size"], device=device)
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        noisy = torch.randn(shape, device=device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            pred = FAMILY.predict(dit, noisy, torch.tensor([500.0], device=device), text, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    network.restore()
    del dit, network, optimizer
    return peak, sum(times[1:]) / 2


def main(argv: list[str]) -> None:
    if argv[:1] == ["--quick"]:
        cases, device = QUICK_CASES, "cpu"
        print(f"CPU (quick smoke run), torch {torch.__version__}")
    else:
        cases = [(argv[0], int(argv[1]), int(argv[2]), int(argv[3]))] if argv else CASES
        device = "cuda"
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| task | size | frames | peak GiB | s/step |")
    print("|---|---|---|---|---|")
    for name, height, width, frames in cases:
        peak, seconds = measure(name, height, width, frames, device)
        shown = "-" if peak is None else f"{peak:.1f}"
        print(f"| {name} | {height}x{width} | {frames} | {shown} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
