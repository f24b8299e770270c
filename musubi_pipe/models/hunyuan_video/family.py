"""The HunyuanVideo family (T2V training and sampling; SkyReels V1 T2V/I2V sampling) behind `get_family("hunyuan_video")`.

Models: diffusers `HunyuanVideoTransformer3DModel` and `AutoencoderKLHunyuanVideo` loaded from the files users
have (loading.py, locate.py, keymap.py), the LLaVA-Llama-3 LLM and CLIP-L text encoders through transformers
(text.py). This module never imports torch at import time; loaders are imported inside the methods.

Conditioning: the DiT takes the LLM's hidden states (with their attention mask), CLIP-L's pooled output and an
embedded guidance scale. Sampling passes `sampling.embedded_guidance_scale` (default 6.0; SkyReels 1.0) ×1000, as
diffusers' and musubi-tuner's pipelines do. Training passes `model.train_guidance_scale` (musubi-tuner's
`--guidance_scale`, default 1.0) unscaled, as musubi-tuner's trainer does; ×1000 with training.conventions=exact. SkyReels V1 I2V concatenates the start
image's latents, zero-padded over the frames, to the noisy latents (32 input channels).
"""

from __future__ import annotations

import json
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.base import Expert, Family, Geometry, TrainingInputs
from musubi_pipe.models.hunyuan_video import musubi
from musubi_pipe.models.hunyuan_video.names import LORA_NAMING, block_linears, input_groups
from musubi_pipe.models.hunyuan_video.tasks import HunyuanTask, get_task

TINY_VERSION = 1  # bump when tiny.py or tiny_text.py change what they write
VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)
LATENT_CHANNELS = 16
# musubi-tuner's maximum --blocks_to_swap for HunyuanVideo training (20 double + 40 single blocks)
MAX_BLOCKS_TO_SWAP = 36


OFFICIAL_BLOCKS = 60  # 20 double-stream + 40 single-stream blocks
TINY_BLOCKS = 4  # tiny.TINY_DIT_CONFIG: 2 + 2 (torch-free here; tests check they agree)


