"""Benchmark: optimizer steps per second of our training loop against a bare PyTorch loop, in one run.

    python benchmarks/train_overhead.py [--rounds 10] [--steps 20] [--warmup 5] [--device cpu|cuda]
    python benchmarks/train_overhead.py --quick      # 1 round of 2 steps: checks it runs (tests/test_benchmarks.py)

Both loops train the same LoRA (same tiny Wan DiT built from the demo recipe, same rank, AdamW with
the recipe's gradient clipping, one cached item per step, the same batches) with no logging,
checkpoints or sampling. The bare loop keeps
every latent and embedding in memory and draws timesteps with one torch.rand; ours is
`training.loop.Trainer` as the train stage runs it: latents read from the store each step, per-batch
seeds, timestep sampling, expert routing, loss weighting, gradient clipping and the LR scheduler.
Rounds alternate between the two loops (so drifts in machine speed hit both alike) and total times
are compared. Prints steps/s of each and the ratio (goal: ours >= 0.9 of bare); exits 1 below it,
except in --quick mode, whose few steps measure nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _prepare(root: Path, device: str) -> tuple:
    """Cache the demo's latents and texts; return (job-like config, latents index, text index, store)."""
    from musubi_pipe.config import compose
    from musubi_pipe.runner import resolve, run

    overrides = ["+recipe=demo", f"paths.root={root}", "runtime.progress=false", f"runtime.device={device}",
                 "runtime.log_with=none", "pipeline.stages=[cache_latents,cache_text]"]
    record = run(compose(overrides), root / "runs" / "prepare")
    cfg = resolve(compose(overrides))
    artifacts = {s["name"]: Path(s["artifact"]) for s in record["stages"]}
    latents_index = json.loads((artifacts["cache_latents"] / "index.json").read_text())
    text_index = json.loads((artifacts["cache_text"] / "index.json").read_text())
    return cfg, latents_index, text_index, Path(cfg["paths"]["cache"])


def _item(store: Path, kind: str, key: str) -> Path:
    return store / "items" / kind / key[:2] / f"{key}.safetensors"


def _trainer(cfg, latents_index, text_index, store, device, steps: int, checkpoints: Path):
    from safetensors.torch import load_file

    from musubi_pipe.models import get_family
    from musubi_pipe.training.loop import Trainer

    train = dict(cfg["training"], max_train_steps=steps, save_every_n_steps=None, save_every_n_epochs=None,
                 mixed_precision="no", validation_split=0.0)
    trainer = Trainer(
        family=get_family(cfg["model"]["arch"]), model_cfg=cfg["model"],
        cfg={"network": cfg["network"], "optimizer": cfg["optimizer"], "training": train, "dataset": cfg["dataset"],
             "memory": cfg["memory"], "sampling": {}},
        latents_index=latents_index,
        latent_path=lambda record: _item(store, "latents", record["entry"]),
        text_entry=lambda text: load_file(str(_item(store, "text", text_index[text]))),
        checkpoint_dir=checkpoints, device=device, dit_dtype=_dtype(device), progress=False,
    )
    trainer.setup()
    return trainer


def _dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Ours:
    """Trainer.train, as the train stage runs it; `run(n)` trains n more steps and returns the seconds."""

    def __init__(self, cfg, latents_index, text_index, store, device, warmup: int, scratch: Path):
        self.device = device
        self.trainer = _trainer(cfg, latents_index, text_index, store, device, warmup, scratch / "ours")
        self.trainer.train()

    def run(self, steps: int) -> float:
        self.trainer.max_steps += steps
        _sync(self.device)
        started = time.perf_counter()
        self.trainer.train()
        _sync(self.device)
        return time.perf_counter() - started


class Bare:
    """A plain loop: in-memory tensors, torch.rand timesteps, the same model, LoRA and batches."""

    def __init__(self, cfg, latents_index, text_index, store, device, warmup: int, scratch: Path, total: int):
        import torch
        from safetensors.torch import load_file

        self.device = device
        trainer = _trainer(cfg, latents_index, text_index, store, device, 1, scratch / "bare")
        self.family, self.dit, self.dtype = trainer.family, trainer.dits.get(trainer.experts[0].name), trainer.dit_dtype
        self.params = trainer.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg["optimizer"]["lr"])
        self.max_norm = cfg["optimizer"]["max_grad_norm"]
        self.batches = [trainer.batch_at(i) for i in range(warmup + total)]
        self.tensors = {}
        for batch in self.batches:
            for r in batch:
                if r["entry"] not in self.tensors:
                    latents = load_file(str(_item(store, "latents", r["entry"])))["latents"]
                    embed = load_file(str(_item(store, "text", text_index[r["caption"]])))
                    self.tensors[r["entry"]] = (latents, {k: v.to(device, self.dtype) for k, v in embed.items()})
        self.dit.train()
        self.position = 0
        self.run(warmup)

    def step(self, batch) -> None:
        import torch
        import torch.nn.functional as F

        latents = torch.stack([self.tensors[r["entry"]][0] for r in batch])
        embeds = [self.tensors[r["entry"]][1] for r in batch]
        noise, t = torch.randn_like(latents), torch.rand(len(batch))
        t_b = t.view(-1, 1, 1, 1, 1)
        noisy = ((1 - t_b) * latents + t_b * noise).to(self.device, self.dtype)
        pred = self.family.predict(self.dit, noisy, (t * 1000).to(self.device), embeds, {})
        loss = F.mse_loss(pred.float(), (noise - latents).to(self.device))
        loss.backward()
        if self.max_norm > 0:  # the same optimizer settings as ours
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> float:
        _sync(self.device)
        started = time.perf_counter()
        for batch in self.batches[self.position : self.position + steps]:
            self.step(batch)
        self.position += steps
        _sync(self.device)
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 steps after 1 warm-up step (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared = _prepare(root, args.device)
        ours = Ours(*prepared, args.device, args.warmup, root)
        bare = Bare(*prepared, args.device, args.warmup, root, args.rounds * args.steps)
        seconds = {"bare": 0.0, "ours": 0.0}
        for _ in range(args.rounds):  # interleaved, so drifts in machine speed hit both loops alike
            seconds["bare"] += bare.run(args.steps)
            seconds["ours"] += ours.run(args.steps)
    total = args.rounds * args.steps
    rate = {name: total / value for name, value in seconds.items()}
    print(f"device: {args.device}; {args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps")
    print(f"bare PyTorch loop: {rate['bare']:8.2f} steps/s")
    print(f"musubi_pipe loop:  {rate['ours']:8.2f} steps/s")
    ratio = rate["ours"] / rate["bare"]
    print(f"ours / bare:       {ratio:8.3f}   (goal >= 0.90)")
    return 0 if ratio >= 0.9 or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
