"""Z-Image state dicts between the official (ComfyUI) single-file names and diffusers', for the DiT and the VAE.

Into diffusers (loading) this uses diffusers' own single-file converters: `convert_z_image_transformer_
checkpoint_to_diffusers` (the DiT: qkv split, renames) and `convert_ldm_vae_checkpoint` (FLUX.1's
ae.safetensors). The other way (writing the tiny models' official files, `tools merge` output in the official
layout) is written here; tests check that diffusers' converters take each result back to the original.
"""

from __future__ import annotations

import re

from musubi_pipe.models.zimage.names import QKV, diffusers_to_official_name, qkv_name, strip_prefix

# diffusers AutoencoderKL arguments of the FLUX.1 VAE not visible in its tensor shapes
VAE_FIXED_CONFIG = {"in_channels": 3, "out_channels": 3, "norm_num_groups": 32, "scaling_factor": 0.3611,
                    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
                    "mid_block_add_attention": True, "act_fn": "silu"}


# --- the DiT --------------------------------------------------------------------------------------


def dit_to_diffusers(state: dict) -> dict:
    """An official (or ComfyUI-prefixed) DiT state dict in diffusers' names; diffusers-named input is returned with
    only the prefix stripped."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = {strip_prefix(name): value for name, value in state.items()}
    if "layers.0.attention.qkv.weight" not in state:
        return state
    return convert_z_image_transformer_checkpoint_to_diffusers(state)


def dit_to_official(state: dict) -> dict:
    """A diffusers-named DiT state dict in the official single-file names: to_q/to_k/to_v fused into qkv (rows in
    that order), the rest renamed; `norm_final.weight` (which diffusers drops) is not recreated."""
    import torch

    out, fused = {}, {}
    for name, value in state.items():
        target = qkv_name(name)
        if target is None:
            out[diffusers_to_official_name(name)] = value
        else:
            fused.setdefault(target, {})[re.search(r"to_[qkv]", name).group(0)] = value
    for target, parts in fused.items():
        out[diffusers_to_official_name(target)] = torch.cat([parts[p.split(".")[-1]] for p in QKV], dim=0)
    return out


# --- the VAE --------------------------------------------------------------------------------------


def vae_config(signature: dict) -> dict:
    """diffusers AutoencoderKL arguments for a locate.vae_signature."""
    blocks = len(signature["block_out_channels"])
    return {**VAE_FIXED_CONFIG, "latent_channels": signature["latent_channels"],
            "block_out_channels": tuple(signature["block_out_channels"]),
            "layers_per_block": signature["layers_per_block"],
            "down_block_types": ("DownEncoderBlock2D",) * blocks, "up_block_types": ("UpDecoderBlock2D",) * blocks}


def vae_to_diffusers(state: dict, config: dict) -> dict:
    """A VAE state dict with FLUX's original names (ae.safetensors) in diffusers' names, by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(dict(state), config)


_VAE_RULES = [  # diffusers -> original, applied in order (the up blocks are reversed separately)
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_q\.", ".mid.attn_1.q."),
    (r"\.mid_block\.attentions\.0\.to_k\.", ".mid.attn_1.k."),
    (r"\.mid_block\.attentions\.0\.to_v\.", ".mid.attn_1.v."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.resnets\.", ".block."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def vae_to_original(state: dict, num_blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict in FLUX's original names (ae.safetensors): the attention's Linear
    weights become 1x1 convolutions, and decoder up block i is the original up.(num_blocks - 1 - i)."""
    out = {}
    for name, value in state.items():
        name = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up.{num_blocks - 1 - int(m.group(1))}.", name)
        for pattern, replacement in _VAE_RULES:
            name = re.sub(pattern, replacement, name)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[name] = value
    return out
