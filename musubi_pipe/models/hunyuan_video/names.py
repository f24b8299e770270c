"""HunyuanVideo module names: official checkpoint paths (what LoRA files use) <-> diffusers paths. No torch.

LoRA files name modules as the official checkpoint does (`double_blocks.0.img_attn_qkv`): ComfyUI,
musubi-tuner, diffusion-pipe and diffusers' HunyuanVideo LoRA loader all read those names. The model in
memory is diffusers' `HunyuanVideoTransformer3DModel`, which splits some official modules: a fused
module maps to several diffusers Linears fed the same input (network.fused.FusedLinear trains it as one).

The LoRA candidates are musubi-tuner's: every Linear of the double and single stream blocks; like musubi-tuner,
the family's default exclude pattern leaves the modulation Linears (img_mod, txt_mod, modulation) out.
"""

from __future__ import annotations

import re

# official sub-path in a double block -> diffusers sub-path(s) in transformer_blocks.N (several: fused)
DOUBLE_LINEARS: dict[str, tuple[str, ...]] = {
    "img_mod.linear": ("norm1.linear",),
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "txt_mod.linear": ("norm1_context.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
}
# official sub-path in a single block -> diffusers sub-path(s) in single_transformer_blocks.N
SINGLE_LINEARS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.linear": ("norm.linear",),
}
# parts of a fused module that diffusers feeds the very same input tensor (network.fused.FusedLinear groups):
# a single block gives proj_mlp the normed states and to_q/k/v a concatenation of their slices
INPUT_GROUPS = {"linear1": ((0, 1, 2), (3,))}
BLOCK_KINDS = {  # official block list -> (diffusers block list, its linears)
    "double_blocks": ("transformer_blocks", DOUBLE_LINEARS),
    "single_blocks": ("single_transformer_blocks", SINGLE_LINEARS),
}
_OFFICIAL = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_UNDERSCORED = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_UNDERSCORED_SUBPATHS = {kind: {sub.replace(".", "_"): sub for sub in linears}
                         for kind, (_, linears) in BLOCK_KINDS.items()}
# official sub-paths ComfyUI's HunyuanVideo model spells otherwise (its lora_unet_ names use its own spelling)
_COMFY_RENAMED = re.compile(r"(mlp\.fc[12]|_mod\.linear|modulation\.linear)$")
# modules diffusers' HunyuanVideo LoRA converter mishandles (lora-formats.md 3.2): never written for diffusers
DIFFUSERS_BROKEN = (re.compile(r"^txt_in\.individual_token_refiner\..*self_attn_qkv$"),
                    re.compile(r"^final_layer\.adaLN_modulation\.1$"))


def diffusers_parts(official: str) -> tuple[str, ...] | None:
    """The diffusers module paths of an official block linear (several for a fused one), else None.

    `double_blocks.3.img_attn_qkv` -> (`transformer_blocks.3.attn.to_q`, `...to_k`, `...to_v`).
    """
    m = _OFFICIAL.match(official)
    if not m:
        return None
    diffusers_kind, linears = BLOCK_KINDS[m.group(1)]
    parts = linears.get(m.group(3))
    return None if parts is None else tuple(f"{diffusers_kind}.{m.group(2)}.{p}" for p in parts)


def input_groups(official: str):
    """The FusedLinear groups of an official fused module (None: all its parts get the same tensor)."""
    return INPUT_GROUPS.get(official.rsplit(".", 1)[-1])


def block_linears(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """{official name: diffusers part paths} of every default LoRA target of a model with these block counts."""
    names = [f"double_blocks.{i}.{sub}" for i in range(num_double) for sub in DOUBLE_LINEARS]
    names += [f"single_blocks.{i}.{sub}" for i in range(num_single) for sub in SINGLE_LINEARS]
    return {name: diffusers_parts(name) for name in names}


class HunyuanLoraNaming:
    """How HunyuanVideo LoRA files spell modules (models.base.LoraNaming)."""

    arch = "hunyuan_video"
    save_formats = ("official", "musubi", "comfy", "diffusers")
    default_save_format = "official"
    description = ("HunyuanVideo block linears (double_blocks_N_{img,txt}_{attn_qkv,attn_proj,mlp_fc1,mlp_fc2,"
                   "mod_linear}, single_blocks_N_{linear1,linear2,modulation_linear})")

    def claims(self, names) -> bool:
        """Whether module names (dotted or underscored) are HunyuanVideo's."""
        return any(n.startswith(("double_blocks", "single_blocks")) for n in names)

    def official_from_underscored(self, written: str) -> str | None:
        m = _UNDERSCORED.match(written)
        if not m:
            return None
        sub = _UNDERSCORED_SUBPATHS[m.group(1)].get(m.group(3))
        return None if sub is None else f"{m.group(1)}.{m.group(2)}.{sub}"

    def official_from_diffusers(self, name: str) -> str | None:
        # diffusers-named HunyuanVideo LoRAs split fused modules; they are not read (see diffusers_file_name)
        return None

    def diffusers_file_name(self, official: str) -> str | None:
        """diffusers' HunyuanVideo loader converts official names itself, so a diffusers file keeps them."""
        return None if any(p.match(official) for p in DIFFUSERS_BROKEN) else official

    def ignored_by(self, save_format: str, modules) -> dict[str, tuple[list[str], str]]:
        # musubi-tuner reads lora_unet_ keys only. ComfyUI reads lora_unet_ + its own module names underscored,
        # which differ from the official ones for the MLPs (mlp.0 / mlp.2) and modulation (mod.lin, modulation.lin)
        if save_format != "musubi":
            return {"musubi-tuner": (sorted(modules), "musubi")}
        lost = sorted(m for m in modules if _COMFY_RENAMED.search(m))
        return {"ComfyUI": (lost, "official")} if lost else {}

    def diffusers_problems(self, modules) -> list[str]:
        problems = []
        broken = sorted(m for m in modules if any(p.match(m) for p in DIFFUSERS_BROKEN))
        if broken:
            problems.append(f"modules {', '.join(broken[:5])} are mishandled by diffusers' HunyuanVideo LoRA "
                            "converter; exclude them (network.exclude_patterns) or save another format")
        if not any(m.endswith("img_attn_qkv") for m in modules):
            problems.append("diffusers reads a HunyuanVideo LoRA in the official layout only when it has an "
                            "img_attn_qkv module (otherwise it takes the file for diffusers-named keys); train "
                            "double_blocks.N.img_attn_qkv or save another format")
        return problems


LORA_NAMING = HunyuanLoraNaming()
