"""The Wan2.1 family: config checks, weight-file discovery and loaders behind `models.get_family("wan")`.

This module never imports torch at import time (config checks and cache keys run without it); the
loaders in loading.py and the tiny-model builder in tiny.py are imported inside the methods that need
them. The `locate_*` functions decide what a configured path is (official file, shard set, diffusers
or transformers folder, pipeline root) and are shared with loading.py, so `check_config`,
`weight_files` and the loaders always agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.wan.names import official_module_name
from musubi_pipe.models.wan.tasks import get_task

_UNSET = (None, "", "???")
_STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.safetensors")
# files in a from_pretrained folder that determine its output (README, .gitattributes etc. do not)
_FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model")

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


@dataclass(frozen=True)
class Source:
    """Where one model part's weights are.

    kind "official": `files` are state-dict files with official Wan key names (one file or a shard set);
    kind "pretrained": `path` is a folder for `from_pretrained` and `files` its weight/config files.
    """

    kind: str
    path: Path
    files: tuple[Path, ...]


def _existing(value, key: str, hint: str) -> Path:
    if value in _UNSET:
        raise ConfigError([(key, f"not set; set {key}=<{hint}>")])
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError([(key, f"{path} does not exist; set {key}=<{hint}>")])
    return path


def _subfolder(path: Path, name: str) -> Path:
    """A diffusers pipeline root holds each part in a subfolder; accept the root or the part folder."""
    return path / name if (path / name).is_dir() else path


def _folder_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for pattern in _FOLDER_PATTERNS for p in folder.glob(pattern) if p.is_file()))


def _shard_set(path: Path, key: str) -> tuple[Path, ...]:
    """Return all shards of `name-00001-of-00003.safetensors` (or just `path`); a missing one is an error."""
    m = _SHARD.fullmatch(path.name)
    if not m:
        return (path,)
    width, count = len(m["index"]), int(m["count"])
    shards = tuple(
        path.with_name(f"{m['stem']}-{i:0{width}d}-of-{m['count']}.safetensors") for i in range(1, count + 1)
    )
    for shard in shards:
        if not shard.is_file():
            message = f"shard {shard} is missing; download all {count} shards of {path.name} into {path.parent}"
            raise ConfigError([(key, message)])
    return shards


def _state_dict_file(path: Path, key: str, hint: str) -> Path:
    if path.suffix not in _STATE_DICT_SUFFIXES:
        raise ConfigError([(key, f"{path} is not a .safetensors/.pt/.pth file; set {key}=<{hint}>")])
    return path


def locate_dit(value, key: str = "model.dit") -> Source:
    """Resolve `model.dit`: an official file or shard set, a diffusers transformer folder or pipeline root."""
    path = _existing(value, key, _DIT_HINT)
    if path.is_file():
        return Source("official", path, _shard_set(_state_dict_file(path, key, _DIT_HINT), key))
    folder = _subfolder(path, "transformer")
    config = folder / "config.json"
    weights = tuple(sorted(folder.glob("diffusion_pytorch_model*.safetensors")))
    if not config.is_file() or not weights:
        message = f"{folder} needs config.json and diffusion_pytorch_model*.safetensors; set {key}=<{_DIT_HINT}>"
        raise ConfigError([(key, message)])
    # The official Wan-AI repos ship official-key safetensors next to a config.json of class "WanModel".
    if json.loads(config.read_text()).get("_class_name") != "WanTransformer3DModel":
        return Source("official", folder, weights)
    return Source("pretrained", folder, _folder_files(folder))


def locate_vae(value, key: str = "model.vae") -> Source:
    """Resolve `model.vae`: an official Wan2.1 VAE file, a diffusers VAE folder or pipeline root."""
    path = _existing(value, key, _VAE_HINT)
    if path.is_file():
        return Source("official", path, (_state_dict_file(path, key, _VAE_HINT),))
    folder = _subfolder(path, "vae")
    if not (folder / "config.json").is_file():
        raise ConfigError([(key, f"{folder} has no config.json; set {key}=<{_VAE_HINT}>")])
    return Source("pretrained", folder, _folder_files(folder))


def locate_t5(value, key: str = "model.t5") -> Source:
    """Resolve `model.t5`: a transformers UMT5EncoderModel folder or a pipeline root with text_encoder/."""
    path = _existing(value, key, _T5_HINT)
    if path.is_file():
        message = f"{path} is a file; official T5 .pth files are not supported, set {key}=<{_T5_HINT}>"
        raise ConfigError([(key, message)])
    folder = _subfolder(path, "text_encoder")
    if not (folder / "config.json").is_file():
        raise ConfigError([(key, f"{folder} has no config.json; set {key}=<{_T5_HINT}>")])
    return Source("pretrained", folder, _folder_files(folder))


def locate_tokenizer(value, key: str = "model.t5_tokenizer") -> Source:
    """Resolve `model.t5_tokenizer`: a tokenizer folder or a pipeline root with tokenizer/."""
    path = _existing(value, key, _TOKENIZER_HINT)
    folder = _subfolder(path, "tokenizer")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        message = (
            f"{folder} is not a tokenizer folder (no tokenizer.json, tokenizer_config.json or spiece.model); "
            f"set {key}=<{_TOKENIZER_HINT}>"
        )
        raise ConfigError([(key, message)])
    return Source("pretrained", folder, _folder_files(folder))


TINY_VERSION = 3  # bump when tiny.py changes what it writes


class WanFamily:
    """Wan2.1 text-to-video (tasks in tasks.py); see models/base.py for the method contracts."""

    name = "wan"
    modelspec_arch = "wan2.1"  # musubi writes wan2.1 for Wan2.2 too
    fps = 16
    vae_stride = (4, 8, 8)
    # model.* keys of this family beyond the common ones (config/schema.py), with their types
    model_keys = {"t5": "str", "t5_tokenizer": "str", "t5_dtype": ("auto", "float32", "bfloat16", "float16")}

    def check_config(self, model_cfg: dict) -> list[tuple[str, str]]:
        problems = []
        checks = [
            lambda: get_task(model_cfg.get("task")),
            lambda: locate_dit(model_cfg.get("dit")),
            lambda: locate_vae(model_cfg.get("vae")),
            lambda: locate_t5(model_cfg.get("t5")),
            lambda: locate_tokenizer(model_cfg.get("t5_tokenizer")),
        ]
        for check in checks:
            try:
                check()
            except ConfigError as e:
                problems += e.problems
        return problems

    def weight_files(self, model_cfg: dict, part: str) -> list[Path]:
        if part == "vae":
            files = locate_vae(model_cfg.get("vae")).files
        elif part == "text":
            files = locate_t5(model_cfg.get("t5")).files + locate_tokenizer(model_cfg.get("t5_tokenizer")).files
        elif part == "dit":
            files = locate_dit(model_cfg.get("dit")).files
        else:
            raise ValueError(f"unknown model part {part!r}; expected 'vae', 'text' or 'dit'")
        return sorted(files)

    def encoder_identity(self, model_cfg: dict, part: str) -> dict:
        # the task fixes the architecture, text length and latent normalization
        return {"arch": self.name, "task": model_cfg.get("task"), "part": part}

    def load_vae(self, model_cfg: dict, device, dtype):
        from musubi_pipe.models.wan import loading

        return loading.load_vae(model_cfg.get("vae"), get_task(model_cfg.get("task")), device, dtype)

    def load_text_encoder(self, model_cfg: dict, device, dtype):
        from musubi_pipe.models.wan import loading

        task = get_task(model_cfg.get("task"))
        return loading.load_text_encoder(model_cfg.get("t5"), model_cfg.get("t5_tokenizer"), task, device, dtype)

    def load_dit(self, model_cfg: dict, device, dtype):
        from musubi_pipe.models.wan import loading

        return loading.load_dit(model_cfg.get("dit"), get_task(model_cfg.get("task")), device, dtype)

    def lora_targets(self, dit) -> dict:
        from torch import nn

        targets = {}
        for name, module in dit.named_modules():
            official = official_module_name(name)
            if official is not None and isinstance(module, nn.Linear):
                targets[official] = module
        return targets

    def predict(self, dit, noisy_latents, timesteps, text_embeds: list):
        import torch
        import torch.nn.functional as F

        # Wan always sees text_len tokens: the real ones, then zeros (load_dit stores the task on the model)
        text_len = dit._wan_task.text_len
        context = torch.stack([F.pad(e, (0, 0, 0, text_len - e.shape[0])) for e in text_embeds])
        return dit(
            hidden_states=noisy_latents.to(dit.dtype),
            timestep=timesteps.to(noisy_latents.device),
            encoder_hidden_states=context.to(noisy_latents.device, dit.dtype),
            return_dict=False,
        )[0]

    def build_tiny(self, root: Path, comfy_prefix: bool = False) -> dict[str, str]:
        # A marker written after a complete build lets warm runs skip importing torch/diffusers.
        marker = Path(root) / f".tiny_v{TINY_VERSION}{'_comfy' if comfy_prefix else ''}"
        if marker.is_file():
            paths = json.loads(marker.read_text())
            if all(Path(p).exists() for p in paths.values()):
                return paths
        from musubi_pipe.models.wan import tiny

        paths = tiny.build_tiny(root, comfy_prefix=comfy_prefix)
        marker.write_text(json.dumps(paths))
        return paths


FAMILY = WanFamily()
