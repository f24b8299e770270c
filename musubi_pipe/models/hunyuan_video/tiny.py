"""Write tiny, seeded HunyuanVideo DiTs and VAEs in the file formats users download, for tests and demos.

    dit = write_tiny_dit(root, "official")   # root/hunyuan-video-t2v-720p-tiny/transformers/mp_rank_00_model_states.pt
    vae = write_tiny_vae(root, "official")   # root/hunyuan-video-t2v-720p-tiny/vae/pytorch_model.pt

DiT variants (all with official key names except "diffusers"):

  official      hunyuan-video-t2v-720p-tiny/transformers/mp_rank_00_model_states.pt: torch.save of
                {"module": state dict} in bf16, as Tencent's DeepSpeed checkpoint
  fp8           mp_rank_00_model_states_fp8_tiny.safetensors: the same model (same seed), the Linear weights
                of the double/single blocks in float8_e4m3fn and everything else bf16 (a plain fp8 cast)
  skyreels_i2v  skyreels_hunyuan_i2v_tiny_bf16.safetensors: another seed and 32 input channels (latents +
                image latents), as Kijai's skyreels_hunyuan_i2v_bf16.safetensors
  diffusers     HunyuanVideo-tiny-diffusers/transformer/: save_pretrained of the "official" weights (bf16)

VAE variants: "official" -> hunyuan-video-t2v-720p-tiny/vae/pytorch_model.pt (a plain float32 state dict,
official = diffusers names) next to the official folder's config.json (class AutoencoderKLCausal3D);
"diffusers" -> HunyuanVideo-tiny-diffusers/vae/ (save_pretrained, the same weights).

Sizes: the DiT has hidden size 64 (2 heads of 32), 2 double, 2 single and 1 refiner block, patch
(1, 2, 2), 16 latent channels, text width TINY_TEXT_DIM (the tiny LLM's hidden size) and pooled width
TINY_POOLED_DIM (the tiny CLIP's); the VAE has HunyuanVideo's 16 latent channels and 8x spatial / 4x
temporal compression with 32 channels per level (the GroupNorm's 32 groups need that many), one
residual block per level. Every call writes the same bytes; files that already hold them are not
rewritten, and each file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from safetensors.torch import save

from musubi_pipe.models.tiny_files import json_bytes
from musubi_pipe.models.tiny_files import save_pretrained_files as _save_pretrained
from musubi_pipe.models.tiny_files import seeded as _seeded
from musubi_pipe.models.tiny_files import torch_bytes as _torch_save
from musubi_pipe.models.tiny_files import write_file as _write
from musubi_pipe.models.hunyuan_video.keymap import dit_to_official, vae_to_official
from musubi_pipe.models.hunyuan_video.loading import SCALING_FACTOR, rope_axes_dim

TINY_TEXT_DIM = 32  # hidden size of the tiny LLM text encoder (tiny_text.py)
TINY_POOLED_DIM = 24  # hidden size of the tiny CLIP-L text encoder (tiny_text.py)
TINY_HIDDEN, TINY_HEAD_DIM = 64, 32

TINY_DIT_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": TINY_HIDDEN // TINY_HEAD_DIM,
    "attention_head_dim": TINY_HEAD_DIM,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "guidance_embeds": True,
    "text_embed_dim": TINY_TEXT_DIM,
    "pooled_projection_dim": TINY_POOLED_DIM,
    "rope_axes_dim": rope_axes_dim(TINY_HEAD_DIM),
}
TINY_VAE_CONFIG = {
    "latent_channels": 16,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": SCALING_FACTOR,
}
# the official vae/ folder's config.json (class AutoencoderKLCausal3D), with the tiny sizes
_OFFICIAL_VAE_CONFIG = {
    "_class_name": "AutoencoderKLCausal3D",
    "act_fn": "silu",
    "block_out_channels": list(TINY_VAE_CONFIG["block_out_channels"]),
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": TINY_VAE_CONFIG["layers_per_block"],
    "norm_num_groups": 32,
    "out_channels": 3,
    "scaling_factor": SCALING_FACTOR,
    "time_compression_ratio": 4,
    "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "mid_block_add_attention": True,
}

# variant -> (seed, input channels); "fp8" and "diffusers" are the "official" model in other files
_DIT_MODELS = {"official": (0, 16), "fp8": (0, 16), "diffusers": (0, 16), "skyreels_i2v": (1, 32)}
_VAE_SEED = 2
OFFICIAL_ROOT = "hunyuan-video-t2v-720p-tiny"
DIFFUSERS_ROOT = "HunyuanVideo-tiny-diffusers"


def tiny_dit(variant: str = "official") -> HunyuanVideoTransformer3DModel:
    """The tiny DiT of `variant` in bf16, with diffusers' default (random, non-zero) initialisation."""
    if variant not in _DIT_MODELS:
        raise ValueError(f"no tiny HunyuanVideo DiT variant {variant!r}; expected one of {list(_DIT_MODELS)}")
    seed, in_channels = _DIT_MODELS[variant]
    config = {**TINY_DIT_CONFIG, "in_channels": in_channels}
    # .bfloat16(), not .to(dtype): diffusers' ModelMixin.to warns about fp32 modules this model does not have
    return _seeded(seed, lambda: HunyuanVideoTransformer3DModel(**config)).bfloat16().eval()


