"""LoHa and LoKr adapters (LyCORIS algorithms, musubi-tuner's `networks.loha` / `networks.lokr`) for Linear layers.

Both hook the base nn.Linear's forward exactly like LoRA (they are `AdapterModule`s), live in the generic
`LoRANetwork` (tie_to, state dict I/O, merge, multiplier are shared) and write the LyCORIS/ComfyUI key names:

- LoHa: ΔW = scale·(W1a·W1b) ⊙ (W2a·W2b), keys `<name>.hada_w1_a` (out×r), `.hada_w1_b` (r×in), `.hada_w2_a`
  (out×r), `.hada_w2_b` (r×in), `.alpha`; scale = alpha / dim. Init (LyCORIS): w1_a ~ N(0, 0.1), w1_b and w2_b ~
  N(0, 1), w2_a = 0, so ΔW starts at zero.
- LoKr: in = in_m·in_n and out = out_l·out_k are factorized (`factorization`), ΔW = scale·(W1 ⊗ W2) with W1
  (out_l×in_m) `<name>.lokr_w1` (Kaiming-uniform) and W2 (out_k×in_n) either low-rank `.lokr_w2_a`·`.lokr_w2_b`
  (B zero) when dim < max(out_k, in_n)/2, or the full `.lokr_w2` (zero) otherwise, with alpha forced to dim
  (scale 1, what ComfyUI applies to a full W2); plus `.alpha`.

Dropouts: `module_dropout` skips the adapter for one forward, `dropout` (network.network_dropout) is neuron dropout
on the adapter's input (musubi's LoHa), `rank_dropout` masks LoHa's rank columns of W1a and W2a, rescaled by
1/(1-p), as musubi does. LoKr has no rank dropout (musubi-tuner ignores it too; the factory warns).

ΔW is computed in the adapter's dtype, y = org(x) + multiplier·F.linear(x, ΔW) is rounded once to the base output
dtype. Built by `network.factory.build_network` (network.network_module = "loha" / "lokr").
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from musubi_pipe.network.lora import AdapterModule, LoRANetwork

log = logging.getLogger("musubi_pipe")

LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w2 or lokr_w2_a + lokr_w2_b", "alpha")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m·n = dimension, as LyCORIS does.

    factor > 0 dividing `dimension`: (factor, dimension / factor), smaller first (512, 4 -> (4, 128)).
    Otherwise the most balanced pair whose smaller value is at most `factor` (factor -1: no bound), e.g.
    512 -> (16, 32), 1024 -> (32, 32), a prime p -> (1, p).
    """
    if dimension <= 0:
        raise ValueError(f"cannot factorize dimension {dimension}")
    if factor > 0 and dimension % factor == 0:
        m, n = sorted((factor, dimension // factor))
        return m, n
    limit = dimension if factor <= 0 else factor
    m = 1
    for d in range(2, math.isqrt(dimension) + 1):
        if d > limit:
            break
        if dimension % d == 0:
            m = d
    return m, dimension // m


class LoHaModule(AdapterModule):
    """A Hadamard product of two low-rank updates of one nn.Linear: ΔW = scale·(W1a·W1b) ⊙ (W2a·W2b)."""

    KIND = "loha"
    SUFFIXES = LOHA_SUFFIXES

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
        out_dim, in_dim = org_module.out_features, org_module.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, lora_dim))
        self.hada_w1_b = nn.Parameter(torch.empty(lora_dim, in_dim))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, lora_dim))
        self.hada_w2_b = nn.Parameter(torch.empty(lora_dim, in_dim))
        # LyCORIS' initialisation; w2_a = 0 makes ΔW zero at the start.
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        self._init_alpha(alpha)

    def _weight(self, training: bool) -> tuple[torch.Tensor, float]:
        """(W1a·W1b) ⊙ (W2a·W2b) with autograd, and the scale to apply (rank dropout rescales it)."""
        w1_a, w2_a, scale = self.hada_w1_a, self.hada_w2_a, self.scale
        if training and self.rank_dropout:
            mask = (torch.rand((1, self.lora_dim), device=w1_a.device) > self.rank_dropout).to(w1_a.dtype)
            w1_a, w2_a = w1_a * mask, w2_a * mask
            scale = scale / (1.0 - self.rank_dropout)
        return (w1_a @ self.hada_w1_b) * (w2_a @ self.hada_w2_b), scale

    def delta_weight(self) -> torch.Tensor:
        """The float32 update scale·(W1a·W1b) ⊙ (W2a·W2b) (multiplier not applied)."""
        w1 = self.hada_w1_a.detach().float() @ self.hada_w1_b.detach().float()
        w2 = self.hada_w2_a.detach().float() @ self.hada_w2_b.detach().float()
        return w1 * w2 * self.scale

    def _update(self, x: torch.Tensor, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, float] | None:
        if self._module_dropped():
            return None
        lx = x.to(self.hada_w1_a.dtype)
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        weight, scale = self._weight(self.training)
        return F.linear(lx, weight if rows is None else weight[rows[0]:rows[1]]), scale


