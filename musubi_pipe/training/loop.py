"""The LoRA training loop. Reads top to bottom: setup, train, save_checkpoint, load_checkpoint, cleanup.

Rectified flow: x_t = (1 - t) x0 + t noise, target = noise - x0, the DiT sees timestep 1000 t (the
family builds the inputs, e.g. adds image conditioning). Only the LoRA is trained; the DiT is frozen.
Noise and timesteps come from one torch.Generator whose state is checkpointed with the optimizer,
scheduler and data position, so a killed run that is re-run continues exactly where it stopped.

Models with several experts (Wan2.2 A14B): `training.experts` picks which are trained (both, high or
low). Each batch draws the first item's t, routes it to its expert (models.base.route) and redraws
the other items' t until they fall in the same expert's range, as musubi-tuner does. Each expert
gets its own LoRA (one file per expert, what ComfyUI's Wan2.2 workflows load) unless
`training.shared_expert_lora` trains one LoRA on both. `memory.offload_inactive_dit` keeps the
expert that is not in use on the CPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from musubi_pipe.network.factory import build_network, param_groups
from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.network.lora_file import load_lora_file
from musubi_pipe.training import checkpoint as ckpt
from musubi_pipe.training.batches import epoch_batches, group_items
from musubi_pipe.training.optimizers import build_optimizer
from musubi_pipe.training.schedule import build_scheduler
from musubi_pipe.models.base import route
from musubi_pipe.models.experts import ExpertDits
from musubi_pipe.training.timesteps import TimestepSpec, loss_weights, sample_timesteps, weighted_mse

log = logging.getLogger("musubi_pipe")


class Trainer:
    """Trains one LoRA on cached latents and text embeddings.

    `cfg` holds the stage's declared groups (network, optimizer, training, dataset, memory);
    `latent_path(record)` gives a latent entry's file, `text_entry(caption)` its embedding tensor.
    """

    def __init__(self, *, family, model_cfg, cfg, latents_index, latent_path, text_entry, checkpoint_dir: Path, device,
                 dit_dtype, progress=True, on_checkpoint=None):
        self.family, self.model_cfg, self.cfg = family, model_cfg, cfg
        # on_checkpoint(trainer, label): called at each checkpoint, before it is written, e.g. to write an
        # intermediate LoRA file; label is musubi-tuner's file suffix, "step00000200" or "000002" (epoch 2)
        self.on_checkpoint = on_checkpoint
        self.latents_index, self.latent_path, self.text_entry = latents_index, latent_path, text_entry
        self.checkpoint_dir, self.device, self.dit_dtype, self.progress = checkpoint_dir, device, dit_dtype, progress
        self.step, self.epoch, self.position, self.losses = 0, 0, 0, []
        self.resumed_from = 0
        self._order_epoch, self._order = None, []  # the current epoch's batches, see epoch_order
        self._expert_networks: dict = {}  # expert name -> the network applied to that expert's DiT
        self.expert_steps: dict[str, int] = {}  # how many batches each expert trained on

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        train, opt, net = self.cfg["training"], self.cfg["optimizer"], self.cfg["network"]
        self.experts = active_experts(self.family.experts(self.model_cfg), train.get("experts", "both"))
        offload = bool(self.cfg["memory"].get("offload_inactive_dit")) and len(self.experts) > 1
        dits = {}
        for expert in self.experts:
            dit = self.family.load_dit(self.model_cfg, "cpu" if offload else self.device, self.dit_dtype, expert=expert.name)
            if self.cfg["memory"].get("gradient_checkpointing"):
                dit.enable_gradient_checkpointing()
            dits[expert.name] = dit
        self.dits = ExpertDits(dits, self.device, offload)
        torch.manual_seed(train["seed"])  # LoRA init draws from the global RNG
        shared = len(self.experts) > 1 and train.get("shared_expert_lora", False)
        # {file name suffix: network}: one entry per trained LoRA file ("" = no suffix)
        self.networks: dict[str, LoRANetwork] = {}
        for expert in self.experts:
            network = build_network(self.family.lora_targets(self.dits[expert.name]), net)
            if shared and self.networks:
                network.tie_to(self.networks[""])
            self.networks.setdefault("" if shared else expert.name, network)
            self._expert_networks[expert.name] = network
        if net.get("network_weights"):
            tensors, _ = load_lora_file(net["network_weights"])
            for network in self.networks.values():
                network.load_lora_state_dict(tensors, source=f"network.network_weights={net['network_weights']}")
        for network in self._expert_networks.values():
            network.to(self.device, torch.float32)
            network.apply_to()
        groups = param_groups(list(self.networks.values()), opt["lr"], net.get("loraplus_lr_ratio"))
        self.optimizer = build_optimizer(groups, opt)
        self.groups = group_items(self.latents_index, self.cfg["dataset"])
        self.batches_per_epoch = len(epoch_batches(self.groups, self.cfg["dataset"], train["seed"], 0))
        accum = train["gradient_accumulation_steps"]
        if train.get("max_train_epochs"):
            self.max_steps = train["max_train_epochs"] * math.ceil(self.batches_per_epoch / accum)
        else:
            self.max_steps = train["max_train_steps"]
        self.scheduler = build_scheduler(self.optimizer, opt, self.max_steps)
        self.generator = torch.Generator().manual_seed(train["seed"])
        self.timestep_spec = TimestepSpec.from_config(train)
        self.autocast = _autocast(self.device, train["mixed_precision"])
        latest = ckpt.complete_checkpoints(self.checkpoint_dir)
        if latest:
            self.load_checkpoint(latest[-1])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable LoRA parameter once (tied networks share theirs)."""
        params, seen = [], set()
        for network in self.networks.values():
            for p in network.trainable_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # -- train -------------------------------------------------------------------------------
    def train(self) -> None:
        train = self.cfg["training"]
        accum = train["gradient_accumulation_steps"]
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not self.progress)
        for dit in self.dits.values():
            dit.train()
        while self.step < self.max_steps:
            total = 0.0
            for _ in range(accum):
                loss = self.training_loss(self.next_batch()) / accum
                loss.backward()  # frees the graph; activations do not pile up across accumulation
                total += loss.item()
            if self.cfg["optimizer"]["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg["optimizer"]["max_grad_norm"])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", epoch=self.epoch)
            label = self.checkpoint_label()
            if label and self.step < self.max_steps:
                self.save_checkpoint(label)
        bar.close()
        for dit in self.dits.values():
            dit.eval()

    def checkpoint_label(self) -> str | None:
        """Whether the step just taken ends a save period: "000002" when it completed the 2nd epoch and
        training.save_every_n_epochs divides 2, "step00000200" for save_every_n_steps, else None."""
        train = self.cfg["training"]
        every_epochs, every_steps = train.get("save_every_n_epochs"), train.get("save_every_n_steps")
        if every_epochs and self.position >= len(self.epoch_order()) and (self.epoch + 1) % every_epochs == 0:
            return f"{self.epoch + 1:06d}"
        if every_steps and self.step % every_steps == 0:
            return f"step{self.step:08d}"
        return None

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

    def sample_timesteps(self, n: int, latent_hw: tuple[int, int]):
        """Return (expert, t [n]) for one batch: t in the trained experts' range, all items on one expert."""
        low, high = _span(self.experts)
        t = sample_timesteps(n, self.timestep_spec, latent_hw, self.generator, low, high)
        expert = route(self.experts, float(t[0]))
        if len(self.experts) > 1 and n > 1:
            low, high = _span([expert])
            t = torch.cat([t[:1], sample_timesteps(n - 1, self.timestep_spec, latent_hw, self.generator, low, high)])
        return expert, t

    def training_loss(self, batch: list[dict]) -> torch.Tensor:
        entries = [load_file(str(self.latent_path(r))) for r in batch]
        latents = torch.stack([e["latents"] for e in entries])
        cached = {k: torch.stack([e[k] for e in entries]) for k in entries[0] if k != "latents"}
        embeds = [self.text_entry(r["caption"]).to(self.device, self.dit_dtype) for r in batch]
        noise = torch.randn(latents.shape, generator=self.generator)
        expert, t = self.sample_timesteps(len(batch), tuple(latents.shape[-2:]))
        inputs = self.family.training_inputs(self.model_cfg, latents, noise, t, cached, self.generator)
        dit = self.dits.get(expert.name)
        self.expert_steps[expert.name] = self.expert_steps.get(expert.name, 0) + 1
        cond = {k: v.to(self.device) for k, v in inputs.cond.items()}  # predict casts them for the model
        with self.autocast:
            pred = self.family.predict(dit, inputs.noisy.to(self.device, self.dit_dtype), inputs.timesteps.to(self.device), embeds, cond)
        weights = loss_weights(t, self.timestep_spec)
        return weighted_mse(pred.float(), inputs.target.to(self.device).float(),
                            None if weights is None else weights.to(self.device), inputs.mask)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, label: str) -> None:
        """Write the LoRA of this step (through on_checkpoint), then the resumable state: a run killed in
        between resumes from the previous state and writes the same file again."""
        if self.on_checkpoint:
            self.on_checkpoint(self, label)
        ckpt.save_checkpoint(
            self.checkpoint_dir, self.step,
            network_state=self.network_state(),
            optimizer=self.optimizer, scheduler=self.scheduler, generator=self.generator,
            state={"epoch": self.epoch, "position": self.position, "losses": self.losses, "expert_steps": self.expert_steps},
            keep=self.cfg["training"].get("save_last_n_states") or 1,
        )

    def load_checkpoint(self, path: Path) -> None:
        network_state, state = ckpt.load_checkpoint(path, optimizer=self.optimizer, scheduler=self.scheduler, generator=self.generator)
        for suffix, network in self.networks.items():
            prefix = f"{suffix}/" if suffix else ""
            own = {k[len(prefix):]: v for k, v in network_state.items() if k.startswith(prefix) and (prefix or "/" not in k)}
            network.load_lora_state_dict(own, source=str(path))
        self.step, self.epoch, self.position, self.losses = state["step"], state["epoch"], state["position"], state["losses"]
        self.expert_steps = state.get("expert_steps", {})
        self.resumed_from = self.step
        log.info("train: resumed from checkpoint %s (step %d, epoch %d)", path, self.step, self.epoch)

    def network_state(self) -> dict:
        """All trained LoRA tensors in float32, keys prefixed `<expert>/` when there are several files."""
        state = {}
        for suffix, network in self.networks.items():
            prefix = f"{suffix}/" if suffix else ""
            state.update({prefix + k: v for k, v in network.lora_state_dict(torch.float32).items()})
        return state

    # -- cleanup -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        for network in self._expert_networks.values():
            network.restore()
        del self.dits, self.optimizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def active_experts(experts: list, which: str) -> list:
    """The experts `training.experts` selects: both (all), high or low (Wan2.2 A14B)."""
    if which == "both":
        return list(experts)
    chosen = [e for e in experts if e.name == f"{which}_noise"]
    if not chosen:
        raise ValueError(f"training.experts={which} needs a model with high- and low-noise experts")
    return chosen


def _span(experts: list) -> tuple[float, float]:
    """The t range [low, high] the experts cover; a range open at its top stops just below it."""
    low = min(e.t_min for e in experts)
    top = max(e.t_max for e in experts)
    return low, (1.0 if top >= 1.0 else math.nextafter(top, 0.0))


def _autocast(device: str, mixed_precision: str):
    """Return the autocast context for training.mixed_precision (auto: bf16 where the GPU has it)."""
    if mixed_precision == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if use_bf16 else "no"
    if mixed_precision == "no":
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
