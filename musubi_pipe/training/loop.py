"""The LoRA training loop. Reads top to bottom: setup, train, save_checkpoint, load_checkpoint, cleanup.

Rectified flow: x_t = (1 - t) x0 + t noise, target = noise - x0, the DiT sees timestep 1000 t.
Only the LoRA is trained; the DiT is frozen. Noise and timesteps come from one torch.Generator
whose state is checkpointed with the optimizer, scheduler and data position, so a killed run that
is re-run continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.network.lora_file import load_lora_file
from musubi_pipe.training import checkpoint as ckpt
from musubi_pipe.training.batches import epoch_batches, group_items
from musubi_pipe.training.schedule import build_scheduler
from musubi_pipe.training.timesteps import noisy_input, sample_t

log = logging.getLogger("musubi_pipe")


class Trainer:
    """Trains one LoRA on cached latents and text embeddings.

    `cfg` holds the stage's declared groups (network, optimizer, training, dataset, memory);
    `latent_path(record)` gives a latent entry's file, `text_entry(caption)` its embedding tensor.
    """

    def __init__(self, *, family, model_cfg, cfg, latents_index, latent_path, text_entry, checkpoint_dir: Path, device, dit_dtype, progress=True):
        self.family, self.model_cfg, self.cfg = family, model_cfg, cfg
        self.latents_index, self.latent_path, self.text_entry = latents_index, latent_path, text_entry
        self.checkpoint_dir, self.device, self.dit_dtype, self.progress = checkpoint_dir, device, dit_dtype, progress
        self.step, self.epoch, self.position, self.losses = 0, 0, 0, []
        self.resumed_from = 0
        self._order_epoch, self._order = None, []  # the current epoch's batches, see epoch_order

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        train, opt, net = self.cfg["training"], self.cfg["optimizer"], self.cfg["network"]
        self.dit = self.family.load_dit(self.model_cfg, self.device, self.dit_dtype)
        if self.cfg["memory"].get("gradient_checkpointing"):
            self.dit.enable_gradient_checkpointing()
        torch.manual_seed(train["seed"])  # LoRA init draws from the global RNG
        self.network = LoRANetwork(self.family.lora_targets(self.dit), net["network_dim"], net["network_alpha"])
        if net.get("network_weights"):
            tensors, _ = load_lora_file(net["network_weights"])
            self.network.load_lora_state_dict(tensors, source=f"network.network_weights={net['network_weights']}")
        self.network.to(self.device, torch.float32)
        self.network.apply_to()
        self.optimizer = torch.optim.AdamW(
            self.network.trainable_parameters(),
            lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"],
        )
        self.groups = group_items(self.latents_index, self.cfg["dataset"])
        self.batches_per_epoch = len(epoch_batches(self.groups, self.cfg["dataset"], train["seed"], 0))
        accum = train["gradient_accumulation_steps"]
        if train.get("max_train_epochs"):
            self.max_steps = train["max_train_epochs"] * math.ceil(self.batches_per_epoch / accum)
        else:
            self.max_steps = train["max_train_steps"]
        self.scheduler = build_scheduler(self.optimizer, opt, self.max_steps)
        self.generator = torch.Generator().manual_seed(train["seed"])
        self.autocast = _autocast(self.device, train["mixed_precision"])
        latest = ckpt.complete_checkpoints(self.checkpoint_dir)
        if latest:
            self.load_checkpoint(latest[-1])

    # -- train -------------------------------------------------------------------------------
    def train(self) -> None:
        train = self.cfg["training"]
        accum, every = train["gradient_accumulation_steps"], train["save_every_n_steps"]
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not self.progress)
        self.dit.train()
        while self.step < self.max_steps:
            total = 0.0
            for _ in range(accum):
                loss = self.training_loss(self.next_batch()) / accum
                loss.backward()  # frees the graph; activations do not pile up across accumulation
                total += loss.item()
            if self.cfg["optimizer"]["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(self.network.trainable_parameters(), self.cfg["optimizer"]["max_grad_norm"])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", epoch=self.epoch)
            if every > 0 and self.step % every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
        bar.close()
        self.dit.eval()

    def next_batch(self) -> list[dict]:
        """Return the next batch of the data order, moving to the next epoch when one ends."""
        if self.position >= len(self.epoch_order()):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_order()[self.position]
        self.position += 1
        return batch

    def epoch_order(self) -> list[list[dict]]:
        """The current epoch's batches, built once per epoch (a pure function of seed and epoch)."""
        if self._order_epoch != self.epoch:
            self._order = epoch_batches(self.groups, self.cfg["dataset"], self.cfg["training"]["seed"], self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def training_loss(self, batch: list[dict]) -> torch.Tensor:
        train = self.cfg["training"]
        latents = torch.stack([load_file(str(self.latent_path(r)))["latents"] for r in batch])
        embeds = [self.text_entry(r["caption"]).to(self.device, self.dit_dtype) for r in batch]
        noise = torch.randn(latents.shape, generator=self.generator)
        t = sample_t(
            len(batch), train["timestep_sampling"],
            shift=train["discrete_flow_shift"], sigmoid_scale=train["sigmoid_scale"], generator=self.generator,
        )
        noisy, target = noisy_input(latents, noise, t)
        with self.autocast:
            pred = self.family.predict(self.dit, noisy.to(self.device, self.dit_dtype), (t * 1000).to(self.device), embeds)
        return F.mse_loss(pred.float(), target.to(self.device).float())

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        ckpt.save_checkpoint(
            self.checkpoint_dir, self.step,
            network_state=self.network.lora_state_dict(torch.float32),
            optimizer=self.optimizer, scheduler=self.scheduler, generator=self.generator,
            state={"epoch": self.epoch, "position": self.position, "losses": self.losses},
        )

    def load_checkpoint(self, path: Path) -> None:
        network_state, state = ckpt.load_checkpoint(path, optimizer=self.optimizer, scheduler=self.scheduler, generator=self.generator)
        self.network.load_lora_state_dict(network_state, source=str(path))
        self.step, self.epoch, self.position, self.losses = state["step"], state["epoch"], state["position"], state["losses"]
        self.resumed_from = self.step
        log.info("train: resumed from checkpoint %s (step %d, epoch %d)", path, self.step, self.epoch)

    # -- cleanup -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.network.restore()
        del self.dit, self.optimizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _autocast(device: str, mixed_precision: str):
    """Return the autocast context for training.mixed_precision (auto: bf16 where the GPU has it)."""
    if mixed_precision == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if use_bf16 else "no"
    if mixed_precision == "no":
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
