"""Wan module names: diffusers `WanTransformer3DModel` paths <-> official Wan checkpoint paths.

LoRA files use the official names (what ComfyUI and musubi-tuner load); the model in memory is the
diffusers class. This table is the one place the two naming schemes meet for LoRA targets. No torch.
"""

from __future__ import annotations

import re

# (diffusers sub-path inside a block, official sub-path inside a block); `{}` is the block index.
BLOCK_LINEARS: list[tuple[str, str]] = [
    ("blocks.{}.attn1.to_q", "blocks.{}.self_attn.q"),
    ("blocks.{}.attn1.to_k", "blocks.{}.self_attn.k"),
    ("blocks.{}.attn1.to_v", "blocks.{}.self_attn.v"),
    ("blocks.{}.attn1.to_out.0", "blocks.{}.self_attn.o"),
    ("blocks.{}.attn2.to_q", "blocks.{}.cross_attn.q"),
    ("blocks.{}.attn2.to_k", "blocks.{}.cross_attn.k"),
    ("blocks.{}.attn2.to_v", "blocks.{}.cross_attn.v"),
    ("blocks.{}.attn2.to_out.0", "blocks.{}.cross_attn.o"),
    ("blocks.{}.attn2.add_k_proj", "blocks.{}.cross_attn.k_img"),
    ("blocks.{}.attn2.add_v_proj", "blocks.{}.cross_attn.v_img"),
    ("blocks.{}.ffn.net.0.proj", "blocks.{}.ffn.0"),
    ("blocks.{}.ffn.net.2", "blocks.{}.ffn.2"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


_TO_OFFICIAL = [(_compile(d), o) for d, o in BLOCK_LINEARS]
_TO_DIFFUSERS = [(_compile(o), d) for d, o in BLOCK_LINEARS]


def official_module_name(diffusers_name: str) -> str | None:
    """Return the official name of a diffusers block linear (`blocks.0.attn1.to_q` -> `blocks.0.self_attn.q`), else None."""
    for pattern, template in _TO_OFFICIAL:
        m = pattern.match(diffusers_name)
        if m:
            return template.format(m.group(1))
    return None


def diffusers_module_name(official_name: str) -> str | None:
    """Return the diffusers name of an official block linear (`blocks.0.ffn.0` -> `blocks.0.ffn.net.0.proj`), else None."""
    for pattern, template in _TO_DIFFUSERS:
        m = pattern.match(official_name)
        if m:
            return template.format(m.group(1))
    return None
