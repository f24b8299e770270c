"""Decide what a configured Wan weight path is (torch-free): official file or shard set, diffusers folder, pipeline root.

`locate_*` functions are shared by the family's config checks, cache keys (`weight_files`) and the
loaders, so all three always agree on which files make up a model part.
"""

from __future__ import annotations

import json
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import Source, existing, folder_files, shard_set, state_dict_file, subfolder

_DIT_HINT = (
    "a Wan DiT .safetensors/.pth file (e.g. ComfyUI wan2.1_t2v_1.3B_bf16.safetensors), "
    "a diffusers transformer folder or a diffusers pipeline folder"
)
_VAE_HINT = (
    "Wan2.1_VAE.pth / wan_2.1_vae.safetensors, a diffusers AutoencoderKLWan folder or a diffusers pipeline folder"
)
_T5_HINT = (
    "a transformers UMT5EncoderModel folder or a diffusers pipeline folder with text_encoder/ "
    "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
)
_TOKENIZER_HINT = "a tokenizer folder (e.g. google/umt5-xxl) or a diffusers pipeline folder with tokenizer/"


def locate_dit(value, key: str = "model.dit") -> Source:
    """Resolve `model.dit`: an official file or shard set, a diffusers transformer folder or pipeline root."""
    path = existing(value, key, _DIT_HINT)
    if path.is_file():
        return Source("official", path, shard_set(state_dict_file(path, key, _DIT_HINT), key))
    folder = subfolder(path, "transformer")
    config = folder / "config.json"
    weights = tuple(sorted(folder.glob("diffusion_pytorch_model*.safetensors")))
    if not config.is_file() or not weights:
        message = f"{folder} needs config.json and diffusion_pytorch_model*.safetensors; set {key}=<{_DIT_HINT}>"
        raise ConfigError([(key, message)])
    # The official Wan-AI repos ship official-key safetensors next to a config.json of class "WanModel".
    if json.loads(config.read_text()).get("_class_name") != "WanTransformer3DModel":
        return Source("official", folder, weights)
    return Source("pretrained", folder, folder_files(folder))


def locate_vae(value, key: str = "model.vae") -> Source:
    """Resolve `model.vae`: an official Wan VAE file, a diffusers VAE folder or pipeline root."""
    path = existing(value, key, _VAE_HINT)
    if path.is_file():
        return Source("official", path, (state_dict_file(path, key, _VAE_HINT),))
    folder = subfolder(path, "vae")
    if not (folder / "config.json").is_file():
        raise ConfigError([(key, f"{folder} has no config.json; set {key}=<{_VAE_HINT}>")])
    return Source("pretrained", folder, folder_files(folder))


def locate_t5(value, key: str = "model.t5") -> Source:
    """Resolve `model.t5`: a transformers UMT5EncoderModel folder or a pipeline root with text_encoder/."""
    path = existing(value, key, _T5_HINT)
    if path.is_file():
        message = f"{path} is a file; official T5 .pth files are not supported, set {key}=<{_T5_HINT}>"
        raise ConfigError([(key, message)])
    folder = subfolder(path, "text_encoder")
    if not (folder / "config.json").is_file():
        raise ConfigError([(key, f"{folder} has no config.json; set {key}=<{_T5_HINT}>")])
    return Source("pretrained", folder, folder_files(folder))


def locate_tokenizer(value, key: str = "model.t5_tokenizer") -> Source:
    """Resolve `model.t5_tokenizer`: a tokenizer folder or a pipeline root with tokenizer/."""
    path = existing(value, key, _TOKENIZER_HINT)
    folder = subfolder(path, "tokenizer")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        message = (
            f"{folder} is not a tokenizer folder (no tokenizer.json, tokenizer_config.json or spiece.model); "
            f"set {key}=<{_TOKENIZER_HINT}>"
        )
        raise ConfigError([(key, message)])
    return Source("pretrained", folder, folder_files(folder))
