"""Load the Wan DiT (one expert) and VAE from the files users have; the text and image encoders are in t5.py/clip.py.

    dit = load_dit("wan2.1_t2v_1.3B_bf16.safetensors", get_task("t2v-1.3B"), "cuda", torch.bfloat16)
    low = load_dit("Wan2.2-T2V-A14B/", task, "cuda", torch.bfloat16, expert="low_noise")
    vae = load_vae("Wan2.1_VAE.pth", task, "cuda", torch.bfloat16, clip=clip)   # WanVAE

Official checkpoints (also ComfyUI-prefixed, sharded, fp16/bf16 or plain fp8_e4m3fn) are converted with
the key maps in keymap.py into diffusers models built from the task's config; diffusers folders go
through `from_pretrained`. The variant is checked before anything is built (locate.check_*), and
every model is returned frozen in eval mode. Which files a path means is decided by locate.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.statedict import assign_state, cast_state, empty_model, read_state_dict, state_shapes
from musubi_pipe.models.wan.keymap import dit_to_diffusers, vae_to_diffusers
from musubi_pipe.models.wan.locate import (
    check_dit,
    check_dit_signature,
    check_vae,
    check_vae_variant,
    dit_file_signature,
    vae_variant_from_shapes,
)
from musubi_pipe.models.wan.tasks import WanTask

# Mask channels in front of the first-frame latents of "image" conditioning: one per pixel frame of
# a latent frame (the VAE's temporal stride), as diffusers' WanImageToVideoPipeline.prepare_latents.
_MASK_CHANNELS = 4


def _build(model_cls, task: WanTask, config: dict, state: dict, dtype, path: Path, key: str):
    """Build `model_cls(**config)` without allocating and assign `state` (diffusers keys) cast to `dtype`
    (which also upcasts fp8_e4m3fn files; `_keep_in_fp32_modules` stay float32, as in `from_pretrained`)."""
    model = empty_model(lambda: model_cls(**config))
    fix = f"point {key} at a {task.name} file or change model.task"
    assign_state(model, cast_state(model, state, dtype), path, key, fix, f"model.task={task.name}")
    return model


def load_dit(value, task: WanTask, device, dtype, key: str = "model.dit", expert: str = "") -> WanTransformer3DModel:
    """Load one frozen `WanTransformer3DModel` (the DiT, or the Wan2.2 `expert` "high_noise"/"low_noise").

    `value` is an official file/shard set (ComfyUI prefixes, fp16/bf16/fp8_e4m3fn), an official Wan-AI
    folder, a diffusers folder or a pipeline root (locate.locate_dit). The variant is checked before
    anything is built; ComfyUI fp8_scaled files are refused. The task is kept on the model as
    `_wan_task` (WanFamily.predict pads text to its text_len).
    """
    source = check_dit(value, task, key, expert)  # config.json or safetensors headers
    if source.kind == "pretrained":
        model = WanTransformer3DModel.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = read_state_dict(source.files, key)
        # again on the tensors: a .pth has no header to check before reading
        check_dit_signature(dit_file_signature(state_shapes(state), source.path, key), task, source.path, key)
        state = dit_to_diffusers(state)
        model = _build(WanTransformer3DModel, task, task.dit_config, state, dtype, source.path, key)
    model = model.to(device).eval().requires_grad_(False)
    model._wan_task = task
    return model


class WanVAE:
    """A frozen Wan2.1 or Wan2.2 VAE on normalized latents (the diffusers WanPipeline convention), plus the
    task's conditioning inputs for caching (`encode_item`) and sampling (`encode_condition`).

    encode: pixels [B, 3, F, H, W] in [-1, 1], F = 4n + 1 -> (posterior mode - latents_mean) / latents_std,
    shape [B, C, n + 1, H / s, W / s] with C, s = 16, 8 (Wan2.1) or 48, 16 (Wan2.2, whose VAE patchifies
    2x2 itself). decode inverts that and returns pixels clamped to [-1, 1]. `clip` is the Wan2.1 I2V
    image encoder (clip.WanCLIP) or None.
    """

    def __init__(self, vae: AutoencoderKLWan, task: WanTask, clip=None):
        self.vae = vae
        self.task = task
        self.clip = clip
        self.latent_channels = vae.config.z_dim
        shape = (1, self.latent_channels, 1, 1, 1)
        self._mean = torch.tensor(vae.config.latents_mean).view(shape)
        self._std = torch.tensor(vae.config.latents_std).view(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        return (latents - self._mean.to(latents)) / self._std.to(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype)
        latents = latents * self._std.to(latents) + self._mean.to(latents)
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    def _float(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, torch.float32)

    @torch.no_grad()
    def _image_latents(self, first: torch.Tensor, frames: int) -> torch.Tensor:
        """The "image" condition for a `frames`-long video starting at `first` [1, 3, 1, H, W]:
        [mask (4 channels, 1 on latent frame 0, else 0), latents of (first, zeros...)], [1, 4 + C, F', H', W'].

        Equal to what diffusers' WanImageToVideoPipeline.prepare_latents builds for a first-frame condition.
        """
        zeros = first.new_zeros(first.shape[0], first.shape[1], frames - 1, *first.shape[3:])
        latents = self._float(self.encode(torch.cat([first, zeros], dim=2)))
        mask = torch.zeros(latents.shape[0], _MASK_CHANNELS, *latents.shape[2:], device=latents.device)
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], dim=1)

    @torch.no_grad()
    def _clip(self, first: torch.Tensor) -> torch.Tensor:
        """CLIP tokens of the first frame [1, 3, 1, H, W] -> [1, tokens, hidden]."""
        return self._float(self.clip.encode(first[:, :, 0].to(self.clip.device, self.clip.dtype)))

    @torch.no_grad()
    def encode_item(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything cached for one training item, pixels [1, 3, F, H, W] in [-1, 1] (F = 4n + 1; 1 for images).

        "latents" always; "image" tasks add "latents_image" (see `_image_latents`) and, with a CLIP,
        "clip" of the first frame. "first_frame" tasks (TI2V) need nothing more: the trainer uses
        latents[:, :, :1]. Float32 on the VAE's device.
        """
        out = {"latents": self._float(self.encode(pixels))}
        if self.task.conditioning == "image":
            first = pixels[:, :, :1]
            out["latents_image"] = self._image_latents(first, pixels.shape[2])
            if self.clip is not None:
                out["clip"] = self._clip(first)
        return out

    @torch.no_grad()
    def encode_condition(self, image: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        """Sampling inputs from the start image [1, 3, 1, H, W] in [-1, 1] for a `frames`-long video.

        "image" -> {"latents_image", "clip" (with a CLIP)}; "first_frame" -> {"first_frame": normalized
        latents of the image alone, [1, C, 1, H', W']}; "none" -> {}. Float32 on the VAE's device.
        """
        kind = self.task.conditioning
        if kind == "image":
            out = {"latents_image": self._image_latents(image, frames)}
            if self.clip is not None:
                out["clip"] = self._clip(image)
            return out
        if kind == "first_frame":
            return {"first_frame": self._float(self.encode(image))}
        return {}


def load_vae(value, task: WanTask, device, dtype, key: str = "model.vae", clip=None) -> WanVAE:
    """Load the VAE `task` needs (Wan2.1 or Wan2.2, task.vae_version) from an official .pth/.safetensors
    file or a diffusers folder, checking the variant first; `clip` (clip.WanCLIP) rides along for
    tasks with a CLIP image encoder."""
    source = check_vae(value, task, key)  # config.json or safetensors headers
    if source.kind == "pretrained":
        vae = AutoencoderKLWan.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = read_state_dict(source.files, key)
        check_vae_variant(vae_variant_from_shapes(state_shapes(state)), task, source.path, key)  # as for the DiT
        try:
            state = vae_to_diffusers(state, task.vae_version)
        except ValueError as e:
            message = f"{source.path} is not a Wan{task.vae_version} VAE file ({e}); point {key} at one"
            raise ConfigError([(key, message)]) from e
        vae = _build(AutoencoderKLWan, task, task.vae_config, state, dtype, source.path, key)
    return WanVAE(vae.to(device).eval().requires_grad_(False), task, clip)