class LoKrModule(AdapterModule):
    """A Kronecker-product update of one nn.Linear: ΔW = scale·(W1 ⊗ W2), W2 low-rank or full (see module doc)."""

    KIND = "lokr"
    SUFFIXES = LOKR_SUFFIXES
    SHAPE_HINT = "was it trained with another network_dim or lokr_factor, or for another model variant?"

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
        factor: int = -1,
    ):
        super().__init__(name, org_module, lora_dim, multiplier, dropout, None, module_dropout)
        in_m, in_n = factorization(org_module.in_features, factor)
        out_l, out_k = factorization(org_module.out_features, factor)
        self.factor = factor
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        # Full W2 when a rank-dim factorization of it would not be smaller (LyCORIS' rule).
        self.full_w2 = not lora_dim < max(out_k, in_n) / 2
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n))
            alpha = float(lora_dim)  # scale 1, as ComfyUI/LyCORIS apply a full W2
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, lora_dim))
            self.lokr_w2_b = nn.Parameter(torch.empty(lora_dim, in_n))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2_b)
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self._init_alpha(alpha)

    def refresh_scale(self) -> None:
        """alpha / dim for a low-rank W2; always 1 for a full W2 (ComfyUI ignores alpha there)."""
        if self.full_w2:
            self.scale = 1.0
        else:
            super().refresh_scale()

    def _w2(self, detach: bool = False) -> torch.Tensor:
        """W2 (out_k × in_n): the full matrix or lokr_w2_a @ lokr_w2_b."""
        if self.full_w2:
            return self.lokr_w2.detach().float() if detach else self.lokr_w2
        if detach:
            return self.lokr_w2_a.detach().float() @ self.lokr_w2_b.detach().float()
        return self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self) -> torch.Tensor:
        """The float32 update scale·kron(W1, W2) (multiplier not applied)."""
        return torch.kron(self.lokr_w1.detach().float(), self._w2(detach=True)) * self.scale

    def _update(self, x: torch.Tensor, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, float] | None:
        if self._module_dropped():
            return None
        lx = x.to(self.lokr_w1.dtype)
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        weight = torch.kron(self.lokr_w1, self._w2())
        return F.linear(lx, weight if rows is None else weight[rows[0]:rows[1]]), self.scale


class LoHaNetwork(LoRANetwork):
    """A LoRANetwork of LoHaModules (same constructor)."""

    module_class = LoHaModule


class LoKrNetwork(LoRANetwork):
    """A LoRANetwork of LoKrModules; `factor` is LoKr's factorization factor (-1: balanced)."""

    module_class = LoKrModule

    def __init__(self, targets, network_dim: int, network_alpha: float | None, multiplier: float = 1.0,
                 prefix: str = "lora_unet", dropout: float | None = None, *, factor: int = -1, **kwargs):
        if kwargs.get("rank_dropout"):
            log.warning("network.rank_dropout has no effect on LoKr (musubi-tuner ignores it too); remove it or use "
                        "network_module lora/loha")
        kwargs = {**kwargs, "module_kwargs": {**(kwargs.get("module_kwargs") or {}), "factor": factor}}
        super().__init__(targets, network_dim, network_alpha, multiplier, prefix, dropout, **kwargs)
        self.factor = factor
        full = [name for name, m in self.loras.items() if m.full_w2]
        if full:
            log.warning(
                "LoKr: %d of %d modules (e.g. %s) use a full lokr_w2 because network_dim=%d is at least half of "
                "their W2 size; their alpha is set to %d (scale 1). To keep W2 low-rank, lower network.network_dim "
                "or set network.lokr_factor to a small value (e.g. 4: W2 then gets dimension/4 columns).",
                len(full), len(self.loras), full[0], network_dim, network_dim,
            )