class HunyuanVideoFamily(Family):
    """HunyuanVideo (tasks.py); see models/base.py for the method contracts."""

    name = "hunyuan_video"
    modelspec_arch = "hunyuan-video"
    text_dtype_key = "text_encoder_dtype"
    lora_naming = LORA_NAMING
    supports_loraid = False
    fp8_text_key = "fp8_llm"  # musubi-tuner's name of memory.fp8_text_encoder here: the LLM only; CLIP-L is small
    # blocks_to_swap of each memory preset, by model_size (memory.blocks_to_swap=preset), of 60 (20 double + 40 single)
    swap_presets = {
        "24gb": {"hunyuan_video": 30, "tiny": 0},
        "16gb": {"hunyuan_video": 44, "tiny": 1},
        "12gb": {"hunyuan_video": 54, "tiny": 1},
    }
    block_lists = ("double_blocks", "single_blocks")
    tiny_models = {"tiny-t2v": "hunyuan_video/tiny", "tiny-skyreels-i2v": "hunyuan_video/tiny_skyreels_i2v"}
    # the model group's options before they moved under conf/model/hunyuan_video/: still accepted on the command line
    config_aliases = {
        "hunyuan_video_t2v": "hunyuan_video/t2v",
        "hunyuan_video_skyreels_i2v": "hunyuan_video/skyreels_i2v",
        "hunyuan_video_tiny": "hunyuan_video/tiny",
        "hunyuan_video_tiny_skyreels_i2v": "hunyuan_video/tiny_skyreels_i2v",
    }
    musubi_network_module = "networks.lora"  # musubi-tuner's LoRA module (ss_network_module)
    musubi_scripts = musubi.SCRIPTS  # tools from-musubi: its scripts, flags, defaults and hints (musubi.py)
    musubi_flags = musubi.FLAGS
    musubi_defaults = musubi.DEFAULTS
    musubi_hints = musubi.HINTS
    modelspec_implementation = "https://github.com/Tencent/HunyuanVideo"
    # memory.fp8_base stores the Linears of the double and single blocks except their modulation
    # (diffusers' norm1.linear, norm1_context.linear, norm.linear)
    fp8_layers = (("transformer_blocks.",), ("norm",))
    # musubi-tuner's networks/lora.py: modulation is never trained unless include_patterns re-admit it
    lora_default_excludes = (r".*(img_mod|txt_mod|modulation).*",)
    model_keys = {
        "text_encoder1": "str",  # LLaVA-Llama-3: ComfyUI llava_llama3_fp16.safetensors or the official text_encoder/
        "text_encoder2": "str",  # CLIP-L: ComfyUI clip_l.safetensors or the official text_encoder_2/
        "text_encoder1_tokenizer": "str?",  # needed with a single file (xtuner/llava-llama-3-8b-v1_1-transformers)
        "text_encoder2_tokenizer": "str?",  # needed with a single file (openai/clip-vit-large-patch14)
        "text_encoder_dtype": ("auto", "float32", "bfloat16", "float16"),
        "dit_in_channels": "int?",  # null: the task's (16; SkyReels V1 I2V 32)
        "train_guidance_scale": "float",  # the embedded guidance the DiT sees in training (musubi --guidance_scale)
        "vae_tiling": "bool",  # tiled VAE (musubi --vae_tiling)
        "vae_chunk_size": "int?",  # musubi --vae_chunk_size (see loading.load_vae for what it maps to)
        "vae_spatial_tile_sample_min_size": "int?",  # musubi --vae_spatial_tile_sample_min_size (default 256)
    }

    # -- what the task is ---------------------------------------------------------------------
    def musubi_model(self, flags: dict) -> str:
        return musubi.model_option(flags)

    def geometry(self, model_cfg: dict) -> Geometry:
        return Geometry(get_task(model_cfg.get("task")).fps, VAE_STRIDE, PATCH, LATENT_CHANNELS)

    def experts(self, model_cfg: dict) -> list[Expert]:
        return [Expert("", "model.dit", 0.0, 1.0)]

    def sample_image(self, model_cfg: dict) -> str:
        return "required" if get_task(model_cfg.get("task")).conditioning == "image" else "none"

    def sampling_defaults(self, model_cfg: dict) -> dict:
        task = get_task(model_cfg.get("task"))
        return {
            "steps": task.sample_steps,
            "shift": task.shift,
            "guidance_scale": task.guidance_scale,
            "guidance_scale_high": task.guidance_scale,
            "embedded_guidance_scale": task.embedded_guidance_scale,
            "negative_prompt": task.negative_prompt,
            "fps": task.fps,
        }

    # -- config checks and cache identities ---------------------------------------------------
    def uses_controls(self, model_cfg: dict) -> bool:
        return False

    def _in_channels(self, model_cfg: dict, task: HunyuanTask) -> int:
        value = model_cfg.get("dit_in_channels")
        return task.in_channels if value is None else int(value)

    def check_config(self, model_cfg: dict) -> list[tuple[str, str]]:
        from musubi_pipe.models.hunyuan_video import locate, text

        try:
            task = get_task(model_cfg.get("task"))
        except ConfigError as e:
            return e.problems
        problems = []
        value = model_cfg.get("dit_in_channels")
        if value is not None and value != task.in_channels:
            problems.append(("model.dit_in_channels", f"is {value} but model.task={task.name} takes {task.in_channels} "
                             "(16 for T2V, 32 for SkyReels V1 I2V); set the task that matches the DiT"))
        for check in (lambda: locate.check_dit(model_cfg.get("dit"), "model.dit", self._in_channels(model_cfg, task)),
                      lambda: locate.check_vae(model_cfg.get("vae"))):
            try:
                check()
            except ConfigError as e:
                problems += e.problems
        problems += text.check_text_encoders(model_cfg)
        for key in ("vae_chunk_size", "vae_spatial_tile_sample_min_size"):
            size = model_cfg.get(key)
            if size is not None and size <= 0:
                problems.append((f"model.{key}", f"is {size}; use a positive size or null"))
        return problems

    def check_stages(self, model_cfg: dict, stages) -> list[tuple[str, str]]:
        task = get_task(model_cfg.get("task"))
        problems = []
        if any(s in ("cache_latents", "train") for s in stages) and not task.trainable:
            problems.append(("pipeline.stages", f"model.task={task.name} is inference only (as in musubi-tuner): "
                             "use pipeline.stages=[generate], or train model.task=t2v"))
        return problems

    def weight_files(self, model_cfg: dict, part: str, expert: str = "") -> list[Path]:
        from musubi_pipe.models.hunyuan_video import locate, text

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
        from musubi_pipe.models.hunyuan_video import text

        if part == "text":
            return {"arch": self.name, "part": part, "llm_max_length": text.LLM_MAX_LENGTH,
                    "template": text.PROMPT_TEMPLATE, "skip_layers": text.HIDDEN_STATE_SKIP_LAYER}
        # tiling changes the latents slightly: it is part of what the cache was made with
        return {"arch": self.name, "part": part, "tiling": bool(model_cfg.get("vae_tiling")),
                "chunk_size": model_cfg.get("vae_chunk_size"),
                "tile_size": model_cfg.get("vae_spatial_tile_sample_min_size")}

    def training_identity(self, model_cfg: dict) -> dict:
        return {"task": get_task(model_cfg.get("task")).name,
                "train_guidance_scale": float(model_cfg.get("train_guidance_scale", 1.0))}

    # -- loaders ------------------------------------------------------------------------------
    def load_vae(self, model_cfg: dict, device, dtype):
        from musubi_pipe.models.hunyuan_video import loading

        return loading.load_vae(model_cfg.get("vae"), device, dtype, tiling=bool(model_cfg.get("vae_tiling")),
                                chunk_size=model_cfg.get("vae_chunk_size"),
                                tile_sample_min_size=model_cfg.get("vae_spatial_tile_sample_min_size"))

    def load_text_encoder(self, model_cfg: dict, device, dtype, fp8: bool = False):
        from musubi_pipe.models.hunyuan_video import text

        return text.load_text_encoder(model_cfg, device, dtype, fp8=fp8)

    def load_dit(self, model_cfg: dict, device, dtype, expert: str = ""):
        from musubi_pipe.models.hunyuan_video import loading

        task = get_task(model_cfg.get("task"))
        return loading.load_dit(model_cfg.get("dit"), device, dtype, in_channels=self._in_channels(model_cfg, task))

    def blocks(self, dit) -> list:
        return list(dit.transformer_blocks) + list(dit.single_transformer_blocks)

    def num_blocks(self, model_cfg: dict) -> int:
        return TINY_BLOCKS if get_task(model_cfg.get("task")).tiny else OFFICIAL_BLOCKS

    def model_size(self, model_cfg: dict) -> str:
        return "tiny" if get_task(model_cfg.get("task")).tiny else "hunyuan_video"

    def lora_targets(self, dit) -> dict:
        """{official name: nn.Linear, or FusedLinear of the diffusers parts of a fused official module} of every
        Linear of the double and single blocks (modulation included; lora_default_excludes leaves it out)."""
        from musubi_pipe.network.fused import FusedLinear

        modules = dict(dit.named_modules())
        targets = {}
        linears = block_linears(len(dit.transformer_blocks), len(dit.single_transformer_blocks))
        for official, parts in linears.items():
            found = [modules[p] for p in parts]
            targets[official] = found[0] if len(found) == 1 else FusedLinear(found, input_groups(official))
        return targets

    # -- training and sampling ----------------------------------------------------------------
    def training_inputs(self, model_cfg: dict, latents, noise, t, timesteps, cached: dict, generator,
                        conventions: str = "musubi") -> TrainingInputs:
        import torch

        t_b = t.view(-1, 1, 1, 1, 1).to(latents)
        guidance = torch.full((latents.shape[0],), float(model_cfg.get("train_guidance_scale", 1.0)))
        # musubi-tuner passes --guidance_scale to the DiT as it is in training (x1000 only when sampling)
        dit_guidance = guidance if conventions == "musubi" else guidance * 1000.0
        return TrainingInputs(noisy=(1 - t_b) * latents + t_b * noise, timesteps=timesteps, target=noise - latents,
                              cond={"dit_guidance": dit_guidance})

    def predict(self, dit, noisy_latents, timesteps, text_embeds: list, cond: dict | None = None):
        import torch
        import torch.nn.functional as F

        cond = cond or {}
        device, dtype = noisy_latents.device, dit.dtype
        lengths = [e["llm"].shape[0] for e in text_embeds]
        longest = max(lengths)
        llm = torch.stack([F.pad(e["llm"], (0, 0, 0, longest - e["llm"].shape[0])) for e in text_embeds])
        mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths], device=device)
        pooled = torch.stack([e["clip_pooled"] for e in text_embeds])
        x = noisy_latents.to(dtype)
        if "latents_image" in cond:
            x = torch.cat([x, cond["latents_image"].to(device, dtype).expand(x.shape[0], -1, -1, -1, -1)], dim=1)
        batch = x.shape[0]
        if "dit_guidance" in cond:  # training: the value the DiT sees (training_inputs)
            guidance = torch.as_tensor(cond["dit_guidance"], dtype=torch.float32).reshape(-1).expand(batch).to(device)
        else:  # sampling: the embedded guidance scale, x1000 as diffusers' and musubi-tuner's pipelines pass it
            guidance = cond.get("guidance")
            guidance = torch.ones(batch) if guidance is None else guidance
            guidance = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(batch).to(device) * 1000.0
        out = dit(hidden_states=x, timestep=timesteps.to(device), encoder_hidden_states=llm.to(device, dtype),
                  encoder_attention_mask=mask, pooled_projections=pooled.to(device, dtype),
                  guidance=guidance.to(dtype), return_dict=False)[0]
        return out

    def dit_tensors(self, dit, expert: str = ""):
        from musubi_pipe.models.hunyuan_video.dit_tensors import dit_tensors

        return dit_tensors(dit, expert)

    def build_tiny(self, root: Path, task: str) -> dict[str, str]:
        marker = Path(root) / f".tiny_hunyuan_v{TINY_VERSION}_{task}"
        if marker.is_file():
            paths = json.loads(marker.read_text())
            if all(Path(p).exists() for p in paths.values()):
                return paths
        from musubi_pipe.models.hunyuan_video import tiny, tiny_text

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        variant = {"tiny-t2v": "official", "tiny-skyreels-i2v": "skyreels_i2v"}[get_task(task).name]
        paths = {"dit": str(tiny.write_tiny_dit(root, variant)), "vae": str(tiny.write_tiny_vae(root, "official"))}
        paths |= {k: v for k, v in tiny_text.write_tiny_text_encoders(root, "comfy").items() if v is not None}
        marker.write_text(json.dumps(paths))
        return paths


FAMILY = HunyuanVideoFamily()
