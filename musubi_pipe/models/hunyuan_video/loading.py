"""Load the HunyuanVideo DiT and VAE from the files users have; the text encoders are in text.py.

    dit = load_dit("mp_rank_00_model_states.pt", "cuda", torch.bfloat16)                 # frozen, eval
    dit = load_dit("skyreels_hunyuan_i2v_bf16.safetensors", "cuda", torch.bfloat16, in_channels=32)
    vae = load_vae("hunyuan-video-t2v-720p/vae/pytorch_model.pt", "cuda", torch.float16, tiling=True)

Official checkpoints (DeepSpeed-wrapped .pt, ComfyUI-prefixed or plain .safetensors, bf16/fp16 or plain
fp8_e4m3fn, which is upcast to `dtype`) are converted with keymap.py into diffusers models whose
config is read off the tensors' shapes (locate.dit_signature / vae_signature), so the real models
and the tiny test ones load the same way; diffusers folders go through `from_pretrained`. What a
path means and whether it fits is decided by locate.py before anything is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.hunyuan_video.keymap import dit_to_diffusers, strip_dit_wrappers, vae_to_diffusers
from musubi_pipe.models.hunyuan_video.locate import (
    DIT_HINT,
    VAE_HINT,
    check_dit,
    check_dit_signature,
    check_vae,
    check_vae_signature,
    dit_layout,
    dit_signature,
    vae_signature,
)
from musubi_pipe.models.statedict import assign_state, cast_state, empty_model, read_state_dict

SCALING_FACTOR = 0.476986  # the HunyuanVideo VAE's latent scale (musubi-tuner hunyuan_model/vae.py)
DEFAULT_TILE_SIZE = 256  # musubi-tuner's --vae_spatial_tile_sample_min_size default
NORM_GROUPS = 32  # GroupNorm groups of the VAE: not visible in tensor shapes, 32 in every HunyuanVideo VAE


def _tensor_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors in `state` (a .pt may hold other values: they are not shapes)."""
    return {name: tuple(value.shape) for name, value in state.items() if isinstance(value, torch.Tensor)}


def _build(model_cls, config: dict, state: dict, dtype, path: Path, key: str, hint: str):
    """`model_cls(**config)` built without allocating, filled with `state` (diffusers keys) cast to `dtype`."""
    model = empty_model(lambda: model_cls(**config))
    assign_state(model, cast_state(model, state, dtype), path, key, f"set {key}=<{hint}>")
    return model


# --- the DiT --------------------------------------------------------------------------------------


