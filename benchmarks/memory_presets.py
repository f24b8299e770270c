"""Peak GPU memory and seconds per LoRA training step of Wan2.1 1.3B- and 14B-shaped DiTs under each memory preset.

    python benchmarks/memory_presets.py                       # docs/memory.md's table (CUDA GPU, 64 GB+ of RAM)
    python benchmarks/memory_presets.py t2v-14B 81 24gb       # one case
    python benchmarks/memory_presets.py --tiny                # the same code on the tiny Wan, on the CPU (smoke run)
    python benchmarks/memory_presets.py --quick               # --tiny with preset 12gb only (tests/test_benchmarks.py)

Each case runs in a process of its own (an OOM or a fragmented allocator cannot leak into the next).
The DiT gets random bf16 weights (seeded) in CPU memory, then `memory.prepare_dit` applies the preset
(conf/memory/<preset>.yaml) exactly as training does: fp8 quantization on the GPU one layer at a time,
the block swap window, checkpointing with activation offload, the attention backend. Then a rank-32
LoRA, AdamW and 3 steps under bf16 autocast at 480x832 through Family.predict, with the block-swap
pre-hook and checkpoint recomputation in the loop. s/step is the mean of steps 2-3; peak is
torch.cuda.max_memory_allocated. The GPU is capped with torch.cuda.set_per_process_memory_fraction at
the preset's size (24, 16, 12 GiB; none: uncapped), so a preset that does not fit prints OOM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

TASKS = ("t2v-1.3B", "t2v-14B")
FRAMES = (33, 81)
PRESETS = ("none", "24gb", "16gb", "12gb")
BUDGET_GIB = {"none": None, "24gb": 24, "16gb": 16, "12gb": 12}
HEIGHT, WIDTH, RANK = 480, 832, 32


def _memory(preset: str) -> dict:
    from omegaconf import OmegaConf

    from musubi_pipe.config import compose

    return OmegaConf.to_container(compose([f"memory={preset}"]), resolve=True)["memory"]


def _random_dit(task):
    """The task's WanTransformer3DModel with seeded random bf16 weights in CPU memory."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel(**task.dit_config)
    model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: a 14B model in float32 is 56 GB
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    model._wan_task = task
    return model


def run_case(task_name: str, frames: int, preset: str, device: str, height: int, width: int) -> dict:
    """One measurement: {"peak_gib", "s_per_step"} or {"error": "OOM"}."""
    import torch

    from musubi_pipe.memory import prepare_dit
    from musubi_pipe.models.wan.family import FAMILY
    from musubi_pipe.models.wan.tasks import get_task
    from musubi_pipe.network.lora import LoRANetwork

    cuda = device.startswith("cuda")
    budget = BUDGET_GIB[preset]
    if cuda and budget is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total))
    task = get_task(task_name)
    model_cfg = {"arch": "wan", "task": task_name}
    try:
        dit = prepare_dit(FAMILY, model_cfg, _random_dit(task), _memory(preset), device, training=True)
        network = LoRANetwork(FAMILY.lora_targets(dit), RANK, float(RANK))
        network.to(device, torch.float32)
        network.apply_to()
        optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=1e-4)
        st, sh, sw = task.vae_stride
        shape = (1, task.latent_channels, (frames - 1) // st + 1, height // sh, width // sw)
        text = [{"embedding": torch.randn(task.text_len, task.dit_config["text_dim"], device=device, dtype=torch.bfloat16)}]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                pred = FAMILY.predict(dit, torch.randn(shape, device=device), torch.tensor([500.0], device=device), text)
            loss = torch.nn.functional.mse_loss(pred.float(), torch.randn(pred.shape, device=device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"peak_gib": peak, "s_per_step": sum(times[1:]) / 2}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(lines[-1])


def main(argv: list[str]) -> None:
    if argv[:1] == ["--case"]:
        task, frames, preset, device, height, width = argv[1:]
        print(json.dumps(run_case(task, int(frames), preset, device, int(height), int(width))))
        return
    if argv[:1] in (["--tiny"], ["--quick"]):
        presets = PRESETS if argv[0] == "--tiny" else ("12gb",)
        cases, device, size = [("tiny-t2v", 5, p) for p in presets], "cpu", (64, 64)
    else:
        import torch

        cases = [(argv[0], int(argv[1]), argv[2])] if argv else [(t, f, p) for t in TASKS for f in FRAMES for p in PRESETS]
        device, size = "cuda", (HEIGHT, WIDTH)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {size[0]}x{size[1]}, rank {RANK}")
    print("| model | frames | preset | peak GiB | s/step |")
    print("|---|---|---|---|---|")
    for task, frames, preset in cases:
        result = _in_subprocess([task, str(frames), preset, device, str(size[0]), str(size[1])])
        if "error" in result:
            print(f"| {task} | {frames} | {preset} | {result['error']} | |", flush=True)
            continue
        peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.1f}"
        print(f"| {task} | {frames} | {preset} | {peak} | {result['s_per_step']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
