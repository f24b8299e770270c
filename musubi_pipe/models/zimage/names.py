"""Z-Image module and tensor names: the official (ComfyUI) single file, diffusers, musubi-tuner and LoRA files.

Three spellings of one DiT meet here (no torch):

- the official single file (Comfy-Org/z_image `z_image_turbo_bf16.safetensors`, ostris' De-Turbo, what
  ComfyUI loads as Lumina2): fused `layers.N.attention.qkv`, `attention.out`, `attention.q_norm`/`k_norm`,
  `x_embedder`, `final_layer`, `norm_final`; sometimes behind `model.diffusion_model.`;
- diffusers' `ZImageTransformer2DModel` (Tongyi-MAI's transformer/ folders): `attention.to_q`/`to_k`/`to_v`,
  `attention.to_out.0`, `attention.norm_q`/`norm_k`, `all_x_embedder.2-1`, `all_final_layer.2-1`;
- musubi-tuner's model, whose module names are diffusers' (`layers.0.attention.to_q`).

LoRA module names are musubi-tuner's (= diffusers' paths): it trains q, k and v as three modules, and ComfyUI
maps those names onto slices of its fused qkv (comfy/utils.py z_image_to_diffusers), so a file in the
`official` layout (`diffusion_model.layers.0.attention.to_q.lora_down.weight` + `.alpha`) loads in ComfyUI,
and musubi-tuner's own `lora_unet_layers_0_attention_to_q` names are the `musubi` layout.
"""

from __future__ import annotations

import re

BLOCK_LISTS = ("layers", "noise_refiner", "context_refiner")  # the DiT's ZImageTransformerBlock lists
# Linears of a ZImageTransformerBlock, diffusers' paths inside the block (context_refiner blocks have no
# adaLN_modulation); what musubi-tuner's networks/lora_zimage.py wraps
BLOCK_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
QKV = ("attention.to_q", "attention.to_k", "attention.to_v")  # rows of the official fused attention.qkv, in order

# official single-file name -> diffusers name (substring rules, as diffusers' single-file converter applies them)
OFFICIAL_TO_DIFFUSERS = (
    ("final_layer.", "all_final_layer.2-1."),
    ("x_embedder.", "all_x_embedder.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.k_norm.", ".attention.norm_k."),
    (".attention.q_norm.", ".attention.norm_q."),
)
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefix(name: str) -> str:
    """A DiT tensor name without ComfyUI's `model.diffusion_model.` (or `diffusion_model.`) prefix."""
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def dit_layout(names) -> str | None:
    """"official" (fused qkv), "diffusers" or None (not a Z-Image DiT) for prefix-stripped tensor names."""
    names = set(names)
    if not {"cap_embedder.1.weight", "x_pad_token", "cap_pad_token"} <= names:
        return None
    if "layers.0.attention.qkv.weight" in names and "x_embedder.weight" in names:
        return "official"
    if "layers.0.attention.to_q.weight" in names and "all_x_embedder.2-1.weight" in names:
        return "diffusers"
    return None


def official_to_diffusers_name(name: str) -> str:
    """Rename one official tensor (not the fused qkv, which is split) to its diffusers name."""
    for old, new in OFFICIAL_TO_DIFFUSERS:
        if old.startswith("."):
            name = name.replace(old, new)
        elif name.startswith(old):
            name = new + name[len(old):]
    return name


def diffusers_to_official_name(name: str) -> str:
    """Rename one diffusers tensor (not to_q/k/v, which are fused) to its official name."""
    for old, new in OFFICIAL_TO_DIFFUSERS:
        if new.startswith("."):
            name = name.replace(new, old)
        elif name.startswith(new):
            name = old + name[len(new):]
    return name


def qkv_name(name: str) -> str | None:
    """`layers.0.attention.qkv.weight` for `layers.0.attention.to_q.weight` (to_k, to_v), else None."""
    m = re.fullmatch(r"(.+\.attention\.)to_[qkv]\.weight", name)
    return f"{m.group(1)}qkv.weight" if m else None


# -- how LoRA files spell Z-Image modules (models.base.LoraNaming) -----------------------------------------------
_SUBPATH_BY_UNDERSCORED = {path.replace(".", "_"): path for path in BLOCK_LINEARS}
_UNDERSCORED = re.compile(r"^(layers|noise_refiner|context_refiner)_(\d+)_(.+)$")
_MODULE = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
# ComfyUI's own spelling of the attention output (its Lumina2 model), read as diffusers' to_out.0
_COMFY_OUT = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+\.attention\.)out$")


def block_module(name: str) -> bool:
    """Whether `name` (dotted) is a Linear of a ZImageTransformerBlock."""
    m = _MODULE.match(name)
    return bool(m) and m.group(3) in BLOCK_LINEARS


class ZImageLoraNaming:
    arch = "zimage"
    save_formats = ("official", "comfy", "musubi", "diffusers")
    default_save_format = "official"
    description = ("Z-Image block linears (layers_N_{" + ",".join(_SUBPATH_BY_UNDERSCORED) + "}, also in "
                   "noise_refiner_N_ / context_refiner_N_)")

    def claims(self, names) -> bool:
        return any(n.startswith(("layers", "noise_refiner", "context_refiner"))
                   and ("attention" in n or "feed_forward" in n) for n in names)

    def official_from_underscored(self, written: str) -> str | None:
        m = _UNDERSCORED.match(written)
        if m and m.group(3) in _SUBPATH_BY_UNDERSCORED:
            return f"{m.group(1)}.{m.group(2)}.{_SUBPATH_BY_UNDERSCORED[m.group(3)]}"
        return None

    def official_from_diffusers(self, name: str) -> str | None:
        m = _COMFY_OUT.match(name)
        return f"{m.group(1)}to_out.0" if m else None

    def diffusers_file_name(self, official: str) -> str | None:
        return official  # the module names are diffusers' paths

    def diffusers_problems(self, modules) -> list[str]:
        strays = sorted(m for m in modules if not block_module(m))
        if strays:
            return [f"modules {', '.join(strays[:5])} are not Linears of Z-Image's transformer blocks"]
        return []

    def ignored_by(self, save_format: str, modules) -> dict[str, tuple[list[str], str]]:
        # ComfyUI maps `diffusion_model.`/`transformer.` + diffusers paths onto its own modules (q/k/v onto slices of
        # its fused qkv); of the lora_unet_ names it matches only the feed-forward ones, whose names it shares
        # (measured with its code, docs/zimage.md); musubi-tuner reads lora_unet_ keys only
        if save_format == "musubi":
            lost = sorted(m for m in modules if ".feed_forward." not in m)
            return {"ComfyUI": (lost, "official")} if lost else {}
        return {"musubi-tuner": (sorted(modules), "musubi")}


LORA_NAMING = ZImageLoraNaming()
