"""The Wan family (Wan2.1 T2V/I2V, Wan2.2 T2V-A14B/I2V-A14B with two experts, TI2V-5B) behind `get_family("wan")`.

This module never imports torch at import time (config checks and cache keys run without it); the
loaders (loading.py, t5.py, clip.py) and the tiny-model builder (tiny.py) are imported inside the
methods that need them. The `locate_*` functions decide what a configured path is and are shared
with the loaders, so `check_config`, `weight_files` and the loaders always agree.

Conditioning (tasks.py): "image" tasks feed the DiT [noisy latents, mask, first-frame latents] and,
for Wan2.1 I2V, a CLIP embedding; "first_frame" (TI2V-5B) replaces the first latent frame by the
clean image latent, gives its tokens timestep 0 and predicts for it exactly the velocity that keeps
it clean, so the sampler and the loss need no special case.
"""

from __future__ import annotations

import json
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.base import Expert, Family, Geometry, TrainingInputs
from musubi_pipe.models.wan import clip as clip_files
from musubi_pipe.models.wan import t5 as t5_files
from musubi_pipe.models.wan import musubi
from musubi_pipe.models.wan.locate import check_dit, check_vae, locate_dit, locate_vae
from musubi_pipe.models.wan.names import LORA_NAMING, official_module_name
from musubi_pipe.models.wan.tasks import WanTask, get_task

TINY_VERSION = 5  # bump when tiny.py changes what it writes
DEFAULT_FIRST_FRAME_RATIO = 0.5

# the model config key holding each expert's weights ("" = the only DiT)
_EXPERT_KEYS = {"": "model.dit", "low_noise": "model.dit", "high_noise": "model.dit_high_noise"}


def _dit_value(model_cfg: dict, expert: str):
    """(config key, configured path) of an expert's DiT weights."""
    key = _EXPERT_KEYS[expert]
    return key, model_cfg.get(key.removeprefix("model."))


def boundary(model_cfg: dict, task: WanTask) -> float | None:
    """The expert boundary as t in (0, 1): model.timestep_boundary, else the task's (values > 1 are /1000)."""
    if task.boundary is None:
        return None
    value = model_cfg.get("timestep_boundary")
    if value is None:
        return task.boundary
    return value / 1000.0 if value > 1 else float(value)


def first_frame_ratio(model_cfg: dict) -> float:
    value = model_cfg.get("first_frame_ratio")
    return DEFAULT_FIRST_FRAME_RATIO if value is None else float(value)


