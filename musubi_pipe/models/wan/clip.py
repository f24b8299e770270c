"""The Wan2.1 I2V image encoder (the ViT-H/14 vision tower of open-clip xlm-roberta-large-vit-huge-14).

    source = locate_clip(cfg.model.clip)     # torch-free: what the path is
    check_clip(cfg.model.clip, task)         # torch-free: does it fit task.clip_config
    clip = load_clip(cfg.model.clip, task, "cuda", torch.bfloat16)
    tokens = clip.encode(first_frames)       # [B, 3, H, W] in [-1, 1] -> [B, 257, 1280]

Accepted `model.clip` values (Source.kind):
  official           Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (or a .safetensors
                     with its keys; or the root of an official Wan-AI download, which holds that file).
                     Only `visual.*` is used; `textual.*` (the XLM-R text tower) and `log_scale` are ignored.
  transformers_file  one .safetensors with transformers CLIPVisionModel(WithProjection) names, optionally
                     under `vision_model.` (ComfyUI's clip_vision_h.safetensors)
  pretrained         a transformers CLIPVisionModel(WithProjection) folder, or a diffusers pipeline root
                     with image_encoder/
Files are loaded into transformers' `CLIPVisionModel` built from `task.clip_config`. `encode` returns
the output of the second-to-last block without the final norm, as Wan (`use_31_block`) and diffusers'
WanImageToVideoPipeline do.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import Source
from musubi_pipe.models.statedict import (
    assign_state,
    cast_state,
    compile_rules,
    empty_model,
    match_rule,
    read_state_dict,
    reverse_rules,
    state_shapes,
)
from musubi_pipe.models.wan.locate import EncoderSpec, FrozenEncoder
from musubi_pipe.models.wan.tasks import WanTask

OFFICIAL_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
_CLIP_HINT = f"{OFFICIAL_CLIP_FILE}, ComfyUI clip_vision_h.safetensors, or a transformers CLIPVisionModel folder"
# CLIP's preprocessing constants (OpenAI CLIP; open-clip ViT-H uses the same)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# Rule = (transformers CLIPVisionModel key, official Wan key); `{}` is a block index, `*` weight/bias.
_CLIP_RULES: list[tuple[str, str]] = [
    ("embeddings.patch_embedding.weight", "visual.patch_embedding.weight"),  # no bias in either
    ("embeddings.class_embedding", "visual.cls_embedding"),
    ("embeddings.position_embedding.weight", "visual.pos_embedding"),
    ("pre_layrnorm.*", "visual.pre_norm.*"),
    ("encoder.layers.{}.layer_norm1.*", "visual.transformer.{}.norm1.*"),
    ("encoder.layers.{}.self_attn.out_proj.*", "visual.transformer.{}.attn.proj.*"),
    ("encoder.layers.{}.layer_norm2.*", "visual.transformer.{}.norm2.*"),
    ("encoder.layers.{}.mlp.fc1.*", "visual.transformer.{}.mlp.0.*"),
    ("encoder.layers.{}.mlp.fc2.*", "visual.transformer.{}.mlp.2.*"),
    ("post_layernorm.*", "visual.post_norm.*"),
]
# official tensors with leading singleton dims: cls [1, 1, D] = [D], pos [1, N, D] = [N, D]
_LEADING_ONES = {"visual.cls_embedding": 2, "visual.pos_embedding": 1}
# the official attention input projection is one Linear whose rows are [q; k; v]
_QKV_OFFICIAL = "visual.transformer.{}.attn.to_qkv.*"
_QKV_PARTS = [f"encoder.layers.{{}}.self_attn.{p}_proj.*" for p in "qkv"]

_TO_TRANSFORMERS = compile_rules(reverse_rules(_CLIP_RULES))
_TO_OFFICIAL = compile_rules(_CLIP_RULES)
_QKV_SPLIT = compile_rules([(_QKV_OFFICIAL, part) for part in _QKV_PARTS])  # one pattern, three targets
_QKV_PATTERN = _QKV_SPLIT[0][0]
_QKV_JOIN = compile_rules([(part, _QKV_OFFICIAL) for part in _QKV_PARTS])  # rule index = position in q, k, v
# official entries that are not part of the vision tower we build
_OFFICIAL_IGNORED = ("log_scale", "visual.head")
_OFFICIAL_IGNORED_PREFIX = "textual."
# transformers-file entries beyond CLIPVisionModel: the projection head and an old position-id buffer
_TRANSFORMERS_PREFIX = "vision_model."
_TRANSFORMERS_IGNORED = ("visual_projection.weight", "embeddings.position_ids")
_CLIP = EncoderSpec(
    name="CLIP vision", hint=_CLIP_HINT, official_file=OFFICIAL_CLIP_FILE, subfolder="image_encoder",
    task_config="clip_config", width="hidden_size", width_label="hidden size", layers="num_hidden_layers",
    # the hidden size is axis 0 of the patch embedding [D, 3, p, p]; transformers files may nest the tower
    signatures={
        "official": (("visual.patch_embedding.weight",), 0, re.compile(r"visual\.transformer\.(\d+)\.")),
        "transformers_file": (
            ("embeddings.patch_embedding.weight", _TRANSFORMERS_PREFIX + "embeddings.patch_embedding.weight"),
            0, re.compile(r"(?:vision_model\.)?encoder\.layers\.(\d+)\."),
        ),
    },
    mismatch_fix="point {key} at {hint}",
)


# -- locating and checking (torch-free) -------------------------------------------------------------
def locate_clip(value, key: str = "model.clip") -> Source:
    """Resolve `model.clip` to an official file, a transformers-named file or a CLIP vision folder.

    Raises ConfigError on `key` for a missing path, a file that is no CLIP vision tower, or a folder
    without a CLIP vision config.json.
    """
    return _CLIP.locate(value, key, clip_layout)


def clip_layout(names, path: Path, key: str) -> str:
    """Return "official" or "transformers_file" for a state dict with tensor `names`; ConfigError otherwise."""
    if "visual.patch_embedding.weight" in names:
        return "official"
    if any(n.startswith((_TRANSFORMERS_PREFIX, "embeddings.")) for n in names):
        return "transformers_file"
    message = f"{path} is not a CLIP vision encoder (no visual.* or vision_model.* tensors); set {key}=<{_CLIP_HINT}>"
    raise ConfigError([(key, message)])


def check_clip(value, task: WanTask, key: str = "model.clip") -> Source:
    """Raise ConfigError when `model.clip` does not fit `task.clip_config` (hidden size, layers); return its Source.

    Torch-free: reads safetensors headers or config.json; a .pth is checked by the loader instead.
    """
    if not task.clip_config:
        raise ConfigError([(key, f"is set but model.task={task.name} uses no CLIP image encoder; remove it")])
    return _CLIP.check(locate_clip(value, key), task, key)


# -- key maps ------------------------------------------------------------------------------------------
def _vision_state(state: dict) -> dict:
    """A transformers-named file's entries as CLIPVisionModel keys: prefix stripped, projection dropped."""
    out = {}
    for name, value in state.items():
        name = name.removeprefix(_TRANSFORMERS_PREFIX)
        if name not in _TRANSFORMERS_IGNORED:
            out[name] = value
    return out


