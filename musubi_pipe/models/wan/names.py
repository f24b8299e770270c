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


# -- how LoRA files spell Wan modules (models.base.LoraNaming) -------------------------------------------
# Official block-linear sub-paths by their underscored spelling (`self_attn_q` -> `self_attn.q`).
BLOCK_SUBPATHS = {o.split("{}.", 1)[1].replace(".", "_"): o.split("{}.", 1)[1] for _, o in BLOCK_LINEARS}
_UNDERSCORED_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")
# Official Wan linears outside the blocks (lora-formats.md 2.1), for reading their underscored musubi names.
OTHER_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                 "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3")
_OTHER_BY_UNDERSCORED = {name.replace(".", "_"): name for name in OTHER_LINEARS}


class WanLoraNaming:
    arch = "wan"
    save_formats = ("musubi", "comfy", "official", "diffusers")
    default_save_format = "musubi"
    description = (f"Wan linears (blocks_N_{{{','.join(BLOCK_SUBPATHS)}}} or {', '.join(_OTHER_BY_UNDERSCORED)})")

    def claims(self, names) -> bool:
        return any(n.startswith("blocks") for n in names)

    def official_from_underscored(self, written: str) -> str | None:
        m = _UNDERSCORED_BLOCK.match(written)
        if m and m.group(2) in BLOCK_SUBPATHS:
            return f"blocks.{m.group(1)}.{BLOCK_SUBPATHS[m.group(2)]}"
        return _OTHER_BY_UNDERSCORED.get(written)

    def official_from_diffusers(self, name: str) -> str | None:
        return official_module_name(name) if diffusers_module_name(name) is None else None

    def diffusers_file_name(self, official: str) -> str | None:
        return diffusers_module_name(official)

    def diffusers_problems(self, modules) -> list[str]:
        strays = sorted(m for m in modules if diffusers_module_name(m) is None)
        if strays:
            return [f"modules {', '.join(strays[:5])} have no diffusers name (models/wan/names.py maps the block "
                    "linears only). Convert to comfy instead: diffusers loads that too"]
        return []

    def ignored_by(self, save_format: str, modules) -> dict[str, tuple[list[str], str]]:
        # musubi-tuner reads lora_unet_ keys only; ComfyUI maps no diffusers-named Wan key (lora-formats.md 1.2)
        ignored = {} if save_format == "musubi" else {"musubi-tuner": (sorted(modules), "musubi")}
        if save_format == "diffusers":
            ignored["ComfyUI"] = (sorted(modules), "musubi")
        return ignored


LORA_NAMING = WanLoraNaming()
