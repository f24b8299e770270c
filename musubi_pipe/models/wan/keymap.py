"""State-dict key maps between diffusers and official Wan2.1 names, for the DiT and the VAE.

Official -> diffusers uses diffusers' own single-file converters, so we read checkpoints exactly as
`from_single_file` would. Diffusers -> official (used to write tiny models in the format users
download) is the explicit rule tables below; every key must match a rule or it is an error.

    official = dit_to_official(model.state_dict())
    assert dit_to_diffusers(official).keys() == model.state_dict().keys()
"""

from __future__ import annotations

import re

from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

from musubi_pipe.models.wan.names import BLOCK_LINEARS

# ComfyUI saves the DiT as `model.diffusion_model.*`, some repacks as `diffusion_model.*`.
OFFICIAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# Rule = (diffusers key template, official key template). `{}` is a block index and `*` a parameter
# name (weight, bias, gamma); both are copied across in order.
_DIT_RULES: list[tuple[str, str]] = [
    ("patch_embedding.*", "patch_embedding.*"),
    ("condition_embedder.time_embedder.linear_1.*", "time_embedding.0.*"),
    ("condition_embedder.time_embedder.linear_2.*", "time_embedding.2.*"),
    ("condition_embedder.time_proj.*", "time_projection.1.*"),
    ("condition_embedder.text_embedder.linear_1.*", "text_embedding.0.*"),
    ("condition_embedder.text_embedder.linear_2.*", "text_embedding.2.*"),
    *[(d + ".*", o + ".*") for d, o in BLOCK_LINEARS],
    ("blocks.{}.attn1.norm_q.weight", "blocks.{}.self_attn.norm_q.weight"),
    ("blocks.{}.attn1.norm_k.weight", "blocks.{}.self_attn.norm_k.weight"),
    ("blocks.{}.attn2.norm_q.weight", "blocks.{}.cross_attn.norm_q.weight"),
    ("blocks.{}.attn2.norm_k.weight", "blocks.{}.cross_attn.norm_k.weight"),
    ("blocks.{}.attn2.norm_added_k.weight", "blocks.{}.cross_attn.norm_k_img.weight"),
    # diffusers' norm2 is the affine cross-attention pre-norm, which the official model calls norm3
    # (official norm2, the FFN pre-norm, has no parameters)
    ("blocks.{}.norm2.*", "blocks.{}.norm3.*"),
    ("blocks.{}.scale_shift_table", "blocks.{}.modulation"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.*", "head.head.*"),
    # Wan2.1 I2V CLIP image projection
    ("condition_embedder.image_embedder.norm1.*", "img_emb.proj.0.*"),
    ("condition_embedder.image_embedder.ff.net.0.proj.*", "img_emb.proj.1.*"),
    ("condition_embedder.image_embedder.ff.net.2.*", "img_emb.proj.3.*"),
    ("condition_embedder.image_embedder.norm2.*", "img_emb.proj.4.*"),
]

# Sub-module rules of the VAE's building blocks: (diffusers suffix, official suffix).
_CONV = [("*", "*")]
_RESIDUAL = [
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.*", "residual.2.*"),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.*", "residual.6.*"),
    ("conv_shortcut.*", "shortcut.*"),
]
_RESAMPLE = [("resample.1.*", "resample.1.*"), ("time_conv.*", "time_conv.*")]
_ATTENTION = [("norm.gamma", "norm.gamma"), ("to_qkv.*", "to_qkv.*"), ("proj.*", "proj.*")]


def _vae_modules() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Return (diffusers module, official module, sub-rules) for every module of the Wan2.1 VAE."""
    modules = [
        ("quant_conv", "conv1", _CONV),
        ("post_quant_conv", "conv2", _CONV),
        # both encoders are one flat list of residual blocks and downsamplers, same indices
        ("encoder.down_blocks.{}", "encoder.downsamples.{}", _RESIDUAL + _RESAMPLE),
    ]
    for side in ("encoder", "decoder"):
        modules += [
            (f"{side}.conv_in", f"{side}.conv1", _CONV),
            (f"{side}.mid_block.resnets.0", f"{side}.middle.0", _RESIDUAL),
            (f"{side}.mid_block.attentions.0", f"{side}.middle.1", _ATTENTION),
            (f"{side}.mid_block.resnets.1", f"{side}.middle.2", _RESIDUAL),
            (f"{side}.norm_out", f"{side}.head.0", [("gamma", "gamma")]),
            (f"{side}.conv_out", f"{side}.head.2", _CONV),
        ]
    # The official decoder is one flat list: per level, 3 residual blocks then the upsampler. Wan2.1
    # has 4 levels (diffusers' converter hard-codes the same indices 0..14).
    for level in range(4):
        for i in range(3):
            modules.append((f"decoder.up_blocks.{level}.resnets.{i}", f"decoder.upsamples.{4 * level + i}", _RESIDUAL))
        modules.append((f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.upsamples.{4 * level + 3}", _RESAMPLE))
    return modules


_VAE_RULES: list[tuple[str, str]] = [
    (f"{d}.{ds}", f"{o}.{os_}") for d, o, subs in _vae_modules() for ds, os_ in subs
]


def _compile(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for src, dst in rules:
        regex = re.escape(src).replace(r"\{\}", r"(\d+)").replace(r"\*", r"(\w+)")
        compiled.append((re.compile(regex), dst.replace("*", "{}")))
    return compiled


_DIT_TO_OFFICIAL = _compile(_DIT_RULES)
_VAE_TO_OFFICIAL = _compile(_VAE_RULES)


def _rename(state_dict: dict, rules: list[tuple[re.Pattern, str]], what: str) -> dict:
    out = {}
    for key, value in state_dict.items():
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                out[template.format(*m.groups())] = value
                break
        else:
            raise ValueError(f"no official Wan {what} name for diffusers key {key!r}")
    return out


def strip_prefix(state_dict: dict) -> dict:
    """Drop a ComfyUI-style `model.diffusion_model.` / `diffusion_model.` prefix from each key."""
    out = {}
    for key, value in state_dict.items():
        for prefix in OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def dit_to_diffusers(state_dict: dict) -> dict:
    """Official (optionally prefixed) DiT keys -> `WanTransformer3DModel` keys; the input is left as is."""
    return convert_wan_transformer_to_diffusers(strip_prefix(state_dict))


def dit_to_official(state_dict: dict) -> dict:
    """`WanTransformer3DModel` keys -> official Wan DiT keys; ValueError names a key with no rule."""
    return _rename(state_dict, _DIT_TO_OFFICIAL, "DiT")


def vae_to_diffusers(state_dict: dict) -> dict:
    """Official Wan2.1 VAE keys -> `AutoencoderKLWan` keys."""
    return convert_wan_vae_to_diffusers(state_dict)


def vae_to_official(state_dict: dict) -> dict:
    """`AutoencoderKLWan` keys -> official Wan2.1 VAE keys; ValueError names a key with no rule."""
    return _rename(state_dict, _VAE_TO_OFFICIAL, "VAE")
