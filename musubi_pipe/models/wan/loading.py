"""Load Wan2.1 models from the files users have: the DiT, the VAE and the UMT5 text encoder.

    dit = load_dit("wan2.1_t2v_1.3B_bf16.safetensors", get_task("t2v-1.3B"), "cuda", torch.bfloat16)
    vae = load_vae("Wan2.1_VAE.pth", task, "cuda", torch.bfloat16)      # WanVAE: encode/decode
    te = load_text_encoder(t5_dir, tokenizer_dir, task, "cuda", torch.bfloat16)  # WanTextEncoder

Official checkpoints are converted with diffusers' own key converters (keymap.py) into diffusers
models built from the task's config; diffusers folders go through `from_pretrained`. Every model is
returned frozen in eval mode. Which kind of path was given is decided by family.locate_*.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.wan.locate import locate_dit, locate_t5, locate_tokenizer, locate_vae
from musubi_pipe.models.wan.keymap import dit_to_diffusers, strip_prefix, vae_to_diffusers
from musubi_pipe.models.wan.tasks import TASKS, WanTask


def _tensor_shapes(files: tuple[Path, ...]) -> dict[str, tuple[int, ...]]:
    """Read every tensor's shape without loading the data (a 14B checkpoint is 28 GB)."""
    shapes = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_pt(f).items()})
    return shapes


def _load_pt(path: Path) -> dict:
    # mmap: tensors are read from disk only when used
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _read_tensors(files: tuple[Path, ...]) -> dict:
    state = {}
    for f in files:
        state.update(load_file(f) if f.suffix == ".safetensors" else _load_pt(f))
    return state


def _describe(sig: dict) -> str:
    return f"dim {sig['dim']}, {sig['layers']} layers, in {sig['in_channels']}, ffn {sig['ffn_dim']}"


def _check_dit_signature(found: dict, task: WanTask, path: Path, key: str) -> None:
    """Raise ConfigError naming the detected variant when a DiT's shapes do not match `task`."""
    expected = task.dit_signature()
    if found == expected:
        return
    detected = next((t.name for t in TASKS.values() if t.dit_signature() == found), None)
    what = f"a {detected} checkpoint" if detected else "a Wan checkpoint of no supported task"
    fix = f"set model.task={detected} or " if detected else ""
    raise ConfigError([(key, (
        f"{path} is {what} ({_describe(found)}) but model.task={task.name} expects {_describe(expected)}; "
        f"{fix}point {key} at a {task.name} checkpoint"
    ))])


def _official_dit_signature(shapes: dict, path: Path, key: str) -> dict:
    if "head.modulation" not in shapes:
        message = f"{path} is not a Wan DiT checkpoint (no head.modulation tensor); point {key} at a Wan DiT file"
        raise ConfigError([(key, message)])
    out_channels, in_channels = shapes["patch_embedding.weight"][:2]
    return {
        "dim": out_channels,
        "layers": len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}),
        "in_channels": in_channels,
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "image_dim": shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else 0,
    }