class WanFamily(Family):
    """Wan2.1 and Wan2.2 (tasks in tasks.py); see models/base.py for the method contracts."""

    name = "wan"
    modelspec_arch = "wan2.1"  # musubi writes wan2.1 for Wan2.2 too
    text_dtype_key = "t5_dtype"
    lora_naming = LORA_NAMING
    fp8_text_key = "fp8_t5"  # musubi-tuner's name of memory.fp8_text_encoder for Wan
    # blocks_to_swap of each memory preset, by model_size (memory.blocks_to_swap=preset); tiny swaps 1 of 2 to test it
    swap_presets = {
        "24gb": {"wan_14b": 20, "wan_5b": 0, "wan_1.3b": 0, "tiny": 0},
        "16gb": {"wan_14b": 30, "wan_5b": 10, "wan_1.3b": 0, "tiny": 1},
        "12gb": {"wan_14b": 36, "wan_5b": 20, "wan_1.3b": 10, "tiny": 1},
    }
    block_lists = ("blocks",)
    tiny_models = {"tiny-t2v": "wan/tiny", "tiny-i2v": "wan/tiny_i2v", "tiny-t2v-A14B": "wan/tiny_t2v_a14b",
                   "tiny-i2v-A14B": "wan/tiny_i2v_a14b", "tiny-ti2v-5B": "wan/tiny_ti2v_5b"}
    # the model group's options before they moved under conf/model/wan/: still accepted on the command line
    config_aliases = {
        "wan21_t2v_14b": "wan/t2v_14b",
        "wan21_t2v_1_3b": "wan/t2v_1_3b",
        "wan21_i2v_14b": "wan/i2v_14b",
        "wan22_t2v_a14b": "wan/t2v_a14b",
        "wan22_i2v_a14b": "wan/i2v_a14b",
        "wan22_ti2v_5b": "wan/ti2v_5b",
        "wan_tiny": "wan/tiny",
        "wan_tiny_i2v": "wan/tiny_i2v",
        "wan_tiny_t2v_a14b": "wan/tiny_t2v_a14b",
        "wan_tiny_i2v_a14b": "wan/tiny_i2v_a14b",
        "wan_tiny_ti2v_5b": "wan/tiny_ti2v_5b",
    }
    musubi_network_module = "networks.lora_wan"  # musubi-tuner's LoRA module (ss_network_module)
    musubi_scripts = musubi.SCRIPTS  # tools from-musubi: its scripts, flags, defaults and hints (musubi.py)
    musubi_flags = musubi.FLAGS
    musubi_hints = musubi.HINTS
    modelspec_implementation = "https://github.com/Wan-Video/Wan2.1"
    # memory.fp8_base stores the Linears inside the blocks; modulation (scale_shift_table), norms,
    # embeddings and the head stay in the DiT's dtype (musubi-tuner's Wan targets and excludes)
    fp8_layers = (("blocks.",), ("norm",))
    # musubi-tuner's networks/lora_wan.py (no Linear inside a block matches it; kept for include_patterns parity)
    lora_default_excludes = (r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*",)
    # model.* keys of this family beyond the common ones (config/schema.py), with their types
    model_keys = {
        "dit_high_noise": "str?",  # Wan2.2 A14B: the high-noise expert (model.dit is the low-noise one)
        "t5": "str",
        "t5_tokenizer": "str",
        "t5_dtype": ("auto", "float32", "bfloat16", "float16"),
        "clip": "str?",  # Wan2.1 I2V only
        "timestep_boundary": "float?",  # Wan2.2 A14B; null = the task's (T2V 0.875, I2V 0.9)
        "first_frame_ratio": "float?",  # TI2V-5B: share of video batches trained as image-to-video
    }

    # -- what the task is ---------------------------------------------------------------------
    def musubi_model(self, flags: dict) -> str:
        return musubi.model_option(flags)

    def geometry(self, model_cfg: dict) -> Geometry:
        task = get_task(model_cfg.get("task"))
        return Geometry(task.fps, task.vae_stride, tuple(task.dit_config["patch_size"]), task.latent_channels)

    def experts(self, model_cfg: dict) -> list[Expert]:
        task = get_task(model_cfg.get("task"))
        b = boundary(model_cfg, task)
        if b is None:
            return [Expert("", _EXPERT_KEYS[""], 0.0, 1.0)]
        return [Expert("high_noise", _EXPERT_KEYS["high_noise"], b, 1.0), Expert("low_noise", _EXPERT_KEYS["low_noise"], 0.0, b)]

    def sample_image(self, model_cfg: dict) -> str:
        conditioning = get_task(model_cfg.get("task")).conditioning
        return {"image": "required", "first_frame": "optional"}.get(conditioning, "none")

    def sampling_defaults(self, model_cfg: dict) -> dict:
        task = get_task(model_cfg.get("task"))
        return {
            "steps": task.sample_steps,
            "shift": task.shift,
            "guidance_scale": task.guidance_scale,
            "guidance_scale_high": task.guidance_scale_high if task.guidance_scale_high is not None else task.guidance_scale,
            "negative_prompt": "",
            "fps": task.fps,
        }

    # -- config checks and cache identities ---------------------------------------------------
    supports_loraid = True

    def check_stages(self, model_cfg: dict, stages) -> list[tuple[str, str]]:
        return []  # every Wan task trains and samples

    def uses_controls(self, model_cfg: dict) -> bool:
        # Fun-Control and one-frame training (the Wan tasks that take control media) are not built yet
        return False

    def check_config(self, model_cfg: dict) -> list[tuple[str, str]]:
        try:
            task = get_task(model_cfg.get("task"))
        except ConfigError as e:
            return e.problems
        problems = []
        checks = [lambda e=e: check_dit(_dit_value(model_cfg, e)[1], task, _dit_value(model_cfg, e)[0], e)
                  for e in task.experts]
        checks += [
            lambda: check_vae(model_cfg.get("vae"), task),
            lambda: t5_files.check_t5(model_cfg.get("t5"), task),
            lambda: t5_files.locate_tokenizer(model_cfg.get("t5_tokenizer")),
        ]
        if task.clip_config:
            checks.append(lambda: clip_files.check_clip(model_cfg.get("clip"), task))
        for check in checks:
            try:
                check()
            except ConfigError as e:
                problems += e.problems
        problems += self._unused_keys(model_cfg, task)
        return problems

    @staticmethod
    def _unused_keys(model_cfg: dict, task: WanTask) -> list[tuple[str, str]]:
        problems = []
        if model_cfg.get("dit_high_noise") and task.boundary is None:
            problems.append(("model.dit_high_noise", f"is set but model.task={task.name} has one DiT; remove it"))
        if model_cfg.get("clip") and not task.clip_config:
            problems.append(("model.clip", f"is set but model.task={task.name} uses no CLIP image encoder "
                                           "(only Wan2.1 I2V does); remove it"))
        value = model_cfg.get("timestep_boundary")
        if value is not None:
            if task.boundary is None:
                problems.append(("model.timestep_boundary", f"is set but model.task={task.name} has one DiT; remove it"))
            elif not (0 < value < 1 or 1 < value < 1000):
                problems.append(("model.timestep_boundary", f"is {value}; use a value in (0, 1) such as 0.875, or in timesteps such as 875"))
        ratio = model_cfg.get("first_frame_ratio")
        if ratio is not None and task.conditioning != "first_frame":
            problems.append(("model.first_frame_ratio", f"is set but model.task={task.name} has no first-frame "
                                                        "conditioning (only ti2v-5B does); remove it"))
        elif ratio is not None and not 0 <= ratio <= 1:
            problems.append(("model.first_frame_ratio", f"is {ratio}; use a value in [0, 1]"))
        return problems

    def weight_files(self, model_cfg: dict, part: str, expert: str = "") -> list[Path]:
        task = get_task(model_cfg.get("task"))
        if part == "vae":
            files = locate_vae(model_cfg.get("vae")).files
            if task.clip_config:  # the CLIP embedding is cached with the latents
                files += clip_files.locate_clip(model_cfg.get("clip")).files
        elif part == "text":
            files = t5_files.locate_t5(model_cfg.get("t5")).files + t5_files.locate_tokenizer(model_cfg.get("t5_tokenizer")).files
        elif part == "dit":
            key, value = _dit_value(model_cfg, expert)
            files = locate_dit(value, key, expert).files
        else:
            raise ValueError(f"unknown model part {part!r}; expected 'vae', 'text' or 'dit'")
        return sorted(files)

    def encoder_identity(self, model_cfg: dict, part: str) -> dict:
        # What the encoders compute depends on these, not on the task name: Wan2.1 and Wan2.2 T2V
        # share latents, and every Wan task shares text embeddings of one length.
        task = get_task(model_cfg.get("task"))
        if part == "text":
            return {"arch": self.name, "part": part, "text_len": task.text_len}
        # first_frame conditioning is taken from the cached latents themselves
        conditioning = "image" if task.conditioning == "image" else "none"
        return {"arch": self.name, "part": part, "vae": task.vae_version, "conditioning": conditioning,
                "clip": bool(task.clip_config)}

    def training_identity(self, model_cfg: dict) -> dict:
        task = get_task(model_cfg.get("task"))
        identity = {"task": task.name, "boundary": boundary(model_cfg, task)}
        if task.conditioning == "first_frame":
            identity["first_frame_ratio"] = first_frame_ratio(model_cfg)
        return identity

    # -- loaders ------------------------------------------------------------------------------
    def load_vae(self, model_cfg: dict, device, dtype):
        from musubi_pipe.models.wan import loading

        task = get_task(model_cfg.get("task"))
        clip = clip_files.load_clip(model_cfg.get("clip"), task, device, dtype) if task.clip_config else None
        return loading.load_vae(model_cfg.get("vae"), task, device, dtype, clip=clip)

    def load_text_encoder(self, model_cfg: dict, device, dtype, fp8: bool = False):
        task = get_task(model_cfg.get("task"))
        return t5_files.load_text_encoder(model_cfg.get("t5"), model_cfg.get("t5_tokenizer"), task, device, dtype,
                                          fp8=fp8)

    def load_dit(self, model_cfg: dict, device, dtype, expert: str = ""):
        from musubi_pipe.models.wan import loading

        key, value = _dit_value(model_cfg, expert)
        task = get_task(model_cfg.get("task"))
        return loading.load_dit(value, task, device, dtype, key=key, expert=expert)

    def blocks(self, dit) -> list:
        return list(dit.blocks)

    def num_blocks(self, model_cfg: dict) -> int:
        return get_task(model_cfg.get("task")).dit_config["num_layers"]

    def model_size(self, model_cfg: dict) -> str:
        name = get_task(model_cfg.get("task")).name
        if name.startswith("tiny"):
            return "tiny"
        return "wan_1.3b" if "1.3B" in name else "wan_5b" if "5B" in name else "wan_14b"

    def lora_targets(self, dit) -> dict:
        from torch import nn

        targets = {}
        for name, module in dit.named_modules():
            official = official_module_name(name)
            if official is not None and isinstance(module, nn.Linear):
                targets[official] = module
        return targets

    # -- training and sampling ----------------------------------------------------------------
    def training_inputs(self, model_cfg: dict, latents, noise, t, timesteps, cached: dict, generator,
                        conventions: str = "musubi") -> TrainingInputs:
        import torch

        task = get_task(model_cfg.get("task"))
        t_b = t.view(-1, 1, 1, 1, 1).to(latents)
        inputs = TrainingInputs(noisy=(1 - t_b) * latents + t_b * noise, timesteps=timesteps, target=noise - latents)
        if task.conditioning == "image":
            inputs.cond = {k: cached[k] for k in ("latents_image", "clip") if k in cached}
        elif task.conditioning == "first_frame":
            # drawn on every step (also for images) so the RNG stream does not depend on the batch kind
            draw = torch.rand(1, generator=generator).item()
            if latents.shape[2] > 1 and draw < first_frame_ratio(model_cfg):
                inputs.cond = {"first_frame": latents[:, :, :1]}
                mask = torch.ones(1, 1, latents.shape[2], 1, 1)
                mask[:, :, 0] = 0  # the given frame is not predicted
                inputs.mask = mask
        return inputs

    def predict(self, dit, noisy_latents, timesteps, text_embeds: list, cond: dict | None = None):
        import torch
        import torch.nn.functional as F

        cond = cond or {}
        # Wan always sees text_len tokens: the real ones, then zeros (load_dit stores the task on the model)
        text_len = dit._wan_task.text_len
        device, dtype = noisy_latents.device, dit.dtype
        embeds = [e["embedding"] for e in text_embeds]
        context = torch.stack([F.pad(e, (0, 0, 0, text_len - e.shape[0])) for e in embeds]).to(device, dtype)
        x, timestep, extra = noisy_latents.to(dtype), timesteps.to(device), {}
        if "latents_image" in cond:
            x = torch.cat([x, cond["latents_image"].to(device, dtype)], dim=1)
        if "clip" in cond:
            extra["encoder_hidden_states_image"] = cond["clip"].to(device, dtype)
        first = cond.get("first_frame")
        if first is not None:
            x, timestep = _with_first_frame(x, first.to(device, dtype), timesteps.to(device), dit.config.patch_size)
        out = dit(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False, **extra)[0]
        if first is not None:
            # the velocity that moves the given frame straight to its clean latent: (x_t - x_0) / sigma
            sigma = (timesteps.to(device, torch.float32) / 1000).view(-1, 1, 1, 1, 1)
            out = out.clone()
            out[:, :, :1] = ((noisy_latents[:, :, :1].float() - first.float()) / sigma).to(out.dtype)
        return out

    def loraid_layout(self, model_cfg: dict):
        from musubi_pipe.models.base import LoraidLayout
        from musubi_pipe.models.wan.names import BLOCK_LINEARS

        config = get_task(model_cfg.get("task")).dit_config
        has_image_kv = bool(config.get("added_kv_proj_dim"))  # Wan2.1 I2V's cross_attn k_img / v_img
        templates = [o for _, o in BLOCK_LINEARS if has_image_kv or not o.endswith("_img")]
        return LoraidLayout(block_list="blocks", groups=("self_attn", "cross_attn", "ffn"),
                            num_blocks=config["num_layers"], experts=tuple(e.name for e in self.experts(model_cfg)),
                            candidates=tuple(t.format(b) for b in range(config["num_layers"]) for t in templates))

    def dit_tensors(self, dit, expert: str = ""):
        from musubi_pipe.models.wan.dit_tensors import dit_tensors

        return dit_tensors(dit, expert)

    def build_tiny(self, root: Path, task: str) -> dict[str, str]:
        # A marker written after a complete build lets warm runs skip importing torch/diffusers.
        marker = Path(root) / f".tiny_v{TINY_VERSION}_{task}"
        if marker.is_file():
            paths = json.loads(marker.read_text())
            if all(Path(p).exists() for p in paths.values()):
                return paths
        from musubi_pipe.models.wan import tiny

        paths = tiny.build_tiny(root, task)
        marker.write_text(json.dumps(paths))
        return paths


def _with_first_frame(x, first, timesteps, patch_size):
    """Replace latent frame 0 by `first` and give its tokens timestep 0 (per-token timesteps [B, tokens])."""
    import torch

    batch, _, frames, height, width = x.shape
    x = x.clone()
    x[:, :, :1] = first
    per_frame = (height // patch_size[1]) * (width // patch_size[2])
    timestep = timesteps.float().view(-1, 1).expand(batch, frames * per_frame).clone()
    timestep[:, :per_frame] = 0
    return x, timestep.to(torch.float32)


FAMILY = WanFamily()