def rope_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per (frame, height, width) axis: (16, 56, 56) for the official head_dim 128, in the
    same proportions (hd/8, 7hd/16, 7hd/16) for other head dims (the tiny 32: (4, 14, 14))."""
    if head_dim % 16:
        raise ValueError(f"HunyuanVideo DiT head_dim {head_dim} is not a multiple of 16; no RoPE split is known")
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def dit_config(signature: dict) -> dict:
    """`HunyuanVideoTransformer3DModel` keyword arguments for a `locate.dit_signature`."""
    return {
        "in_channels": signature["in_channels"],
        "out_channels": signature["out_channels"],
        "num_attention_heads": signature["heads"],
        "attention_head_dim": signature["head_dim"],
        "num_layers": signature["num_layers"],
        "num_single_layers": signature["num_single_layers"],
        "num_refiner_layers": signature["num_refiner_layers"],
        "mlp_ratio": signature["mlp_ratio"],
        "patch_size": signature["patch_size"],
        "patch_size_t": signature["patch_size_t"],
        "qk_norm": "rms_norm",
        "guidance_embeds": signature["guidance_embeds"],
        "text_embed_dim": signature["text_embed_dim"],
        "pooled_projection_dim": signature["pooled_projection_dim"],
        "rope_theta": 256.0,
        "rope_axes_dim": rope_axes_dim(signature["head_dim"]),
    }


def load_dit(value, device, dtype, key: str = "model.dit", in_channels: int | None = None
             ) -> HunyuanVideoTransformer3DModel:
    """Load a frozen, eval-mode `HunyuanVideoTransformer3DModel` from an official file (.pt/.safetensors,
    official or diffusers names, fp8_e4m3fn upcast to `dtype`), a diffusers folder or a pipeline root.

    `in_channels` is model.dit_in_channels (16 T2V, 32 SkyReels V1 I2V; None accepts either). Raises
    ConfigError on `key` when the file is not a HunyuanVideo DiT, has other input channels, or its
    tensors do not fit the model they describe.
    """
    source = check_dit(value, key, in_channels)  # config.json or safetensors headers
    if source.kind == "pretrained":
        model = HunyuanVideoTransformer3DModel.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = strip_dit_wrappers(read_state_dict(source.files, key))
        shapes = _tensor_shapes(state)
        signature = dit_signature(shapes)
        # again on the tensors: a .pt has no header to check before reading
        check_dit_signature(signature, shapes, source.path, key, in_channels)
        if dit_layout(shapes) == "official":
            try:
                state = dit_to_diffusers(state, signature["hidden_size"])
            except ValueError as e:
                message = f"{source.path} is not a HunyuanVideo DiT file ({e}); set {key}=<{DIT_HINT}>"
                raise ConfigError([(key, message)]) from e
        model = _build(HunyuanVideoTransformer3DModel, dit_config(signature), state, dtype, source.path, key, DIT_HINT)
    return model.to(device).eval().requires_grad_(False)


# --- the VAE --------------------------------------------------------------------------------------


def vae_config(signature: dict) -> dict:
    """`AutoencoderKLHunyuanVideo` keyword arguments for a `locate.vae_signature`."""
    return {
        "latent_channels": signature["latent_channels"],
        "block_out_channels": tuple(signature["block_out_channels"]),
        "layers_per_block": signature["layers_per_block"],
        "mid_block_add_attention": signature["mid_block_add_attention"],
        "norm_num_groups": NORM_GROUPS,
        "scaling_factor": SCALING_FACTOR,
    }


def _chunk_causal_convs(vae: AutoencoderKLHunyuanVideo, chunk_size: int) -> None:
    """musubi-tuner's --vae_chunk_size: every causal 3D convolution whose (padded) input is at least
    1.5 x `chunk_size` pixels wide runs on slices of about `chunk_size` input columns along the width,
    overlapping by the kernel width minus one, and the outputs are concatenated. The result is the same
    convolution (exact); what shrinks is each call's temporary memory (im2col columns / cuDNN workspace
    grow with the output size), not the activations that are kept."""

    def chunked(module: HunyuanVideoCausalConv3d):
        conv = module.conv
        kernel, stride = conv.kernel_size[2], conv.stride[2]
        per_slice = max(1, chunk_size // stride)  # output columns per slice

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            x = F.pad(hidden_states, module.time_causal_padding, mode=module.pad_mode)
            if x.shape[4] < chunk_size * 1.5:
                return conv(x)
            width = (x.shape[4] - kernel) // stride + 1
            slices = [conv(x[..., start * stride:(min(start + per_slice, width) - 1) * stride + kernel])
                      for start in range(0, width, per_slice)]
            return torch.cat(slices, dim=4)

        return forward

    for module in vae.modules():
        # the slicing assumes no implicit padding (all HunyuanVideo convs pad explicitly, causally)
        if isinstance(module, HunyuanVideoCausalConv3d) and module.conv.padding == (0, 0, 0):
            module.forward = chunked(module)


def configure_memory(vae: AutoencoderKLHunyuanVideo, tiling: bool = False, chunk_size: int | None = None,
                     tile_sample_min_size: int | None = None) -> None:
    """Apply musubi-tuner's VAE memory options to a diffusers AutoencoderKLHunyuanVideo.

    - Temporal tiling (diffusers' framewise encode/decode, on by default for > 16 frames) is turned
      off: musubi-tuner encodes and decodes a clip whole, and so do we.
    - `tiling` (--vae_tiling) or `tile_sample_min_size` (--vae_spatial_tile_sample_min_size, which
      implies tiling) -> diffusers' spatial tiling with tiles of `tile_sample_min_size` pixels (default
      256) every 3/4 of that (musubi's overlap factor 0.25), both rounded down to whole latents (8 px):
      256 -> 256-px tiles every 192 px, the same tiles and blending as musubi-tuner.
    - `chunk_size` (--vae_chunk_size) -> width-sliced causal convolutions (see `_chunk_causal_convs`),
      as musubi-tuner's CausalConv3d chunking; diffusers has no such option.
    """
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    if tiling or tile_sample_min_size:
        size = max(32, (tile_sample_min_size or DEFAULT_TILE_SIZE) // 8 * 8)
        stride = max(8, size * 3 // 4 // 8 * 8)
        vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size,
                          tile_sample_stride_height=stride, tile_sample_stride_width=stride)
    if chunk_size:
        _chunk_causal_convs(vae, int(chunk_size))


class HunyuanVAE:
    """The frozen HunyuanVideo VAE on scaled latents, plus SkyReels V1 I2V conditioning.

    Pixels are float in [-1, 1], [B, 3, F, H, W] with F = 4n + 1 (1 for an image); latents are
    [B, 16, n + 1, H / 8, W / 8], posterior mode x `scaling_factor` (0.476986 for the real VAE).
    """

    def __init__(self, vae: AutoencoderKLHunyuanVideo):
        self.vae = vae
        self.scaling_factor = vae.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled posterior mode of `pixels`, in the VAE's dtype."""
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of scaled `latents`."""
        latents = latents.to(self.device, self.dtype) / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def encode_item(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """What is cached for one training item: {"latents": encode(pixels)} in float32 on the VAE's device."""
        return {"latents": self.encode(pixels).float()}

    @torch.no_grad()
    def encode_condition(self, image: torch.Tensor, frames: int, generator: torch.Generator | None = None
                         ) -> dict[str, torch.Tensor]:
        """SkyReels V1 I2V conditioning for a `frames`-long video from its start image [1, 3, 1, H, W]:
        {"latents_image": [1, 16, (frames - 1) // 4 + 1, H / 8, W / 8]} in float32, which the DiT takes
        concatenated to the noisy latents on the channel axis (32 input channels).

        As diffusers' HunyuanSkyreelsImageToVideoPipeline.prepare_latents and musubi-tuner's
        hv_generate_video.py: the image alone is encoded, a posterior *sample* (not the mode; drawn
        with `generator`, or torch's global RNG when None) times the scaling factor, then zero-padded
        after it along the frame axis to the video's latent frames.
        """
        posterior = self.vae.encode(image.to(self.device, self.dtype)).latent_dist
        first = (posterior.sample(generator) * self.scaling_factor).float()
        latent_frames = (frames - 1) // self.vae.temporal_compression_ratio + 1
        padding = first.new_zeros(first.shape[0], first.shape[1], latent_frames - 1, *first.shape[3:])
        return {"latents_image": torch.cat([first, padding], dim=2)}


def load_vae(value, device, dtype, key: str = "model.vae", tiling: bool = False, chunk_size: int | None = None,
             tile_sample_min_size: int | None = None) -> HunyuanVAE:
    """Load the frozen HunyuanVideo VAE (official pytorch_model.pt / .safetensors, a diffusers folder or a
    pipeline root) with musubi-tuner's memory options (`configure_memory`). ConfigError on `key` when
    the file is not the HunyuanVideo VAE."""
    source = check_vae(value, key)  # config.json or safetensors headers
    if source.kind == "pretrained":
        vae = AutoencoderKLHunyuanVideo.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = vae_to_diffusers(read_state_dict(source.files, key))
        shapes = _tensor_shapes(state)
        signature = vae_signature(shapes)
        check_vae_signature(signature, shapes, source.path, key)  # again on the tensors, as for the DiT
        vae = _build(AutoencoderKLHunyuanVideo, vae_config(signature), state, dtype, source.path, key, VAE_HINT)
    configure_memory(vae, tiling, chunk_size, tile_sample_min_size)
    return HunyuanVAE(vae.to(device).eval().requires_grad_(False))
