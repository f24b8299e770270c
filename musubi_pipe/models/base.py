"""The interface every architecture family implements; stages and the training loop use only this.

`model_cfg` is the composed `model` config group as a plain dict (OmegaConf containers converted),
for example for Wan: {"arch": "wan", "task": "t2v-1.3B", "dit": path, "vae": path, "t5": path,
"t5_tokenizer": path, ...}. Methods that load weights import torch lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence


class VAE(Protocol):
    """A loaded video VAE. Pixels are float in [-1, 1], shape [B, 3, F, H, W]."""

    def encode(self, pixels) -> Any:
        """Return normalized latents [B, C, F', H', W'] (what the DiT trains on)."""

    def decode(self, latents) -> Any:
        """Return pixels [B, 3, F, H, W] in [-1, 1] from normalized latents."""


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> list:
        """Return one embedding tensor [L_i, D] per text, trimmed to its real token length."""


class Family(Protocol):
    """One architecture family (Wan, HunyuanVideo, ...), found through models.get_family(arch)."""

    name: str  # full architecture name, written as ss_base_model_version
    modelspec_arch: str  # SAI ModelSpec architecture id of its LoRA files
    fps: int  # frame rate the family's videos are trained and sampled at
    vae_stride: tuple[int, int, int]  # (temporal, height, width) compression of the VAE
    model_keys: dict  # model.* config keys of this family beyond the common ones, with type specs

    def check_config(self, model_cfg: dict) -> list[tuple[str, str]]:
        """Return (key, message) problems with the model config and its files; never imports torch."""

    def weight_files(self, model_cfg: dict, part: str) -> list[Path]:
        """Return every file whose content determines `part` ("vae", "text", "dit")."""

    def encoder_identity(self, model_cfg: dict, part: str) -> dict:
        """Return the settings besides file content that determine `part`'s outputs (task, dtype...)."""

    def load_vae(self, model_cfg: dict, device, dtype) -> VAE: ...

    def load_text_encoder(self, model_cfg: dict, device, dtype) -> TextEncoder: ...

    def load_dit(self, model_cfg: dict, device, dtype): ...

    def lora_targets(self, dit) -> dict[str, Any]:
        """Return {official module name: torch.nn.Linear} of the modules a LoRA trains by default."""

    def predict(self, dit, noisy_latents, timesteps, text_embeds: list) -> Any:
        """Run the DiT: noisy latents [B, C, F, H, W], timesteps [B] in [0, 1000], embeddings per item."""

    def build_tiny(self, root: Path, comfy_prefix: bool = False) -> dict[str, str]:
        """Write a tiny deterministic model in the formats users download; return {model key: path}."""
