"""The LoRA training loop. Reads top to bottom: setup, train, save_checkpoint, load_checkpoint, cleanup.

Rectified flow: x_t = (1 - t) x0 + t noise, target = noise - x0; the DiT sees the model timestep of
`training.conventions` (musubi-tuner's 1000 t + 1 by default, timesteps.model_timesteps); the family
builds the inputs (e.g. adds image conditioning). Only the LoRA is trained; the DiT is frozen.
Noise and timesteps come from one torch.Generator whose state is checkpointed with the optimizer,
scheduler and data position, so a killed run that is re-run continues exactly where it stopped.

Models with several experts (Wan2.2 A14B): `training.experts` picks which are trained (both, high or
low). Each batch draws the first item's t, routes it to its expert (models.base.route, on the model
timestep / 1000 as musubi-tuner does) and redraws the other items' t until they fall in the same
expert's range. Each expert gets its own LoRA (one file per expert, what ComfyUI's Wan2.2 workflows
load) unless `training.shared_expert_lora` trains one LoRA on both. `memory.offload_inactive_dit` keeps the
expert that is not in use on the CPU.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from musubi_pipe.network.factory import build_network, load_network_weights, param_groups
from musubi_pipe.network.loraid import allocation_from_config, modules_by_expert
from musubi_pipe.errors import UserError
from musubi_pipe.progress import progress_bar
from musubi_pipe.pipeline.distributed import Dist, fsdp_requested, shard_frozen
from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.network.formats import read_lora_file
from musubi_pipe.training import checkpoint as ckpt
from musubi_pipe.training.batches import epoch_batches, group_items
from musubi_pipe.training.optimizers import build_optimizer
from musubi_pipe.training.schedule import build_scheduler
from musubi_pipe.models.base import active_experts, route
from musubi_pipe.models.experts import ExpertDits
from musubi_pipe.memory import load_dit
from musubi_pipe.memory.settings import blocks_to_swap
from musubi_pipe.training.timesteps import (
    TimestepSpec,
    convention_notes,
    loss_weights,
    model_timesteps,
    routing_offset,
    sample_timesteps,
    weighted_mse,
)
from musubi_pipe.training.validation import VALIDATION_TIMESTEPS, noise_seed, slice_records, split_records

log = logging.getLogger("musubi_pipe")


class Trainer:
    """Trains one LoRA on cached latents and text embeddings.

    `cfg` holds the stage's declared groups (network, optimizer, training, dataset, memory);
    `latent_path(record)` gives a latent entry's file, `text_entry(caption)` its embedding tensors ({name: tensor}).
    """

    def __init__(self, *, family, model_cfg, cfg, latents_index, latent_path, text_entry, checkpoint_dir: Path, device,
                 dit_dtype, progress=True, on_checkpoint=None, dist=None, log=None, on_sample=None):
        self.family, self.model_cfg, self.cfg = family, model_cfg, cfg
        # on_checkpoint(trainer, label): called at each checkpoint, before it is written, e.g. to write an
        # intermediate LoRA file; label is musubi-tuner's file suffix, "step00000200" or "000002" (epoch 2)
        self.on_checkpoint = on_checkpoint
        # on_sample(trainer, label): sample the prompts with the LoRA as it is (sampling.sample_every_n_*)
        self.on_sample = on_sample
        self.latents_index, self.latent_path, self.text_entry = latents_index, latent_path, text_entry
        self.checkpoint_dir, self.device, self.dit_dtype, self.progress = checkpoint_dir, device, dit_dtype, progress
        # several processes (pipeline.distributed): each trains on its own batches, gradients are averaged
        self.dist = dist or Dist()
        self.log = log  # a training.logs.TrainingLog (main process only), or None
        self.log_every = 10  # steps between timestep histograms (runtime.log_every_n_steps)
        self.recent_timesteps: list[torch.Tensor] = []  # drawn since the last histogram
        self._reader, self._pending = None, {}  # the thread reading the next batch, see _prefetched
        self._entries = _RecentEntries(ENTRY_MEMORY_BYTES)  # latents and embeddings read lately
        self.fsdp = False  # DiT weights sharded over the processes (set in setup)
        self.validation_losses: list[list] = []  # [step, loss] pairs
        self.step, self.consumed, self.losses = 0, 0, []  # consumed: batches used so far, by all processes
        self._unread_losses: list = []  # step losses still on the device, see read_losses
        self.resumed_from = 0
        self._orders: dict[int, list] = {}  # epoch -> its batches, see epoch_order
        self._expert_networks: dict = {}  # expert name -> the network applied to that expert's DiT
        self.expert_steps: dict[str, int] = {}  # how many batches each expert trained on

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        train, opt, net = self.cfg["training"], self.cfg["optimizer"], self.cfg["network"]
        self.experts = active_experts(self.family.experts(self.model_cfg), train.get("experts", "both"))
        # LORAID: this ID trains only its units, so only the experts that hold some of them
        self.loraid = allocation_from_config(net, self.model_cfg.get("task"), self.family.name)
        self.loraid_layout = self.family.loraid_layout(self.model_cfg) if self.loraid is not None else None
        if self.loraid is not None:
            with_units = {unit[0] for unit in self.loraid["units"]}
            self.experts = [e for e in self.experts if e.name in with_units]
            if not self.experts:
                raise UserError(f"network.loraid={net['loraid']} has no units on the expert(s) training.experts="
                                f"{train.get('experts')} selects; train both experts or pick another ID")
        memory = self.cfg["memory"]
        offload = bool(memory.get("offload_inactive_dit")) and len(self.experts) > 1
        fsdp = self.fsdp = self.dist.active and fsdp_requested()
        swapped = blocks_to_swap(memory, self.family, self.model_cfg)
        moved = [key for key, on in (("offload_inactive_dit", offload), ("blocks_to_swap", swapped),
                                     ("fp8_base", memory.get("fp8_base"))) if on]
        if fsdp and moved:
            raise UserError(f"memory.{moved[0]} and FSDP (accelerate launch --use_fsdp) do not go together: FSDP "
                            "already spreads the DiT's weights over the processes; drop one")
        dits = {}
        for expert in self.experts:
            # with FSDP the whole DiT is read into CPU memory and each process moves only its shard to the GPU
            dit = load_dit(self.family, self.model_cfg, memory, self.device, self.dit_dtype, expert.name,
                           training=True, park=offload or fsdp)
            if fsdp:
                shard_frozen(dit, self.family.blocks(dit), self.dist)
                log.info("train: FSDP: the %sDiT's weights are sharded over %d processes",
                         f"{expert.name} " if expert.name else "", self.dist.world)
            dits[expert.name] = dit
        self.dits = ExpertDits(dits, self.device, offload)
        torch.manual_seed(train["seed"])  # LoRA init draws from the global RNG
        shared = len(self.experts) > 1 and train.get("shared_expert_lora", False)
        # {file name suffix: network}: one entry per trained LoRA file ("" = no suffix)
        self.networks: dict[str, LoRANetwork] = {}
        candidates = {}  # file name suffix -> the model's LoRA candidates (for network_weights errors)
        for expert in self.experts:
            targets = self.family.lora_targets(self.dits[expert.name])
            candidates.setdefault("" if shared else expert.name, list(targets))
            if self.loraid is not None:
                own = dict(self.loraid, units=[u for u in self.loraid["units"] if u[0] == expert.name])
                modules = modules_by_expert(own, {expert.name: list(targets)}, self.loraid_layout)[expert.name]
                targets = {m: targets[m] for m in modules}
            network = build_network(targets, net, default_excludes=self.family.lora_default_excludes)
            if shared and self.networks:
                network.tie_to(self.networks[""])
            self.networks.setdefault("" if shared else expert.name, network)
            self._expert_networks[expert.name] = network
        if net.get("network_weights"):
            tensors, _ = read_lora_file(net["network_weights"])
            for suffix, network in self.networks.items():
                load_network_weights(network, tensors, candidates[suffix],
                                     f"network.network_weights={net['network_weights']}")
        for network in self._expert_networks.values():
            network.to(self.device, torch.float32)
            network.apply_to()
        groups = param_groups(list(self.networks.values()), opt["lr"], net.get("loraplus_lr_ratio"))
        self.optimizer = build_optimizer(groups, opt)
        dataset = self.cfg["dataset"]
        records = slice_records(self.latents_index, int(dataset.get("slice") or 1), int(dataset.get("num_slices") or 1))
        train_records, self.validation_records = split_records(records, train.get("validation_split") or 0.0)
        self.groups = group_items(train_records, self.cfg["dataset"])
        self.batches_per_epoch = len(epoch_batches(self.groups, self.cfg["dataset"], train["seed"], 0))
        self.batches_per_step = train["gradient_accumulation_steps"] * self.dist.world
        if train.get("max_train_epochs"):
            self.max_steps = train["max_train_epochs"] * math.ceil(self.batches_per_epoch / self.batches_per_step)
        else:
            self.max_steps = train["max_train_steps"]
        self.scheduler = build_scheduler(self.optimizer, opt, self.max_steps)
        self.generator = torch.Generator().manual_seed(train["seed"])
        self.timestep_spec = TimestepSpec.from_config(train)
        for note in convention_notes(self.timestep_spec):
            log.warning("train: %s", note)
        self.autocast = _autocast(self.device, train["mixed_precision"])
        latest = ckpt.complete_checkpoints(self.checkpoint_dir)
        if latest:
            self.load_checkpoint(latest[-1])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable LoRA parameter once (tied networks share theirs); listed once, as walking the
        module tree every step would cost more than a tiny model's step."""
        if getattr(self, "_params", None) is not None:
            return self._params
        params, seen = [], set()
        for network in self.networks.values():
            for p in network.trainable_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        self._params = params
        return params

    # -- train -------------------------------------------------------------------------------
    def train(self) -> None:
        """Optimizer steps until max_steps. Step s uses the batches s*P .. s*P+P-1 of the data order
        (P = gradient_accumulation_steps x processes); process r takes every world-th one from r, so
        N processes train exactly what one process does with N times the accumulation."""
        accum, world = self.cfg["training"]["gradient_accumulation_steps"], self.dist.world
        show = self.progress and self.dist.main
        bar = progress_bar(total=self.max_steps, initial=self.step, desc="train", disable=not show)
        for dit in self.dits.values():
            dit.train()
        if self.step == 0 and self.cfg.get("sampling", {}).get("sample_at_first"):
            self.sample("step00000000")
        while self.step < self.max_steps:
            epochs_before = self.consumed // self.batches_per_epoch
            total = 0.0
            for micro in range(accum):
                index = self.consumed + micro * world + self.dist.rank
                loss = self.training_loss(self.batch_at(index), index) / accum
                loss.backward()  # frees the graph; activations do not pile up across accumulation
                total = total + loss.detach()  # a tensor: reading it would wait for the GPU every step
            self.consumed += accum * world
            params = self.trainable_parameters()
            if self.dist.active:  # the mean over processes: what one process accumulating all the batches gets
                self.dist.mean_(_grads(params))
                total = sum(self.dist.all_gather(float(total))) / world
            max_norm = self.cfg["optimizer"]["max_grad_norm"]
            grad_norm = None
            if max_norm > 0 or self.log is not None:  # the norm costs a pass over the gradients: only when used
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._unread_losses.append(total)
            if show or self.log is not None:
                self.log_step(self.read_losses()[-1], grad_norm)
                bar.set_postfix(loss=f"{self.losses[-1]:.4f}", epoch=self.epoch)
            self.maybe_validate()
            bar.update(1)
            label = self.checkpoint_label(epochs_before)
            if label and self.step < self.max_steps and self.dist.main:
                self.save_checkpoint(label)
            sampling = self.cfg.get("sampling", {})
            label = self.period_label(sampling.get("sample_every_n_steps"), sampling.get("sample_every_n_epochs"),
                                      epochs_before, epoch_prefix="e")
            if label:
                self.sample(label)
        bar.close()
        self.read_losses()
        for dit in self.dits.values():
            dit.eval()
        if self.dist.active:  # every process's batches, per expert
            counts = self.dist.all_gather(self.expert_steps)
            self.expert_steps = {name: sum(c.get(name, 0) for c in counts) for name in set().union(*counts)}

    def read_losses(self) -> list[float]:
        """`losses` with the steps whose loss was not read yet (it stays on the device until needed)."""
        if self._unread_losses:
            self.losses.extend(float(v) for v in self._unread_losses)
            self._unread_losses = []
        return self.losses

    def maybe_validate(self) -> None:
        """Every training.validate_every_n_steps steps and at the last step, on the main process."""
        every = self.cfg["training"].get("validate_every_n_steps")
        if not self.validation_records or not (self.dist.main or self.fsdp):  # sharded: every process takes part
            return
        if (every and self.step % every == 0) or self.step == self.max_steps:
            loss = self.validation_loss()
            self.validation_losses.append([self.step, round(loss, 6)])
            if self.log is not None:
                self.log.scalars({"loss/validation": loss}, self.step)

    @property
    def epoch(self) -> int:
        """The epoch of the last batch used (0-based)."""
        return max(self.consumed - 1, 0) // self.batches_per_epoch

    def checkpoint_label(self, epochs_before: int) -> str | None:
        """Whether the step just taken ends a save period (training.save_every_n_steps / _epochs)."""
        train = self.cfg["training"]
        return self.period_label(train.get("save_every_n_steps"), train.get("save_every_n_epochs"), epochs_before)

    def period_label(self, every_steps, every_epochs, epochs_before: int, epoch_prefix: str = "") -> str | None:
        """"000002" (with `epoch_prefix`) when the step just taken completed the 2nd epoch and `every_epochs`
        divides 2, "step00000200" when `every_steps` divides the step, else None (musubi-tuner's file suffixes)."""
        completed = self.consumed // self.batches_per_epoch
        if every_epochs and completed > epochs_before and completed % every_epochs == 0:
            return f"{epoch_prefix}{completed:06d}"
        if every_steps and self.step % every_steps == 0:
            return f"step{self.step:08d}"
        return None

    def sample(self, label: str) -> None:
        """Sample the prompts with the LoRA as trained so far (main process; dropouts off meanwhile)."""
        if self.on_sample is None or not (self.dist.main or self.fsdp):  # sharded: every process takes part
            return
        for module in [*self.networks.values(), *self.dits.values()]:
            module.eval()
        try:
            self.on_sample(self, label)
        finally:
            for module in [*self.networks.values(), *self.dits.values()]:
                module.train()

    def batch_at(self, index: int) -> list[dict]:
        """Batch number `index` of the data order: epoch index // batches_per_epoch, at its position."""
        epoch, position = divmod(index, self.batches_per_epoch)
        return self.epoch_order(epoch)[position]

    def epoch_order(self, epoch: int) -> list[list[dict]]:
        """An epoch's batches, a pure function of seed and epoch (the last two epochs are kept)."""
        if epoch not in self._orders:
            self._orders[epoch] = epoch_batches(self.groups, self.cfg["dataset"], self.cfg["training"]["seed"], epoch)
            for old in sorted(self._orders)[:-2]:
                del self._orders[old]
        return self._orders[epoch]

    def sample_timesteps(self, n: int, latent_hw: tuple[int, int]):
        """Return (expert, t [n]) for one batch: t in the trained experts' range, all items on one expert.

        Experts are routed on model timestep / 1000, which is t + routing_offset (musubi: 1000 t + 1)."""
        offset = routing_offset(self.timestep_spec)
        low, high = _span(self.experts, offset)
        t = sample_timesteps(n, self.timestep_spec, latent_hw, self.generator, low, high)
        expert = route(self.experts, float(t[0]) + offset)
        if len(self.experts) > 1 and n > 1:
            low, high = _span([expert], offset)
            t = torch.cat([t[:1], sample_timesteps(n - 1, self.timestep_spec, latent_hw, self.generator, low, high)])
        return expert, t

    def training_loss(self, batch: list[dict], index: int = 0) -> torch.Tensor:
        """The loss of batch number `index`. Its noise, timesteps and dropout draw from seeds of (seed, index),
        so they do not depend on how many processes train or where a resumed run restarted."""
        seed = _batch_seed(self.cfg["training"]["seed"], index)
        self.generator.manual_seed(seed)
        _seed_dropouts(seed, self.device)
        latents, cached, embeds = self._prefetched(index, batch)
        noise = torch.randn(latents.shape, generator=self.generator)
        expert, t = self.sample_timesteps(len(batch), tuple(latents.shape[-2:]))
        self.expert_steps[expert.name] = self.expert_steps.get(expert.name, 0) + 1
        self.recent_timesteps.append(t)
        return self._loss(latents, cached, embeds, noise, t, expert,
                          loss_weights(t, self.timestep_spec, self.dit_dtype))

    def _load_batch(self, batch: list[dict]):
        """(latents, cached conditioning, text embeddings on the device) of a batch of index records."""
        latents, cached, embeds = self._read_batch(batch)
        return latents, cached, [{k: v.to(self.device, self.dit_dtype) if v.is_floating_point() else v.to(self.device)
                                  for k, v in e.items()} for e in embeds]

    def _read_batch(self, batch: list[dict]):
        """The batch's tensors as stored (CPU), from memory when read recently; runs in the prefetch thread."""
        entries = [self._entries.get(("latents", r["entry"]), lambda r=r: load_file(str(self.latent_path(r))))
                   for r in batch]
        latents = torch.stack([e["latents"] for e in entries])
        cached = {k: torch.stack([e[k] for e in entries]) for k in entries[0] if k != "latents"}
        embeds = [self._entries.get(("text", r["caption"]), lambda r=r: self.text_entry(r["caption"])) for r in batch]
        return latents, cached, embeds

    def _prefetched(self, index: int, batch: list[dict]):
        """Batch `index`'s tensors, read while the previous batch trained on the GPU; starts reading this
        process's next batch (index + processes) before returning. On the CPU a reading thread would only
        compete with the step for the cores (measured: benchmarks/train_overhead.py), so it reads in turn."""
        if not str(self.device).startswith("cuda"):
            return self._load_batch(batch)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="musubi-batches")
        pending = self._pending.pop(index, None)
        latents, cached, embeds = pending.result() if pending is not None else self._read_batch(batch)
        for stale in [k for k in self._pending if k < index]:
            self._pending.pop(stale).cancel()
        following = index + self.dist.world
        if following < self.max_steps * self.batches_per_step and following not in self._pending:
            self._pending[following] = self._reader.submit(self._read_batch, self.batch_at(following))
        return latents, cached, [{k: v.to(self.device, self.dit_dtype) if v.is_floating_point() else v.to(self.device)
                                  for k, v in e.items()} for e in embeds]

    def _loss(self, latents, cached, embeds, noise, t, expert, weights) -> torch.Tensor:
        spec = self.timestep_spec
        inputs = self.family.training_inputs(self.model_cfg, latents, noise, t, model_timesteps(t, spec), cached,
                                             self.generator, spec.conventions)
        cond = {k: v.to(self.device) for k, v in inputs.cond.items()}  # predict casts them for the model
        with self.autocast:
            pred = self.family.predict(self.dits.get(expert.name), inputs.noisy.to(self.device, self.dit_dtype),
                                       inputs.timesteps.to(self.device), embeds, cond)
        return weighted_mse(pred.float(), inputs.target.to(self.device).float(),
                            None if weights is None else weights.to(self.device), inputs.mask)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean unweighted loss of the held-out items at VALIDATION_TIMESTEPS (those the trained experts cover),
        with fixed noise per item and dropouts off; None without held-out items."""
        if not self.validation_records:
            return None
        offset = routing_offset(self.timestep_spec)
        low, high = _span(self.experts, offset)
        times = [t for t in VALIDATION_TIMESTEPS if low <= t <= high]
        for network in self.networks.values():
            network.eval()
        total, count = 0.0, 0
        for record in self.validation_records:
            latents, cached, embeds = self._load_batch([record])
            self.generator.manual_seed(noise_seed(record))  # training reseeds it for every batch
            noise = torch.randn(latents.shape, generator=self.generator)
            for value in times:
                t = torch.tensor([value])
                expert = route(self.experts, value + offset)
                total += float(self._loss(latents, cached, embeds, noise, t, expert, None))
                count += 1
        for network in self.networks.values():
            network.train()
        return total / max(count, 1)

    def log_step(self, loss: float, grad_norm) -> None:
        """Scalars of the step just taken (and, every training.log_every_n_steps, the timesteps drawn)."""
        if self.log is None:
            return
        grad_norm = None if grad_norm is None else float(grad_norm)
        recent = self.losses[-max(1, math.ceil(self.batches_per_epoch / self.batches_per_step)):]
        values = {"loss/current": loss, "loss/average": sum(recent) / len(recent), "grad_norm": grad_norm}
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            values[f"lr/{_LR_TAGS.get(group.get('name'), group.get('name', 'unet'))}"] = lr
        self.log.scalars(values, self.step)
        every = self.log_every
        if self.step % every == 0 and self.recent_timesteps:
            self.log.histogram("timesteps", torch.cat(self.recent_timesteps), self.step)
            self.recent_timesteps = []

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
            state={"consumed": self.consumed, "epoch": self.epoch, "losses": self.read_losses(),
                   "expert_steps": self.expert_steps,
                   "validation_losses": self.validation_losses},
            keep=self.cfg["training"].get("save_last_n_states") or 1,
        )

    def load_checkpoint(self, path: Path) -> None:
        network_state, state = ckpt.load_checkpoint(path, optimizer=self.optimizer, scheduler=self.scheduler, generator=self.generator)
        for suffix, network in self.networks.items():
            prefix = f"{suffix}/" if suffix else ""
            own = {k[len(prefix):]: v for k, v in network_state.items() if k.startswith(prefix) and (prefix or "/" not in k)}
            network.load_lora_state_dict(own, source=str(path))
        self.step, self.losses = state["step"], state["losses"]
        self.consumed = state.get("consumed", state["epoch"] * self.batches_per_epoch + state.get("position", 0))
        self.expert_steps = state.get("expert_steps", {})
        self.validation_losses = state.get("validation_losses", [])
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
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader, self._pending = None, {}
        for network in self._expert_networks.values():
            network.restore()
        del self.dits, self.optimizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# TensorBoard tags of the optimizer's parameter groups (musubi-tuner calls the LoRA's group "unet")
_LR_TAGS = {"default": "unet", None: "unet", "lora_down": "unet", "lora_up": "unet plus"}


# Cached items kept in memory by the trainer (the data of a small dataset is read from disk once)
ENTRY_MEMORY_BYTES = 1 << 30


class _RecentEntries:
    """The most recently used item entries (dicts of tensors), up to a total size in bytes."""

    def __init__(self, limit: int):
        self.limit, self.size, self.items = limit, 0, OrderedDict()
        self.lock = threading.Lock()  # the batch-reading thread and validation share it

    def get(self, key, load):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
        value = load()
        nbytes = sum(t.numel() * t.element_size() for t in value.values())
        with self.lock:
            if nbytes <= self.limit and key not in self.items:
                self.items[key] = (value, nbytes)
                self.size += nbytes
                while self.size > self.limit:
                    _, (_, dropped) = self.items.popitem(last=False)
                    self.size -= dropped
        return value


def _seed_dropouts(seed: int, device) -> None:
    """Seed the global generators LoRA dropouts draw from: the CPU's, and the GPU's when training on one
    (torch.manual_seed would also visit every other backend, which costs more than a tiny step)."""
    torch.default_generator.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed(seed)


def _batch_seed(seed: int, index: int) -> int:
    """The seed of batch number `index`'s random draws (distinct per batch, stable across runs)."""
    return (seed * 1_000_003 + index * 7_919 + 0x5EED) % (2**63)


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients of `params`, zeros for a parameter this process did not use (another expert's LoRA)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _span(experts: list, offset: float = 0.0) -> tuple[float, float]:
    """The t range [low, high] whose routing time t + offset the experts cover; a range open at its top stops just
    below it. The ends 0 and 1 stay: every t in [0, 1] is some expert's."""
    low = min(e.t_min for e in experts)
    top = max(e.t_max for e in experts)
    low = max(low - offset, 0.0) if low > 0.0 else 0.0
    return low, (1.0 if top >= 1.0 else math.nextafter(top - offset, 0.0))


def _autocast(device: str, mixed_precision: str):
    """Return the autocast context for training.mixed_precision (auto: bf16 where the GPU has it)."""
    if mixed_precision == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if use_bf16 else "no"
    if mixed_precision == "no":
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