def clip_to_transformers(state: dict) -> dict:
    """Official Wan CLIP keys -> `CLIPVisionModel` keys (vision tower only); ValueError on unknown keys."""
    out = {}
    for key, value in state.items():
        if key in _OFFICIAL_IGNORED or key.startswith(_OFFICIAL_IGNORED_PREFIX):
            continue
        m = _QKV_PATTERN.fullmatch(key)
        if m:
            for (_, template), part in zip(_QKV_SPLIT, value.chunk(3)):
                out[template.format(*m.groups())] = part.clone()  # own storage, so it can be saved alone
            continue
        hit = match_rule(key, _TO_TRANSFORMERS)
        if hit is None:
            raise ValueError(f"no transformers CLIPVisionModel key for official Wan CLIP key {key!r}")
        out[hit[1]] = value.reshape(value.shape[_LEADING_ONES.get(key, 0):])
    return out


def clip_to_official(state: dict, projection=None, projection_dim: int = 1024) -> dict:
    """`CLIPVisionModel` keys -> official Wan CLIP keys, so tiny models can be written as users get them.

    Adds `log_scale` (log(1 / 0.07)) and `visual.head` = `projection`.T (a visual_projection weight
    [projection_dim, D]), or zeros [D, projection_dim] without one. ValueError on unknown keys.
    """
    import torch

    out, qkv = {}, {}
    for key, value in state.items():
        hit = match_rule(key, _QKV_JOIN)
        if hit:
            qkv.setdefault(hit[1], [None] * 3)[hit[0]] = value
            continue
        hit = match_rule(key, _TO_OFFICIAL)
        if hit is None:
            raise ValueError(f"no official Wan CLIP key for transformers CLIPVisionModel key {key!r}")
        out[hit[1]] = value.reshape((1,) * _LEADING_ONES.get(hit[1], 0) + tuple(value.shape))
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"{name} needs q_proj, k_proj and v_proj; some are missing")
        out[name] = torch.cat(parts)
    embedding = out["visual.patch_embedding.weight"]
    out["visual.head"] = (projection.t().contiguous() if projection is not None
                          else torch.zeros(embedding.shape[0], projection_dim, dtype=embedding.dtype))
    out["log_scale"] = torch.tensor(math.log(1 / 0.07), dtype=embedding.dtype)
    return out


