"""Load the Z-Image DiT and VAE from the files users have; the text encoder is in text.py.

    dit = load_dit("z_image_turbo_bf16.safetensors", "cuda", torch.bfloat16)   # frozen, eval
    vae = load_vae("ae.safetensors", "cuda", torch.float32)

Single files (official names with fused qkv, or diffusers names, any shard of a set) are converted by keymap.py
into diffusers' `ZImageTransformer2DModel` / `AutoencoderKL`, whose config is read off the tensors' shapes
(locate.dit_signature / vae_signature), so the real models and the tiny ones load the same way; diffusers
folders go through `from_pretrained`. locate.py decides what a path is before anything is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.statedict import assign_state, cast_state, empty_model, read_state_dict, state_shapes
from musubi_pipe.models.zimage.keymap import dit_to_diffusers, vae_config, vae_to_diffusers
from musubi_pipe.models.zimage.locate import DIT_HINT, VAE_HINT, check_dit, check_vae, dit_signature, vae_signature
from musubi_pipe.models.zimage.names import strip_prefix

# musubi-tuner's zimage_config: RoPE theta and lengths (the caption, height and width axes); the axes' widths
# are the head dim split as (1/4, 3/8, 3/8): 32, 48, 48 of Z-Image's 128 (the tiny 32: 8, 12, 12)
ROPE_THETA = 256.0
ROPE_AXES_LENS = (1536, 512, 512)


def _build(model_cls, config: dict, state: dict, dtype, path: Path, key: str, hint: str):
    model = empty_model(lambda: model_cls(**config))
    assign_state(model, cast_state(model, state, dtype), path, key, f"set {key}=<{hint}>")
    return model


def axes_dims(head_dim: int) -> list[int]:
    if head_dim % 8:
        raise ValueError(f"Z-Image head_dim {head_dim} is not a multiple of 8; no RoPE split is known")
    return [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]


def dit_config(signature: dict) -> dict:
    """`ZImageTransformer2DModel` keyword arguments for a locate.dit_signature."""
    return {"in_channels": signature["in_channels"], "dim": signature["dim"], "n_layers": signature["n_layers"],
            "n_refiner_layers": signature["n_refiner_layers"], "n_heads": signature["n_heads"],
            "n_kv_heads": signature["n_heads"], "cap_feat_dim": signature["cap_feat_dim"], "norm_eps": 1e-5,
            "qk_norm": True, "rope_theta": ROPE_THETA, "t_scale": 1000.0,
            "axes_dims": axes_dims(signature["head_dim"]), "axes_lens": list(ROPE_AXES_LENS)}


def load_dit(value, device, dtype, key: str = "model.dit") -> ZImageTransformer2DModel:
    """Load a frozen, eval-mode `ZImageTransformer2DModel` (locate.py: every accepted form). ConfigError on `key`
    when the file is not a Z-Image DiT or its tensors do not fit the model they describe."""
    source = check_dit(value, key)
    if source.kind == "pretrained":
        model = ZImageTransformer2DModel.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = dit_to_diffusers(read_state_dict(source.files, key))
        state.pop("norm_final.weight", None)
        signature = dit_signature(state_shapes(state))
        if signature is None:
            raise ConfigError([(key, f"{source.path} is not a Z-Image DiT; set {key}=<{DIT_HINT}>")])
        model = _build(ZImageTransformer2DModel, dit_config(signature), state, dtype, source.path, key, DIT_HINT)
    return model.to(device).eval().requires_grad_(False)


class ZImageVAE:
    """The frozen FLUX.1 VAE on Z-Image's latents: (posterior mode - shift_factor) x scaling_factor (0.1159 and
    0.3611), as musubi-tuner caches them and diffusers' ZImagePipeline decodes them. Pixels are float in
    [-1, 1], [B, 3, 1, H, W] (one frame: Z-Image makes images); latents are [B, 16, 1, H / 8, W / 8]."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = vae.config.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[2] != 1:
            raise ValueError(f"Z-Image encodes images: got {pixels.shape[2]} frames")
        mode = self.vae.encode(pixels[:, :, 0].to(self.device, self.dtype)).latent_dist.mode()
        return ((mode - self.shift_factor) * self.scaling_factor).unsqueeze(2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents[:, :, 0].to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1).unsqueeze(2)

    @torch.no_grad()
    def encode_item(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latents": self.encode(pixels).float()}

    def encode_condition(self, image: torch.Tensor, frames: int) -> dict:
        return {}  # text-to-image only: sampling takes no image


def load_vae(value, device, dtype, key: str = "model.vae") -> ZImageVAE:
    """Load the frozen FLUX.1 VAE (ae.safetensors, diffusers names, or a diffusers folder). ConfigError on `key`
    for another VAE (locate.check_vae names it)."""
    source = check_vae(value, key)
    if source.kind == "pretrained":
        vae = AutoencoderKL.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = {strip_prefix(n): v for n, v in read_state_dict(source.files, key).items()}
        signature = vae_signature(state_shapes(state))
        config = vae_config(signature)
        if signature["layout"] == "original":
            state = vae_to_diffusers(state, config)
        vae = _build(AutoencoderKL, config, state, dtype, source.path, key, VAE_HINT)
    return ZImageVAE(vae.to(device).eval().requires_grad_(False))