def tiny_vae() -> AutoencoderKLHunyuanVideo:
    """The tiny VAE in float32."""
    return _seeded(_VAE_SEED, lambda: AutoencoderKLHunyuanVideo(**TINY_VAE_CONFIG)).eval()


# --- writing --------------------------------------------------------------------------------------


def _official_state(variant: str) -> dict:
    return {k: v.contiguous() for k, v in dit_to_official(tiny_dit(variant).state_dict(), TINY_HIDDEN).items()}


def _fp8(state: dict) -> dict:
    """The Linear weights of the double/single blocks (2-D `.weight`s) in float8_e4m3fn, the rest as is."""
    return {name: value.to(torch.float8_e4m3fn) if name.startswith(("double_blocks.", "single_blocks."))
            and name.endswith(".weight") and value.ndim == 2 else value for name, value in state.items()}


def write_tiny_dit(root, variant: str = "official") -> Path:
    """Write the tiny DiT `variant` (see the module doc) under `root`; return the path to configure as model.dit."""
    root = Path(root)
    if variant == "official":
        path = root / OFFICIAL_ROOT / "transformers" / "mp_rank_00_model_states.pt"
        _write(path, _torch_save({"module": _official_state(variant)}))
    elif variant == "fp8":
        path = root / "mp_rank_00_model_states_fp8_tiny.safetensors"
        _write(path, save(_fp8(_official_state(variant))))
    elif variant == "skyreels_i2v":
        path = root / "skyreels_hunyuan_i2v_tiny_bf16.safetensors"
        _write(path, save(_official_state(variant)))
    elif variant == "diffusers":
        path = root / DIFFUSERS_ROOT / "transformer"
        _save_pretrained(tiny_dit(variant), path)
    else:
        raise ValueError(f"no tiny HunyuanVideo DiT variant {variant!r}; expected one of {list(_DIT_MODELS)}")
    return path


def write_tiny_vae(root, variant: str = "official") -> Path:
    """Write the tiny VAE as "official" (vae/pytorch_model.pt + config.json) or "diffusers" (vae/ folder)
    under `root`; return the path to configure as model.vae."""
    root = Path(root)
    if variant == "official":
        folder = root / OFFICIAL_ROOT / "vae"
        path = folder / "pytorch_model.pt"
        _write(path, _torch_save({k: v.contiguous() for k, v in vae_to_official(tiny_vae().state_dict()).items()}))
        _write(folder / "config.json", json_bytes(_OFFICIAL_VAE_CONFIG))
        return path
    if variant == "diffusers":
        path = root / DIFFUSERS_ROOT / "vae"
        _save_pretrained(tiny_vae(), path)
        return path
    raise ValueError(f"no tiny HunyuanVideo VAE variant {variant!r}; expected 'official' or 'diffusers'")