# -- the encoder ---------------------------------------------------------------------------------------
class WanCLIP(FrozenEncoder):
    """A frozen CLIP vision tower; `encode` maps frames to the image tokens Wan2.1 I2V cross-attends to."""

    def __init__(self, model):
        super().__init__(model)
        self.image_size = model.config.image_size

    def encode(self, pixels):
        """pixels [B, 3, H, W] in [-1, 1], any size -> [B, (image_size / patch)^2 + 1, hidden].

        Like Wan's clip.py: the whole frame is resized (bicubic, no crop) to image_size, mapped to
        [0, 1] and normalized; the result is the second-to-last block's output without the final norm.
        """
        import torch
        import torch.nn.functional as F

        x = pixels.to(self.device, torch.float32)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        x = ((x + 1) / 2 - mean) / std
        with torch.no_grad():
            return self.model(pixel_values=x.to(self.dtype), output_hidden_states=True).hidden_states[-2]


def load_clip(value, task: WanTask, device, dtype, key: str = "model.clip") -> WanCLIP:
    """Load the CLIP vision tower from any `model.clip` kind (module doc); frozen, eval, on `device`.

    Raises ConfigError on `key` when the weights do not fit `task.clip_config`.
    """
    from transformers import CLIPVisionModel

    source = check_clip(value, task, key)
    if source.kind == "pretrained":
        model = CLIPVisionModel.from_pretrained(source.path, dtype=dtype)
    else:
        model = _load_clip_file(source.path, task, dtype, key)
    return WanCLIP(model.to(device).eval().requires_grad_(False))


def _load_clip_file(path: Path, task: WanTask, dtype, key: str):
    """Build `CLIPVisionModel` from task.clip_config and assign an official or transformers-named file."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    raw = read_state_dict([path], key)
    kind = clip_layout(raw.keys(), path, key)  # a .pth may hold either layout
    _CLIP.check_signature(_CLIP.signature(state_shapes(raw), kind), task, path, key)
    try:
        state = _vision_state(raw) if kind == "transformers_file" else clip_to_transformers(raw)
    except ValueError as e:
        raise ConfigError([(key, f"{path} is not a CLIP vision encoder file ({e}); set {key}=<{_CLIP_HINT}>")]) from e
    model = empty_model(lambda: CLIPVisionModel(CLIPVisionConfig(**task.clip_config)))
    if next(iter(model.state_dict())).startswith(_TRANSFORMERS_PREFIX):  # transformers < 5 nests the tower
        state = {_TRANSFORMERS_PREFIX + k: v for k, v in state.items()}
    assign_state(model, cast_state(model, state, dtype), path, key, f"point {key} at {_CLIP_HINT}")
    return model
