"""The Wan2.1 family: config checks, weight-file discovery and loaders behind `models.get_family("wan")`.

This module never imports torch at import time (config checks and cache keys run without it); the
loaders in loading.py and the tiny-model builder in tiny.py are imported inside the methods that need
them. The `locate_*` functions decide what a configured path is (official file, shard set, diffusers
or transformers folder, pipeline root) and are shared with loading.py, so `check_config`,
`weight_files` and the loaders always agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.wan.locate import locate_dit, locate_t5, locate_tokenizer, locate_vae
from musubi_pipe.models.wan.names import official_module_name
from musubi_pipe.models.wan.tasks import get_task

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
