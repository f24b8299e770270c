"""LoRA for Linear layers, sd-scripts/musubi style: `lora_unet_<official name>` modules hooked into the base model's forwards.

The base model is never restructured: each adapter module swaps its target's `forward` for its own, so the base
model's module tree and state-dict keys stay those of the checkpoint, and the adapter state dict is exactly the musubi
file format (`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` for LoRA).

`AdapterModule` holds what every adapter type shares (hooking, multiplier, alpha/scale, module dropout);
`LoRAModule` is the LoRA one and `network.lycoris` adds LoHa and LoKr. `LoRANetwork` is generic over its module
class: one network type (tie_to, state dict I/O, merge, multiplier) for LoRA, LoHa and LoKr. Used by the trainer
(`training.loop`), the sample stage and `network.factory`, which builds networks from the `network` config group.

Dropouts (musubi-tuner semantics, only in training mode, drawn from torch's global RNG of the tensors' device):
- `dropout` (network.network_dropout): "neuron" dropout on the LoRA down-projection output;
- `rank_dropout`: a per-sample mask over the rank dimension of the down output, rescaled by 1/(1-p);
- `module_dropout`: skip the whole adapter for one forward with probability p.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from musubi_pipe.errors import UserError
from musubi_pipe.network.fused import FusedLinear
from musubi_pipe.network.settings import check_probability

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
# A key suffix that only one adapter type writes -> that type (how a file's network type is recognised).
KIND_MARKERS = {
    "lora_down.weight": "lora",
    "lora_up.weight": "lora",
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "lokr_w1": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
}
KIND_TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
_MAX_LISTED = 10


def lora_name(official: str, prefix: str = "lora_unet") -> str:
    """Return the LoRA module name of an official module name (`blocks.0.self_attn.q` -> `lora_unet_blocks_0_self_attn_q`)."""
    return f"{prefix}_{official.replace('.', '_')}"


def official_name(name: str, known_official_names: Iterable[str], prefix: str = "lora_unet") -> str:
    """Return the official module name that `name` was made from, looked up among `known_official_names`.

    '_' -> '.' cannot be undone by string rules (`self_attn` keeps its underscore), so the reverse mapping is a lookup.
    """
    by_lora_name = {lora_name(o, prefix): o for o in known_official_names}
    if name not in by_lora_name:
        raise UserError(f"LoRA module {name!r} matches no module of the model (expected names like {_example(by_lora_name)})")
    return by_lora_name[name]


def _example(names: Iterable[str]) -> str:
    first = next(iter(names), None)
    return repr(first) if first is not None else "<none: the model has no LoRA targets>"


def kinds_in_keys(keys: Iterable[str]) -> set[str]:
    """The adapter types ("lora", "loha", "lokr") whose marker key suffixes occur among `keys`."""
    found = set()
    for key in keys:
        suffix = key.split(".", 1)[1] if "." in key else ""
        if suffix in KIND_MARKERS:
            found.add(KIND_MARKERS[suffix])
    return found


class AdapterModule(nn.Module):
    """The parts every adapter of one nn.Linear shares: forward hooking, multiplier, alpha/scale, module dropout.

    Subclasses create their parameters, implement `delta_weight()` (float32 ΔW without multiplier) and
    `_update(x)` (the adapter's output for input x and the scale to apply, or None when module dropout skips
    it), and set KIND (the network_module name) and SUFFIXES (the state-dict key suffixes, for messages).

    The target may be a `FusedLinear` (network.fused): one official module that the model holds as several
    Linears fed the same input. Each part's forward is hooked and adds its rows of the update, so the saved
    weights are exactly the fused official module's. The update of a group of parts that get the same input
    tensor is computed once (by the first part called, with its dropout draws; the others reuse it, matched
    by the input's identity through a weak reference, so nothing is kept alive): one draw per group.
    """

    KIND: ClassVar[str] = ""
    SUFFIXES: ClassVar[tuple[str, ...]] = ()
    # What a shape mismatch on load probably means, for the error message.
    SHAPE_HINT: ClassVar[str] = "was it trained with another network_dim or for another model variant?"

    def __init__(
        self,
        name: str,
        org_module: nn.Linear,
        lora_dim: int,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, FusedLinear)):
            title = KIND_TITLES.get(self.KIND, "adapter")
            raise TypeError(f"{name}: {title} targets must be nn.Linear or FusedLinear, got {type(org_module).__name__}")
        if lora_dim <= 0:
            raise ValueError(f"{name}: network_dim must be positive, got {lora_dim}")
        self.lora_name = name
        self.lora_dim = lora_dim
        self.multiplier = float(multiplier)
        self.dropout = check_probability(dropout, "network.network_dropout")
        self.rank_dropout = check_probability(rank_dropout, "network.rank_dropout")
        self.module_dropout = check_probability(module_dropout, "network.module_dropout", allow_one=True)
        self.scale = 1.0
        # Held outside nn.Module's registry: registering it would put the base weights into this module's parameters
        # and state dict.
        object.__setattr__(self, "org_module", org_module)
        self._org_forward = None
        self._had_instance_forward = False
        # fused targets: per part (original forward, whether it was an instance attribute)
        self._part_forwards: list[tuple] = []
        self._shared: dict[int, tuple] = {}  # group -> (weakref to input, update, parts still to use it)

    # -- alpha and scale ------------------------------------------------------------------------
    def _init_alpha(self, alpha: float | None) -> None:
        """Register the `alpha` buffer (None or 0 -> alpha = dim) and set `scale` = alpha / dim."""
        alpha = float(self.lora_dim) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.refresh_scale()

    def refresh_scale(self) -> None:
        """Recompute `scale` from the alpha buffer (after new weights were loaded into it); alpha 0 means alpha = dim.

        `scale` is a Python float, so that forward never reads the alpha buffer back from the device.
        """
        alpha = float(self.alpha)
        self.scale = (alpha if alpha else self.lora_dim) / self.lora_dim

    # -- hooking ----------------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        return isinstance(self.org_module, FusedLinear)

    @property
    def applied(self) -> bool:
        return self._org_forward is not None or bool(self._part_forwards)

    def apply_to(self) -> None:
        """Route the base module's calls (each part's, for a fused target) through this module (idempotent)."""
        if self.applied:
            return
        if self.fused:
            for index, part in enumerate(self.org_module.parts):
                self._part_forwards.append((part.forward, "forward" in part.__dict__))
                part.forward = lambda x, index=index: self._part_forward(index, x)
            return
        self._had_instance_forward = "forward" in self.org_module.__dict__
        self._org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the base module its own forward back (idempotent)."""
        if not self.applied:
            return
        if self.fused:
            for part, (forward, had_instance) in zip(self.org_module.parts, self._part_forwards):
                _restore_forward(part, forward, had_instance)
            self._part_forwards, self._shared = [], {}
            return
        _restore_forward(self.org_module, self._org_forward, self._had_instance_forward)
        self._org_forward = None

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base module's own output (also when this module is called without being applied)."""
        return self._org_forward(x) if self._org_forward is not None else type(self.org_module).forward(self.org_module, x)

    def _update(self, x: torch.Tensor, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, float] | None:
        """(the adapter's output for x, its output rows `rows` (first, end) only when given, and the scale to
        apply), or None when module dropout skips it this forward."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.cat([self._part_forward(i, x) for i in range(len(self.org_module.parts))], dim=-1)
        org = self._base_forward(x)
        update = self._update(x)
        return org if update is None else self._add_delta(org, *update)

    def _part_forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part `index` of a fused target: its own output plus its rows of the fused update."""
        part = self.org_module.parts[index]
        forward = self._part_forwards[index][0] if self._part_forwards else part.forward
        org = forward(x)
        group, rows = self.org_module.group_of(index)
        update = self._group_update(group, rows, x)
        if update is None:
            return org
        first, end = self.org_module._ranges[index]
        return self._add_delta(org, update[0][..., first - rows[0]:end - rows[0]], update[1])

    def _group_update(self, group: int, rows: tuple[int, int], x: torch.Tensor):
        """The update of a group's rows for x: computed by the group's first part that sees x, reused by the
        others. x is matched by identity through a weak reference: a freed tensor cannot pass for it."""
        cached = self._shared.get(group)
        if cached is not None and cached[0]() is x:
            _, update, left = cached
        else:
            update, left = self._update(x, rows), len(self.org_module.groups[group])
        left -= 1
        if left > 0:
            self._shared[group] = (weakref.ref(x), update, left)
        else:
            self._shared.pop(group, None)
        return update

    # -- dropout ----------------------------------------------------------------------------------
    def _module_dropped(self) -> bool:
        """True when module dropout skips this adapter for the current forward (training mode only)."""
        return bool(self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout)

    # -- tying ------------------------------------------------------------------------------------
    def share_from(self, source: "AdapterModule") -> None:
        """Use `source`'s parameters, buffers and submodules (the same tensors) from now on."""
        if type(source) is not type(self):
            raise ValueError(f"{self.lora_name}: cannot tie a {type(self).__name__} to a {type(source).__name__}")
        for name, child in source.named_children():
            setattr(self, name, child)
        for name, param in source.named_parameters(recurse=False):
            setattr(self, name, param)
        for name, buf in source.named_buffers(recurse=False):
            setattr(self, name, buf)
        self.scale = source.scale

    # -- weights ----------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The float32 weight update ΔW (scale applied, multiplier not), shaped like the base weight."""
        raise NotImplementedError

    def _add_delta(self, org: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        """org + delta * multiplier * scale, rounded once to the base output's dtype.

        The adapter never changes the dtype flowing through the base model.
        """
        return org + (delta * (self.multiplier * scale)).to(org.dtype)


class LoRAModule(AdapterModule):
    """A low-rank update of one nn.Linear: y = org(x) + up(down(x)) * multiplier * alpha / dim."""

    KIND = "lora"
    SUFFIXES = LORA_SUFFIXES

    def __init__(
        self,
        name: str,
        org_module: nn.Linear,
        lora_dim: int,
        alpha: float | None = None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__(name, org_module, lora_dim, multiplier, dropout, rank_dropout, module_dropout)
        # Created on the CPU in float32 whatever the base model's device: the initial weights then depend on the seed
        # only, and the trainer moves/casts the network where it needs it.
        self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
        self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self._init_alpha(alpha)

    def delta_weight(self) -> torch.Tensor:
        """The float32 weight update up @ down * scale (multiplier not applied)."""
        up = self.lora_up.weight.detach().float()
        down = self.lora_down.weight.detach().float()
        return (up @ down) * self.scale

    def _update(self, x: torch.Tensor, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, float] | None:
        if self._module_dropped():
            return None
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            lx = lx * _rank_mask(lx, self.rank_dropout)
            scale = scale / (1.0 - self.rank_dropout)
        up = self.lora_up(lx) if rows is None else F.linear(lx, self.lora_up.weight[rows[0]:rows[1]])
        return up, scale


def _restore_forward(module: nn.Module, forward, had_instance_forward: bool) -> None:
    if had_instance_forward:
        module.forward = forward
    else:
        # Drop the instance attribute rather than pinning the bound class method, so the module is as it was.
        del module.__dict__["forward"]


def _rank_mask(lx: torch.Tensor, p: float) -> torch.Tensor:
    """A keep-mask over the last (rank) dimension of `lx`, drawn per sample (first dimension), as musubi does."""
    shape = (lx.shape[-1],) if lx.dim() == 1 else (lx.shape[0],) + (1,) * (lx.dim() - 2) + (lx.shape[-1],)
    return (torch.rand(shape, device=lx.device) > p).to(lx.dtype)


class LoRANetwork(nn.Module):
    """Adapter modules (LoRA by default, any AdapterModule class) for Linear layers (or FusedLinear views) named by
    their official names.

    `module_class` picks the adapter type; `module_kwargs` are extra constructor arguments for it (LoKr's factor).
    """

    module_class: ClassVar[type[AdapterModule]] = LoRAModule

    def __init__(
        self,
        targets: Mapping[str, nn.Linear],
        network_dim: int,
        network_alpha: float | None,
        multiplier: float = 1.0,
        prefix: str = "lora_unet",
        dropout: float | None = None,
        *,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        module_class: type[AdapterModule] | None = None,
        module_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not targets:
            raise ValueError("the network needs at least one target module")
        if module_class is not None:
            self.module_class = module_class
        check_probability(dropout, "network.network_dropout")
        check_probability(rank_dropout, "network.rank_dropout")
        check_probability(module_dropout, "network.module_dropout", allow_one=True)
        self.prefix = prefix
        self.network_dim = network_dim
        # Kept for the reverse mapping: official_name(name, network.official_names, network.prefix).
        self.official_names = list(targets)
        # Networks sharing this one's weights (tie_to, both directions): their buffers follow every load.
        self._tied: list[LoRANetwork] = []
        modules: dict[str, AdapterModule] = {}
        sources: dict[str, str] = {}
        for official, module in targets.items():
            name = lora_name(official, prefix)
            if name in sources:
                raise ValueError(f"official names {sources[name]!r} and {official!r} both map to {name!r}")
            sources[name] = official
            modules[name] = self.module_class(
                name, module, network_dim, network_alpha, multiplier, dropout,
                rank_dropout=rank_dropout, module_dropout=module_dropout, **dict(module_kwargs or {}),
            )  # fmt: skip
        self.loras = nn.ModuleDict(modules)

    @property
    def kind(self) -> str:
        """The adapter type: "lora", "loha" or "lokr"."""
        return self.module_class.KIND

    def apply_to(self) -> None:
        for m in self.loras.values():
            m.apply_to()

    def restore(self) -> None:
        for m in self.loras.values():
            m.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras.values():
            m.multiplier = float(multiplier)

    def tie_to(self, other: "LoRANetwork") -> None:
        """Share `other`'s adapter weights: each network then applies the same adapter to its own base modules.

        Used for one LoRA trained on several DiTs with the same module names (Wan2.2's two experts).
        """
        if self.module_class is not other.module_class:
            raise ValueError(f"cannot tie a {self.kind} network to a {other.kind} network")
        if set(self.loras) != set(other.loras):
            raise ValueError("tied networks must have the same module names")
        for name, module in self.loras.items():
            module.share_from(other.loras[name])
        group = {id(n): n for n in [self, other, *self._tied, *other._tied]}
        for network in group.values():
            network._tied = [n for n in group.values() if n is not network]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.loras.parameters() if p.requires_grad]

    def lora_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The musubi file tensors: independent, contiguous CPU copies in `dtype`."""
        return {
            k: v.detach().to(device="cpu", dtype=dtype, copy=True).contiguous() for k, v in self.loras.state_dict().items()
        }

    def load_lora_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "LoRA state dict") -> None:
        """Load musubi-format tensors; every key must match a module of this network exactly, with the same shape."""
        own = self.loras.state_dict()
        unknown = sorted(set(sd) - set(own))
        missing = sorted(set(own) - set(sd))
        if unknown or missing:
            raise UserError(_key_mismatch_message(self, source, unknown, missing, sd))
        for key, value in sd.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise UserError(
                    f"{source}: {key} has shape {list(value.shape)}, the network expects {list(own[key].shape)} "
                    f"({self.module_class.SHAPE_HINT})"
                )
        self.loras.load_state_dict(dict(sd), strict=True)
        for m in self.loras.values():
            m.refresh_scale()
        self._sync_tied()

    @torch.no_grad()
    def _sync_tied(self) -> None:
        """Copy this network's buffers (alpha) and scales into the networks tied to it.

        Parameters are shared objects, but `Module.to()` replaces buffers per module, so tied buffers may have
        become separate tensors.
        """
        for other in self._tied:
            for name, module in self.loras.items():
                twin = other.loras[name]
                twin_buffers = dict(twin.named_buffers())
                for buf_name, buf in module.named_buffers():
                    if twin_buffers[buf_name] is not buf:
                        twin_buffers[buf_name].copy_(buf)
                twin.scale = module.scale

    @torch.no_grad()
    def merge_into_base(self, multiplier: float = 1.0) -> None:
        """Add every adapter update into its base weight (in the base weight's dtype) and restore the base forwards."""
        self.restore()
        for m in self.loras.values():
            target = m.org_module
            parts = target.parts if isinstance(target, FusedLinear) else [target]
            ranges = target.row_ranges() if isinstance(target, FusedLinear) else [(0, target.out_features)]
            delta = m.delta_weight()
            for part, (first, end) in zip(parts, ranges):
                weight = part.weight
                merged = weight.float() + delta[first:end].to(weight.device) * multiplier
                weight.copy_(merged.to(weight.dtype))


def _key_mismatch_message(
    network: LoRANetwork, source: str, unknown: list[str], missing: list[str], sd: Mapping[str, torch.Tensor]
) -> str:
    """Explain a key mismatch on load: the keys at fault, the file's network type if it differs, the expected keys."""
    title = KIND_TITLES.get(network.kind, network.kind)
    lines = [f"{source} does not match the {title} network:"]
    for label, keys in (("unexpected keys", unknown), ("missing keys", missing)):
        if keys:
            more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(keys[:_MAX_LISTED])}{more}")
    file_kinds = kinds_in_keys(sd)
    if file_kinds and file_kinds != {network.kind}:
        names = " + ".join(KIND_TITLES[k] for k in sorted(file_kinds))
        lines.append(
            f"  the file holds {names} weights but the network is {title}: set network.network_module to "
            f"{sorted(file_kinds)[0]!r} to load it"
        )
    example = next(iter(network.loras))
    own_keys = [k for k in network.loras.state_dict() if k.startswith(example + ".")]
    lines.append(
        f"  expected the musubi/sd-scripts {title} format ({', '.join(network.module_class.SUFFIXES)} per module), "
        f"e.g. {', '.join(own_keys)}"
    )
    return "\n".join(lines)
