"""The Z-Image family (Turbo, Base and De-Turbo; text-to-image) behind `get_family("zimage")`.

Models: diffusers' `ZImageTransformer2DModel` and the FLUX.1 `AutoencoderKL`, loaded from the files users have
(loading.py, locate.py, keymap.py), and Qwen3-4B through transformers (text.py). This module never imports torch
at import time; loaders are imported inside the methods.

Training is musubi-tuner's: x_t = (1 - t) x0 + t noise, the DiT sees (1000 - timestep) / 1000 and predicts
x0 - noise (the opposite sign of the other models); `predict` returns the negated output, noise - x0, and the
target is noise - x0 too, which is musubi-tuner's loss (latents - noise against the raw output) exactly.
Sampling: the default flow-matching loop on musubi-tuner's Z-Image step spacing (`sampling_sigmas`), with its (and
Z-Image's) guidance formula v = v_pos + g (v_pos - v_neg), applied only when g > 1 (`sample` turns it into the
loop's standard form).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.base import Expert, Family, Geometry, TrainingInputs
from musubi_pipe.models.zimage import musubi
from musubi_pipe.models.zimage.names import BLOCK_LINEARS, LORA_NAMING, block_module
from musubi_pipe.models.zimage.tasks import get_task

TINY_VERSION = 1  # bump when tiny.py changes what it writes
LATENT_CHANNELS = 16
OFFICIAL_LAYERS, TINY_LAYERS = 30, 2  # the main transformer blocks (tiny.TINY_DIT_CONFIG: 2; a test compares)
# the LoRA candidates of one main block that musubi-tuner's default excludes leave (not adaLN_modulation)
_TRAINED_LINEARS = tuple(p for p in BLOCK_LINEARS if not p.startswith("adaLN"))


class ZImageFamily(Family):
    """Z-Image (tasks.py); see models/base.py for the method contracts."""

    name = "zimage"
    modelspec_arch = "z-image"
    modelspec_implementation = "https://github.com/Tongyi-MAI/Z-Image"
    musubi_network_module = "networks.lora_zimage"  # musubi-tuner's LoRA module (ss_network_module)
    musubi_scripts = musubi.SCRIPTS  # tools from-musubi: its scripts, flags and hints (musubi.py)
    musubi_flags = musubi.FLAGS
    musubi_hints = musubi.HINTS
    text_dtype_key = "text_encoder_dtype"
    lora_naming = LORA_NAMING
    fp8_text_key = "fp8_llm"  # musubi-tuner's --fp8_llm (Qwen3)
    # memory.fp8_base stores the Linears of the transformer blocks (modulation and embedders stay)
    fp8_layers = (("layers.", "noise_refiner.", "context_refiner."), ("adaLN_modulation",))
    supports_loraid = True
    image_only = True
    # musubi-tuner's networks/lora_zimage.py: no modulation, no refiner blocks
    lora_default_excludes = (r".*(_modulation|_refiner).*",)
    # blocks_to_swap of each memory preset (of 30 main blocks; musubi-tuner allows 28): estimates for a 6B DiT
    # stored in fp8 (the presets set memory.fp8_base), not measured
    swap_presets = {
        "24gb": {"zimage": 0, "tiny": 0},
        "16gb": {"zimage": 10, "tiny": 1},
        "12gb": {"zimage": 20, "tiny": 1},
    }
    block_lists = ("layers", "noise_refiner", "context_refiner")
    tiny_models = {"tiny": "zimage/tiny"}
    model_keys = {
        "text_encoder": "str",  # Qwen3-4B: ComfyUI qwen_3_4b.safetensors or Tongyi-MAI's text_encoder/
        "text_encoder_tokenizer": "str?",  # the Qwen3 tokenizer folder (null: the text_encoder folder's)
        "text_encoder_dtype": ("auto", "float32", "bfloat16", "float16"),
    }

    # -- what the task is ---------------------------------------------------------------------
    def musubi_model(self, flags: dict) -> str:
        return musubi.model_option(flags)

    def geometry(self, model_cfg: dict) -> Geometry:
        get_task(model_cfg.get("task"))
        return Geometry(1, (1, 8, 8), (1, 2, 2), LATENT_CHANNELS)

    def experts(self, model_cfg: dict) -> list[Expert]:
        return [Expert("", "model.dit", 0.0, 1.0)]

    def sample_image(self, model_cfg: dict) -> str:
        return "none"

    def sampling_defaults(self, model_cfg: dict) -> dict:
        task = get_task(model_cfg.get("task"))
        return {"steps": task.sample_steps, "shift": task.shift, "guidance_scale": task.guidance_scale,
                "guidance_scale_high": task.guidance_scale, "negative_prompt": "", "fps": 1}

    # -- config checks and cache identities ---------------------------------------------------
    def check_stages(self, model_cfg: dict, stages) -> list[tuple[str, str]]:
        return []

    def uses_controls(self, model_cfg: dict) -> bool:
        return False  # Z-Image takes no control images (musubi-tuner: "does not support control images")

    def check_config(self, model_cfg: dict) -> list[tuple[str, str]]:
        from musubi_pipe.models.zimage import locate, text

        try:
            get_task(model_cfg.get("task"))
        except ConfigError as e:
            return e.problems
        problems = []
        for check in (lambda: locate.check_dit(model_cfg.get("dit")), lambda: locate.check_vae(model_cfg.get("vae"))):
            try:
                check()
            except ConfigError as e:
                problems += e.problems
        return problems + text.check_text_encoder(model_cfg)

    def weight_files(self, model_cfg: dict, part: str, expert: str = "") -> list[Path]:
        from musubi_pipe.models.zimage import locate, text

        if part == "vae":
            files = locate.locate_vae(model_cfg.get("vae")).files
        elif part == "text":
            files = tuple(text.text_files(model_cfg))
        elif part == "dit":
            files = locate.locate_dit(model_cfg.get("dit")).files
        else:
            raise ValueError(f"unknown model part {part!r}; expected 'vae', 'text' or 'dit'")
        return sorted(files)

    def encoder_identity(self, model_cfg: dict, part: str) -> dict:
        from musubi_pipe.models.zimage import text

        if part == "text":
            return {"arch": self.name, "part": part, "max_length": text.MAX_LENGTH, "hidden_state": text.HIDDEN_STATE,
                    "template": "chat, enable_thinking"}
        return {"arch": self.name, "part": part, "latents": "(mode - shift) * scale"}

    def training_identity(self, model_cfg: dict) -> dict:
        return {"target": "noise - x0, DiT input (1000 - timestep) / 1000"}

    # -- loaders ------------------------------------------------------------------------------
    def load_vae(self, model_cfg: dict, device, dtype):
        from musubi_pipe.models.zimage import loading

        return loading.load_vae(model_cfg.get("vae"), device, dtype)

    def load_text_encoder(self, model_cfg: dict, device, dtype, fp8: bool = False):
        from musubi_pipe.models.zimage import text

        return text.load_text_encoder(model_cfg, device, dtype, fp8=fp8)

    def load_dit(self, model_cfg: dict, device, dtype, expert: str = ""):
        from musubi_pipe.models.zimage import loading

        return loading.load_dit(model_cfg.get("dit"), device, dtype)

    def blocks(self, dit) -> list:
        return list(dit.layers)  # musubi-tuner swaps the main blocks; the refiners stay

    def num_blocks(self, model_cfg: dict) -> int:
        return TINY_LAYERS if get_task(model_cfg.get("task")).tiny else OFFICIAL_LAYERS

    def model_size(self, model_cfg: dict) -> str:
        return "tiny" if get_task(model_cfg.get("task")).tiny else "zimage"

    def lora_targets(self, dit) -> dict:
        """{module path: nn.Linear} of every Linear of the transformer blocks (refiners and modulation included;
        lora_default_excludes leaves them out, as musubi-tuner's network module does)."""
        from torch import nn

        return {name: module for name, module in dit.named_modules()
                if isinstance(module, nn.Linear) and block_module(name)}

    def loraid_layout(self, model_cfg: dict):
        from musubi_pipe.models.base import LoraidLayout

        blocks = self.num_blocks(model_cfg)
        return LoraidLayout(block_list="layers", groups=("attention", "feed_forward"), num_blocks=blocks,
                            experts=("",),
                            candidates=tuple(f"layers.{b}.{p}" for b in range(blocks) for p in _TRAINED_LINEARS))

    # -- training and sampling ----------------------------------------------------------------
    def training_inputs(self, model_cfg: dict, latents, noise, t, timesteps, cached: dict, generator,
                        conventions: str = "musubi") -> TrainingInputs:
        t_b = t.view(-1, 1, 1, 1, 1).to(latents)
        return TrainingInputs(noisy=(1 - t_b) * latents + t_b * noise, timesteps=timesteps, target=noise - latents)

    def predict(self, dit, noisy_latents, timesteps, text_embeds: list, cond: dict | None = None):
        """noise - x0 for noisy latents [B, 16, 1, H, W]: the DiT's output negated (module doc)."""
        import torch

        device, dtype = noisy_latents.device, dit.dtype
        # as musubi-tuner: the reversed, normalized timestep in the DiT's dtype
        t = ((1000.0 - timesteps.to(device, torch.float32)) / 1000.0).to(dtype)
        captions = [e["embedding"].to(device, dtype) for e in text_embeds]
        out = dit(list(noisy_latents.to(dtype).unbind(0)), t, captions, return_dict=False)[0]
        return -torch.stack(list(out))

    def sampling_sigmas(self, model_cfg: dict, prompt: dict) -> list[float]:
        """musubi-tuner's Z-Image schedule (zimage_utils.get_timesteps_sigmas): linspace(1000, 1, steps + 1) without
        its last point, / 1000, i.e. 1 - 0.999 i / steps; diffusers' ZImagePipeline spaces 1 - i / steps (within
        0.001). The default scheduler spacing (1 down to 1/1000) would put the last step near 0 instead of 1/steps."""
        steps = int(prompt["steps"])
        return [1.0 - 0.999 * i / steps for i in range(steps)]

    def sample(self, model_cfg: dict, request):
        """The default loop, with Z-Image's guidance g (v_pos + g (v_pos - v_neg) when g > 1, else none) given to
        it as the standard form's g + 1."""
        from musubi_pipe.sampling.denoise import flow_match_sample

        def standard(g):
            return float(g) + 1.0 if g is not None and float(g) > 1.0 else 1.0

        p = request.prompt
        prompt = dict(p, guidance_scale=standard(p["guidance_scale"]),
                      guidance_scale_high=standard(p.get("guidance_scale_high", p["guidance_scale"])))
        return flow_match_sample(self, model_cfg, replace(request, prompt=prompt))

    def dit_tensors(self, dit, expert: str = ""):
        from musubi_pipe.models.zimage.dit_tensors import dit_tensors

        return dit_tensors(dit, expert)

    def build_tiny(self, root: Path, task: str) -> dict[str, str]:
        marker = Path(root) / f".tiny_zimage_v{TINY_VERSION}"
        if marker.is_file():
            paths = json.loads(marker.read_text())
            if all(Path(p).exists() for p in paths.values()):
                return paths
        from musubi_pipe.models.zimage import tiny

        paths = tiny.write_tiny(root)
        marker.write_text(json.dumps(paths))
        return paths


FAMILY = ZImageFamily()