def _mismatch(expected: dict, state: dict) -> str | None:
    """Summarize how `state` differs from the model's `expected` keys and shapes (None if it fits)."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    problems = [f"{len(missing)} missing tensors (e.g. {missing[0]})"] if missing else []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        example = f"{k}: file {list(state[k].shape)}, model {list(expected[k].shape)}"
        problems.append(f"{len(reshaped)} tensors of other shapes (e.g. {example})")
    return "; ".join(problems) or None


def _build(model_cls, task: WanTask, config: dict, state: dict, dtype, path: Path, key: str):
    """Build `model_cls(**config)` without allocating, then assign `state` (diffusers keys) into it.

    Like `from_pretrained`, modules listed in `_keep_in_fp32_modules` stay float32.
    """
    with init_empty_weights():
        model = model_cls(**config)
    problem = _mismatch(model.state_dict(), state)
    if problem:
        fix = f"point {key} at a {task.name} file or change model.task"
        raise ConfigError([(key, f"{path} does not fit model.task={task.name}: {problem}; {fix}")])
    keep_fp32 = model_cls._keep_in_fp32_modules or []
    state = {
        k: v.to(torch.float32 if any(m in k.split(".") for m in keep_fp32) else dtype) if v.is_floating_point() else v
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_dit(path, task: WanTask, device, dtype, key: str = "model.dit") -> WanTransformer3DModel:
    """Load a frozen `WanTransformer3DModel` from an official file/shard set or a diffusers folder.

    The weights' shapes are checked against `task` before anything is built. The task is kept on the
    model as `_wan_task` (WanFamily.predict pads text to its text_len).
    """
    source = locate_dit(path, key)
    if source.kind == "pretrained":
        config = WanTransformer3DModel.load_config(source.path)
        found = {
            "dim": config["num_attention_heads"] * config["attention_head_dim"],
            "layers": config["num_layers"],
            "in_channels": config["in_channels"],
            "ffn_dim": config["ffn_dim"],
            "image_dim": config.get("image_dim") or 0,
        }
        _check_dit_signature(found, task, source.path, key)
        model = WanTransformer3DModel.from_pretrained(source.path, torch_dtype=dtype)
    else:
        shapes = strip_prefix(_tensor_shapes(source.files))
        _check_dit_signature(_official_dit_signature(shapes, source.path, key), task, source.path, key)
        state = dit_to_diffusers(_read_tensors(source.files))
        model = _build(WanTransformer3DModel, task, task.dit_config, state, dtype, source.path, key)
    model = model.to(device).eval().requires_grad_(False)
    model._wan_task = task
    return model


class WanVAE:
    """A frozen Wan2.1 VAE working on normalized latents (the diffusers WanPipeline convention).

    encode: pixels [B, 3, F, H, W] in [-1, 1], F = 4n + 1 -> (posterior mode - latents_mean) / latents_std,
    shape [B, 16, n + 1, H / 8, W / 8]. decode inverts that and returns pixels clamped to [-1, 1].
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
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


def load_vae(path, task: WanTask, device, dtype, key: str = "model.vae") -> WanVAE:
    """Load the Wan2.1 VAE from an official .pth/.safetensors file or a diffusers folder."""
    source = locate_vae(path, key)
    if source.kind == "pretrained":
        vae = AutoencoderKLWan.from_pretrained(source.path, torch_dtype=dtype)
    else:
        state = vae_to_diffusers(_read_tensors(source.files))
        vae = _build(AutoencoderKLWan, task, task.vae_config, state, dtype, source.path, key)
    return WanVAE(vae.to(device).eval().requires_grad_(False))


class WanTextEncoder:
    """UMT5 encoder + tokenizer; `encode` returns one [L_i, D] tensor per text, L_i = its real token count."""

    def __init__(self, tokenizer, model: UMT5EncoderModel, text_len: int):
        self.tokenizer = tokenizer
        self.model = model
        self.text_len = text_len

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, texts) -> list[torch.Tensor]:
        # same tokenization and trimming as diffusers' WanPipeline._get_t5_prompt_embeds
        batch = self.tokenizer(
            [prompt_clean(t) for t in texts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = batch.attention_mask.to(self.device)
        hidden = self.model(input_ids=batch.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        # clone: a slice would keep the whole padded batch alive and share storage between items
        return [h[:n].clone() for h, n in zip(hidden, mask.sum(dim=1).tolist())]


def load_text_encoder(t5_path, tokenizer_path, task: WanTask, device, dtype) -> WanTextEncoder:
    """Load a transformers UMT5 encoder folder and its tokenizer (folders or a pipeline root)."""
    t5 = locate_t5(t5_path)
    tokenizer = AutoTokenizer.from_pretrained(locate_tokenizer(tokenizer_path).path)
    model = UMT5EncoderModel.from_pretrained(t5.path, dtype=dtype)
    return WanTextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), task.text_len)
