"""State-dict key maps between diffusers and official Wan names: the DiT, the Wan2.1 VAE and the Wan2.2 VAE.

Official -> diffusers uses diffusers' own single-file converters where diffusers has one (the DiT and
the Wan2.1 VAE), so we read checkpoints exactly as `from_single_file` would. Diffusers 0.42's
single-file VAE converter only knows the Wan2.1 VAE, so the Wan2.2 VAE (Wan2.2_VAE.pth, TI2V-5B) is
converted with the rule tables below in both directions. Diffusers -> official (used to write tiny
models in the formats users download) is always the rule tables; every key must match a rule or it
is an error.

    official = dit_to_official(model.state_dict())
    assert dit_to_diffusers(official).keys() == model.state_dict().keys()
    official_vae = vae_to_official(vae.state_dict(), "2.2")     # "2.1" | "2.2" (WanTask.vae_version)
"""

from __future__ import annotations

import re

from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

from musubi_pipe.models.statedict import compile_rules, rename_keys, reverse_rules
from musubi_pipe.models.wan.locate import OFFICIAL_PREFIXES  # ComfyUI `model.diffusion_model.*` etc.
from musubi_pipe.models.wan.locate import strip_dit_prefix as strip_prefix
from musubi_pipe.models.wan.names import BLOCK_LINEARS

__all__ = ["OFFICIAL_PREFIXES", "dit_to_diffusers", "dit_to_official", "strip_prefix", "vae_to_diffusers",
           "vae_to_official"]
VAE_VERSIONS = ("2.1", "2.2")

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

VaeModules = list[tuple[str, str, list[tuple[str, str]]]]


def _vae_shared_modules() -> VaeModules:
    """(diffusers module, official module, sub-rules) for the parts both VAE versions name alike."""
    modules = [("quant_conv", "conv1", _CONV), ("post_quant_conv", "conv2", _CONV)]
    for side in ("encoder", "decoder"):
        modules += [
            (f"{side}.conv_in", f"{side}.conv1", _CONV),
            (f"{side}.mid_block.resnets.0", f"{side}.middle.0", _RESIDUAL),
            (f"{side}.mid_block.attentions.0", f"{side}.middle.1", _ATTENTION),
            (f"{side}.mid_block.resnets.1", f"{side}.middle.2", _RESIDUAL),
            (f"{side}.norm_out", f"{side}.head.0", [("gamma", "gamma")]),
            (f"{side}.conv_out", f"{side}.head.2", _CONV),
        ]
    return modules


