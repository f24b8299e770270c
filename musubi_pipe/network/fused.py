"""A fused linear of the official checkpoint that the diffusers model holds as several nn.Linear.

Official HunyuanVideo computes q, k and v with one Linear (`double_blocks.N.img_attn_qkv`, out 3·hidden)
and a single block's q, k, v and MLP input with another (`single_blocks.N.linear1`); the diffusers model
has `attn.to_q`, `attn.to_k`, `attn.to_v` (and `proj_mlp`), each fed the same input. A LoRA on the fused
module (what musubi-tuner trains and ComfyUI loads) is one down [rank, in] and one up [sum of outs, rank]:
its update for part i is the rows of up that part owns. `FusedLinear` presents the parts as that one
Linear, so adapters (network.lora.AdapterModule) train and save exactly the official module's LoRA.

    qkv = FusedLinear([attn.to_q, attn.to_k, attn.to_v])   # in_features, out_features, weight (concatenated)
    linear1 = FusedLinear([attn.to_q, attn.to_k, attn.to_v, proj_mlp], groups=[(0, 1, 2), (3,)])

It is not part of the model's module tree: the model keeps calling its parts, which the adapter hooks.
`groups` lists the parts that receive the very same input tensor (the adapter computes its update once
per group); diffusers' single blocks feed proj_mlp the normed states and to_q/k/v a concatenation of
slices of them (equal values, another tensor), hence two groups there.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Module):
    """Several nn.Linear taking the same input, seen as one Linear whose output rows are theirs in order."""

    def __init__(self, parts, groups=None):
        super().__init__()
        parts = list(parts)
        if not parts or not all(isinstance(p, nn.Linear) for p in parts):
            raise TypeError("FusedLinear needs one or more nn.Linear parts")
        if len({p.in_features for p in parts}) != 1:
            raise ValueError(f"fused parts must share in_features, got {[p.in_features for p in parts]}")
        # kept outside the module registry: the parts belong to the model, not to this view
        object.__setattr__(self, "parts", parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.groups = [tuple(g) for g in (groups or [range(len(parts))])]
        if [i for g in self.groups for i in g] != list(range(len(parts))):
            raise ValueError(f"groups {self.groups} must list the parts 0..{len(parts) - 1} once, in order")
        # fixed by the parts' shapes: worked out once here, not on every forward
        self._ranges, start = [], 0
        for part in parts:
            self._ranges.append((start, start + part.out_features))
            start += part.out_features
        self._group_of = {i: (number, (self._ranges[g[0]][0], self._ranges[g[-1]][1]))
                          for number, g in enumerate(self.groups) for i in g}

    def group_of(self, index: int) -> tuple[int, tuple[int, int]]:
        """(the group of part `index`, the output rows that group spans)."""
        return self._group_of[index]

    def row_ranges(self) -> list[tuple[int, int]]:
        """(first, end) output rows of each part within the fused output."""
        return list(self._ranges)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([p.weight for p in self.parts], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)
