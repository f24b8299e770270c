"""LoRA for Linear layers, sd-scripts/musubi style: `lora_unet_<official name>` modules hooked into the base model's forwards.

The base model is never restructured: each LoRA module swaps its target's `forward` for its own, so the base model's
module tree and state-dict keys stay those of the checkpoint, and the LoRA state dict is exactly the musubi file format
(`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from musubi_pipe.errors import UserError

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
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


class LoRAModule(nn.Module):
    """A low-rank update of one nn.Linear: y = org(x) + up(down(x)) * multiplier * alpha / dim."""

    def __init__(
        self,
        name: str,
        org_module: nn.Linear,
        lora_dim: int,
        alpha: float | None = None,
        multiplier: float = 1.0,
        dropout: float | None = None,
    ):
        super().__init__()
        if not isinstance(org_module, nn.Linear):
            raise TypeError(f"{name}: LoRA targets must be nn.Linear, got {type(org_module).__name__}")
        if lora_dim <= 0:
            raise ValueError(f"{name}: LoRA dim must be positive, got {lora_dim}")
        self.lora_name = name
        self.lora_dim = lora_dim
        # Created on the CPU in float32 whatever the base model's device: the initial weights then depend on the seed
        # only, and the trainer moves/casts the network where it needs it.
        self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
        self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(lora_dim) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        # A Python float, so that forward never reads the alpha buffer back from the device.
        self.scale = alpha / lora_dim
        self.multiplier = float(multiplier)
        self.dropout = dropout
        # Held outside nn.Module's registry: registering it would put the base weights into this module's parameters
        # and state dict.
        object.__setattr__(self, "org_module", org_module)
        self._org_forward = None
        self._had_instance_forward = False

    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the base module's calls through this module (idempotent)."""
        if self.applied:
            return
        self._had_instance_forward = "forward" in self.org_module.__dict__
        self._org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the base module its own forward back (idempotent)."""
        if not self.applied:
            return
        if self._had_instance_forward:
            self.org_module.forward = self._org_forward
        else:
            # Drop the instance attribute rather than pinning the bound class method, so the module is as it was.
            del self.org_module.__dict__["forward"]
        self._org_forward = None

    def refresh_scale(self) -> None:
        """Recompute `scale` from the alpha buffer (after new weights were loaded into it); alpha 0 means alpha = dim."""
        alpha = float(self.alpha)
        self.scale = (alpha if alpha else self.lora_dim) / self.lora_dim

    def delta_weight(self) -> torch.Tensor:
        """The float32 weight update up @ down * scale (multiplier not applied)."""
        up = self.lora_up.weight.detach().float()
        down = self.lora_down.weight.detach().float()
        return (up @ down) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org = self._org_forward(x)
        lx = x.to(self.lora_down.weight.dtype)
        if self.dropout:
            lx = nn.functional.dropout(lx, p=self.dropout, training=self.training)
        lx = self.lora_up(self.lora_down(lx))
        # Back to the base output's dtype, so the LoRA never changes the dtype flowing through the base model.
        return org + (lx * (self.multiplier * self.scale)).to(org.dtype)


class LoRANetwork(nn.Module):
    """LoRA modules for a set of Linear layers named by their official (checkpoint) module names."""

    def __init__(
        self,
        targets: Mapping[str, nn.Linear],
        network_dim: int,
        network_alpha: float | None,
        multiplier: float = 1.0,
        prefix: str = "lora_unet",
        dropout: float | None = None,
    ):
        super().__init__()
        if not targets:
            raise ValueError("LoRANetwork needs at least one target module")
        self.prefix = prefix
        # Kept for the reverse mapping: official_name(name, network.official_names, network.prefix).
        self.official_names = list(targets)
        modules: dict[str, LoRAModule] = {}
        sources: dict[str, str] = {}
        for official, module in targets.items():
            name = lora_name(official, prefix)
            if name in sources:
                raise ValueError(f"official names {sources[name]!r} and {official!r} both map to {name!r}")
            sources[name] = official
            modules[name] = LoRAModule(name, module, network_dim, network_alpha, multiplier, dropout)
        self.loras = nn.ModuleDict(modules)

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
        """Share `other`'s LoRA weights: each network then applies the same LoRA to its own base modules.

        Used for one LoRA trained on several DiTs with the same module names (Wan2.2's two experts).
        """
        if set(self.loras) != set(other.loras):
            raise ValueError("tied LoRA networks must have the same module names")
        for name, module in self.loras.items():
            source = other.loras[name]
            module.lora_down, module.lora_up = source.lora_down, source.lora_up
            module.alpha = source.alpha
            module.scale = source.scale

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
            raise UserError(_key_mismatch_message(source, unknown, missing, next(iter(self.loras))))
        for key, value in sd.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise UserError(
                    f"{source}: {key} has shape {list(value.shape)}, the network expects {list(own[key].shape)} "
                    "(was it trained with another network_dim or for another model variant?)"
                )
        self.loras.load_state_dict(dict(sd), strict=True)
        for m in self.loras.values():
            m.refresh_scale()

    @torch.no_grad()
    def merge_into_base(self, multiplier: float = 1.0) -> None:
        """Add every LoRA update into its base weight (in the base weight's dtype) and restore the base forwards."""
        self.restore()
        for m in self.loras.values():
            weight = m.org_module.weight
            merged = weight.float() + m.delta_weight().to(weight.device) * multiplier
            weight.copy_(merged.to(weight.dtype))


def _key_mismatch_message(source: str, unknown: list[str], missing: list[str], example: str) -> str:
    lines = [f"{source} does not match the LoRA network:"]
    for label, keys in (("unexpected keys", unknown), ("missing keys", missing)):
        if keys:
            more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(keys[:_MAX_LISTED])}{more}")
    suffixes = ", ".join(f"{example}.{s}" for s in LORA_SUFFIXES)
    lines.append(f"  expected the musubi/sd-scripts format, three keys per module, e.g. {suffixes}")
    return "\n".join(lines)