def _vae21_modules() -> VaeModules:
    """Every module of the Wan2.1 VAE (Wan2.1_VAE.pth)."""
    modules = _vae_shared_modules()
    # both encoders are one flat list of residual blocks and downsamplers, same indices
    modules.append(("encoder.down_blocks.{}", "encoder.downsamples.{}", _RESIDUAL + _RESAMPLE))
    # The official decoder is one flat list: per level, 3 residual blocks then the upsampler. Wan2.1
    # has 4 levels (diffusers' converter hard-codes the same indices 0..14).
    for level in range(4):
        for i in range(3):
            modules.append((f"decoder.up_blocks.{level}.resnets.{i}", f"decoder.upsamples.{4 * level + i}", _RESIDUAL))
        modules.append((f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.upsamples.{4 * level + 3}", _RESAMPLE))
    return modules


# Wan2.2 VAE levels: (side, diffusers block list, diffusers resampler name, official list name).
# Official: `encoder.downsamples.L.downsamples.I` is level L's residual block I, and the index after
# the last residual block is the level's resampler (if the level has one); the same for the decoder
# with `upsamples`. Diffusers keeps the residual indices (`resnets.I`) and names the resampler.
_VAE22_LEVELS = [
    ("encoder", "down_blocks", "downsampler", "downsamples"),
    ("decoder", "up_blocks", "upsampler", "upsamples"),
]
_VAE22_DIFFUSERS_RESNET = re.compile(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.")
_VAE22_OFFICIAL_RESNET = re.compile(
    r"(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(?:residual|shortcut)\."
)


def _resnet_counts(keys, pattern: re.Pattern) -> dict[tuple[str, int], int]:
    """Return {(side, level): number of residual blocks} of a Wan2.2 VAE state dict, from its key names."""
    counts: dict[tuple[str, int], int] = {}
    for key in keys:
        m = pattern.match(key)
        if m:
            level = (m[1], int(m[2]))
            counts[level] = max(counts.get(level, 0), int(m[3]) + 1)
    return counts


def _vae22_modules(counts: dict[tuple[str, int], int]) -> VaeModules:
    """Every module of a Wan2.2 VAE (Wan2.2_VAE.pth) whose levels hold `counts` residual blocks."""
    modules = _vae_shared_modules()
    layout = {side: (blocks, sampler, official) for side, blocks, sampler, official in _VAE22_LEVELS}
    for (side, level), n_resnets in sorted(counts.items()):
        blocks, sampler, official = layout[side]
        prefix, official_prefix = f"{side}.{blocks}.{level}", f"{side}.{official}.{level}.{official}"
        modules.append((f"{prefix}.resnets.{{}}", f"{official_prefix}.{{}}", _RESIDUAL))
        modules.append((f"{prefix}.{sampler}", f"{official_prefix}.{n_resnets}", _RESAMPLE))
    return modules


def _flatten(modules: VaeModules) -> list[tuple[str, str]]:
    return [(f"{d}.{ds}", f"{o}.{os_}") for d, o, subs in modules for ds, os_ in subs]


_DIT_TO_OFFICIAL = compile_rules(_DIT_RULES)
_VAE21_TO_OFFICIAL = compile_rules(_flatten(_vae21_modules()))


def dit_to_diffusers(state_dict: dict) -> dict:
    """Official (optionally prefixed) DiT keys -> `WanTransformer3DModel` keys; the input is left as is."""
    return convert_wan_transformer_to_diffusers(strip_prefix(state_dict))


def dit_to_official(state_dict: dict) -> dict:
    """`WanTransformer3DModel` keys -> official Wan DiT keys; ValueError names a key with no rule."""
    return rename_keys(state_dict, _DIT_TO_OFFICIAL, "official Wan DiT name for diffusers")


def _check_version(version: str) -> None:
    if version not in VAE_VERSIONS:
        raise ValueError(f"unknown Wan VAE version {version!r}; expected one of {VAE_VERSIONS}")


def vae_to_diffusers(state_dict: dict, version: str) -> dict:
    """Official Wan VAE keys -> `AutoencoderKLWan` keys; `version` is "2.1" or "2.2" (WanTask.vae_version).

    Wan2.1 goes through diffusers' converter; Wan2.2 through the rule tables (ValueError names a key
    with no rule, e.g. a resampler at another index than right after its level's residual blocks).
    """
    _check_version(version)
    if version == "2.1":
        return convert_wan_vae_to_diffusers(dict(state_dict))
    rules = compile_rules(reverse_rules(_flatten(_vae22_modules(_resnet_counts(state_dict, _VAE22_OFFICIAL_RESNET)))))
    return rename_keys(state_dict, rules, "diffusers name for official Wan2.2 VAE")


def vae_to_official(state_dict: dict, version: str) -> dict:
    """`AutoencoderKLWan` keys -> official Wan VAE keys of `version`; ValueError names a key with no rule."""
    _check_version(version)
    if version == "2.1":
        return rename_keys(state_dict, _VAE21_TO_OFFICIAL, "official Wan2.1 VAE name for diffusers")
    rules = compile_rules(_flatten(_vae22_modules(_resnet_counts(state_dict, _VAE22_DIFFUSERS_RESNET))))
    return rename_keys(state_dict, rules, "official Wan2.2 VAE name for diffusers")
