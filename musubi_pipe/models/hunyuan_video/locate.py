"""Decide what a configured HunyuanVideo DiT/VAE path is and whether it fits, without torch.

`locate_dit`/`locate_vae` resolve a path into a `Source` (files.py): an official file (Tencent's
mp_rank_00_model_states.pt, a plain fp8_e4m3fn or Kijai/ComfyUI .safetensors, the VAE's
pytorch_model.pt), an official download folder (`hunyuan-video-t2v-720p/` with transformers/ and
vae/), a diffusers model folder or a diffusers pipeline root. `check_dit`/`check_vae` also read the
model from safetensors headers or config.json (milliseconds for a 25 GB checkpoint) and raise
ConfigError naming the key, the file, what it looks like and the fix. A .pt/.pth has no header: it
is accepted here and checked by the loaders (loading.py) with the same `dit_signature`/`vae_signature`.

    source = check_dit("skyreels_hunyuan_i2v_bf16.safetensors", in_channels=32)  # model.dit_in_channels
    dit_signature(shapes)  # {"hidden_size": 3072, "in_channels": 16, "guidance_embeds": True, ...}
"""

from __future__ import annotations

import re
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import Source, existing, folder_files, shard_set, state_dict_file, subfolder
from musubi_pipe.models.hunyuan_video.keymap import strip_dit_wrappers, vae_to_diffusers
from musubi_pipe.models.statedict import header_shapes
from musubi_pipe.models.files import read_config
from musubi_pipe.models.wan.locate import reject_fp8_scaled

DIT_HINT = (
    "a HunyuanVideo DiT: mp_rank_00_model_states.pt (or the hunyuan-video-t2v-720p folder), a bf16/fp8_e4m3fn "
    ".safetensors such as skyreels_hunyuan_i2v_bf16.safetensors, a diffusers transformer folder or a diffusers "
    "pipeline folder"
)
VAE_HINT = (
    "the HunyuanVideo VAE: hunyuan-video-t2v-720p/vae/pytorch_model.pt (or its folder), a .safetensors with the "
    "same names, a diffusers AutoencoderKLHunyuanVideo folder or a diffusers pipeline folder"
)
OFFICIAL_DIT_FILE = "mp_rank_00_model_states.pt"
OFFICIAL_VAE_FILE = "pytorch_model.pt"
DIT_CLASS, VAE_CLASS = "HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo"
# model.dit_in_channels -> what a DiT with that many input channels is
IN_CHANNELS = {16: "text-to-video", 32: "SkyReels V1 image-to-video"}

# diffusers HunyuanVideoTransformer3DModel / AutoencoderKLHunyuanVideo constructor defaults
_DIT_CONFIG_DEFAULTS = {"in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
                        "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0,
                        "patch_size": 2, "patch_size_t": 1, "guidance_embeds": True, "text_embed_dim": 4096,
                        "pooled_projection_dim": 768}
_VAE_CONFIG_DEFAULTS = {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                        "mid_block_add_attention": True}

# The tensors each DiT fact is read from: (official name, diffusers name).
_PATCH = ("img_in.proj.weight", "x_embedder.proj.weight")  # [hidden, in_channels, pt, ph, pw]
_HEAD = ("double_blocks.0.img_attn_q_norm.weight", "transformer_blocks.0.attn.norm_q.weight")  # [head_dim]
_OUT = ("final_layer.linear.weight", "proj_out.weight")  # [pt * ph * pw * out_channels, hidden]
_TEXT = ("txt_in.input_embedder.weight", "context_embedder.proj_in.weight")  # [hidden, text_embed_dim]
_POOLED = ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight")  # [hidden, pooled]
_MLP = ("double_blocks.0.img_mlp.fc1.weight", "transformer_blocks.0.ff.net.0.proj.weight")  # [mlp, hidden]
_GUIDANCE = ("guidance_in.mlp.0.weight", "time_text_embed.guidance_embedder.linear_1.weight")
_BLOCKS = {  # signature key -> (official block list, diffusers block list)
    "num_layers": ("double_blocks", "transformer_blocks"),
    "num_single_layers": ("single_blocks", "single_transformer_blocks"),
    "num_refiner_layers": ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks"),
}
# tensors of FramePack, which extends the HunyuanVideo DiT (diffusers HunyuanVideoFramepackTransformer3DModel)
_FRAMEPACK = ("clean_x_embedder.", "image_projection.")
# what other checkpoints look like: (a tensor only they have, description)
_OTHER_MODELS = [
    ("head.modulation", "a Wan DiT"),
    ("clean_x_embedder.proj.weight", "a FramePack DiT"),
    ("image_projection.up.weight", "a FramePack DiT"),
    ("img_in.weight", "a FLUX-style DiT (linear img_in)"),
    ("double_blocks.0.img_attn.qkv.weight", "a DiT in ComfyUI's own layer names (img_attn.qkv), which are not read"),
    ("encoder.conv1.weight", "a Wan VAE"),
    ("encoder.conv_in.conv.weight", "a VAE"),
    ("encoder.conv_in.weight", "an image VAE"),
    ("img_in.proj.weight", "a HunyuanVideo DiT"),
    ("x_embedder.proj.weight", "a HunyuanVideo DiT"),
    ("shared.weight", "a T5 text encoder"),
    ("model.embed_tokens.weight", "a language model"),
    ("text_model.embeddings.token_embedding.weight", "a CLIP text encoder"),
]


def _describe_other(names) -> str:
    """What a state dict that is not the expected model looks like, from its tensor names."""
    names = set(names)
    return next((what for marker, what in _OTHER_MODELS if marker in names), "no model this loader knows")


# --- locating -------------------------------------------------------------------------------------


def _reject_scaled_fp8_pt(path: Path, key: str) -> None:
    """Tencent's mp_rank_00_model_states_fp8.pt stores weights divided by per-layer scales kept in a
    sibling *_fp8_map.pt: loading it alone would give wrong weights."""
    scale_map = path.with_name(f"{path.stem}_map{path.suffix}")
    if path.suffix in (".pt", ".pth") and scale_map.is_file():
        raise ConfigError([(key, (
            f"{path} is Tencent's scaled fp8 DiT (its per-layer scales are in {scale_map.name}), which is not "
            f"supported; point {key} at {OFFICIAL_DIT_FILE} (bf16) or a plain fp8_e4m3fn .safetensors"
        ))])


def locate_dit(value, key: str = "model.dit") -> Source:
    """Resolve a DiT path into a Source: an official file or shard set, an official download folder
    (`transformers/mp_rank_00_model_states.pt`), a diffusers transformer folder or a pipeline root
    with transformer/. ConfigError on `key` for anything else."""
    path = existing(value, key, DIT_HINT)
    if path.is_file():
        _reject_scaled_fp8_pt(path, key)
        return Source("official", path, shard_set(state_dict_file(path, key, DIT_HINT), key))
    for official in (path / "transformers" / OFFICIAL_DIT_FILE, path / OFFICIAL_DIT_FILE):
        if official.is_file():
            return Source("official", official, (official,))
    folder = subfolder(path, "transformer")
    config = read_config(folder, key)
    if config.get("_class_name") != DIT_CLASS:
        found = f"a config.json of class {config['_class_name']}" if config.get("_class_name") else "no config.json"
        message = f"{folder} has {found} and no {OFFICIAL_DIT_FILE}; set {key}=<{DIT_HINT}>"
        raise ConfigError([(key, message)])
    return Source("pretrained", folder, folder_files(folder))


def locate_vae(value, key: str = "model.vae") -> Source:
    """Resolve a VAE path into a Source: an official file, an official vae/ folder (or download root)
    holding pytorch_model.pt, a diffusers VAE folder or a pipeline root with vae/."""
    path = existing(value, key, VAE_HINT)
    if path.is_file():
        return Source("official", path, (state_dict_file(path, key, VAE_HINT),))
    folder = subfolder(path, "vae")
    config = read_config(folder, key)
    if config.get("_class_name") == VAE_CLASS:
        return Source("pretrained", folder, folder_files(folder))
    # the official vae/ folder holds pytorch_model.pt next to a config.json of class AutoencoderKLCausal3D
    if (folder / OFFICIAL_VAE_FILE).is_file():
        return Source("official", folder / OFFICIAL_VAE_FILE, (folder / OFFICIAL_VAE_FILE,))
    found = f"a config.json of class {config['_class_name']}" if config.get("_class_name") else "no config.json"
    raise ConfigError([(key, f"{folder} has {found} and no {OFFICIAL_VAE_FILE}; set {key}=<{VAE_HINT}>")])


# --- the DiT --------------------------------------------------------------------------------------


def _layout_index(shapes) -> int | None:
    """0 for official names, 1 for diffusers names (the index into the name pairs above), None for neither."""
    return next((i for i in (0, 1) if _PATCH[i] in shapes and _HEAD[i] in shapes and _OUT[i] in shapes), None)


def dit_layout(names) -> str | None:
    """"official" or "diffusers": which names a DiT state dict (or its {name: shape}) uses; None for neither."""
    i = _layout_index(names)
    return None if i is None else ("official", "diffusers")[i]


def _count_blocks(names, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m[1] for name in names if (m := pattern.match(name))})


def dit_signature(shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """The architecture of a HunyuanVideo DiT from its tensor shapes {name: shape} (official or diffusers
    names, no prefixes), or None if it is not one. Keys: hidden_size, heads, head_dim, num_layers
    (double blocks), num_single_layers, num_refiner_layers, in_channels, out_channels, patch_size,
    patch_size_t, text_embed_dim, pooled_projection_dim, mlp_ratio, guidance_embeds."""
    i = _layout_index(shapes)
    if i is None or len(shapes[_PATCH[i]]) != 5 or _TEXT[i] not in shapes or _POOLED[i] not in shapes:
        return None
    if any(name.startswith(_FRAMEPACK) for name in shapes):
        return None
    hidden, in_channels, patch_t, patch, _ = shapes[_PATCH[i]]
    head_dim = shapes[_HEAD[i]][0]
    return {
        "hidden_size": hidden,
        "heads": hidden // head_dim,
        "head_dim": head_dim,
        **{name: _count_blocks(shapes, prefixes[i]) for name, prefixes in _BLOCKS.items()},
        "in_channels": in_channels,
        "out_channels": shapes[_OUT[i]][0] // (patch_t * patch * patch),
        "patch_size": patch,
        "patch_size_t": patch_t,
        "text_embed_dim": shapes[_TEXT[i]][1],
        "pooled_projection_dim": shapes[_POOLED[i]][1],
        "mlp_ratio": shapes[_MLP[i]][0] / hidden if _MLP[i] in shapes else 4.0,
        "guidance_embeds": _GUIDANCE[i] in shapes,
    }


def dit_signature_from_config(config: dict) -> dict | None:
    """`dit_signature` of a diffusers transformer config.json; None for another class."""
    if config.get("_class_name") != DIT_CLASS:
        return None
    c = {**_DIT_CONFIG_DEFAULTS, **config}
    return {
        "hidden_size": c["num_attention_heads"] * c["attention_head_dim"],
        "heads": c["num_attention_heads"],
        "head_dim": c["attention_head_dim"],
        **{name: c[name] for name in _BLOCKS},
        **{name: c[name] for name in ("in_channels", "out_channels", "patch_size", "patch_size_t", "text_embed_dim",
                                      "pooled_projection_dim", "mlp_ratio", "guidance_embeds")},
    }


def describe_dit(sig: dict) -> str:
    kind = IN_CHANNELS.get(sig["in_channels"], "unknown variant")
    return (f"in_channels {sig['in_channels']} ({kind}), hidden size {sig['hidden_size']}, "
            f"{sig['num_layers']} double + {sig['num_single_layers']} single blocks")


def check_dit_signature(found: dict | None, names, path: Path, key: str, in_channels: int | None) -> None:
    """Raise ConfigError on `key` when `found` (a `dit_signature`; None = not a HunyuanVideo DiT, then
    `names` say what the file looks like) is not a HunyuanVideo DiT with `in_channels` (None = any)."""
    if found is None:
        looks = _describe_other(names)
        looks = "an incomplete HunyuanVideo DiT" if looks == "a HunyuanVideo DiT" else looks
        raise ConfigError([(key, f"{path} is not a HunyuanVideo DiT (it looks like {looks}); set {key}=<{DIT_HINT}>")])
    if in_channels is None or found["in_channels"] == in_channels:
        return
    wanted = IN_CHANNELS.get(in_channels, f"{in_channels} input channels")
    other = {16: "a text-to-video DiT (mp_rank_00_model_states.pt)",
             32: "a SkyReels V1 I2V DiT (e.g. skyreels_hunyuan_i2v_bf16.safetensors)"}.get(in_channels, "another DiT")
    raise ConfigError([(key, (
        f"{path} is a HunyuanVideo DiT with {describe_dit(found)}, but model.dit_in_channels={in_channels} "
        f"({wanted}); point {key} at {other} or set model.dit_in_channels={found['in_channels']}"
    ))])


def check_dit(value, key: str = "model.dit", in_channels: int | None = None) -> Source:
    """Locate the DiT and check from config.json or safetensors headers that it is a HunyuanVideo DiT
    with `in_channels` input channels (model.dit_in_channels; None accepts any). ComfyUI fp8_scaled
    files are refused; .pt/.pth files are left to the loader. Returns the Source."""
    source = locate_dit(value, key)
    if source.kind == "pretrained":
        config = read_config(source.path, key)
        check_dit_signature(dit_signature_from_config(config), (), source.path, key, in_channels)
        return source
    shapes = header_shapes(source.files, key, f"set {key}=<{DIT_HINT}>")
    if shapes is not None:
        shapes = strip_dit_wrappers(shapes)
        reject_fp8_scaled(shapes, source.path, key)
        check_dit_signature(dit_signature(shapes), shapes, source.path, key, in_channels)
    return source


# --- the VAE --------------------------------------------------------------------------------------


def vae_signature(shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """{"latent_channels", "block_out_channels", "layers_per_block", "mid_block_add_attention"} of a
    HunyuanVideo VAE state dict {name: shape} (official = diffusers names), or None if it is not one."""
    needed = ("quant_conv.weight", "post_quant_conv.weight", "encoder.conv_in.conv.weight",
              "encoder.down_blocks.0.resnets.0.conv1.conv.weight", "decoder.conv_out.conv.weight")
    if not all(name in shapes for name in needed) or len(shapes["encoder.conv_in.conv.weight"]) != 5:
        return None
    levels = _count_blocks(shapes, "encoder.down_blocks")
    return {
        "latent_channels": shapes["post_quant_conv.weight"][0],
        "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"][0]
                               for i in range(levels)],
        "layers_per_block": _count_blocks(shapes, "encoder.down_blocks.0.resnets"),
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
    }


def vae_signature_from_config(config: dict) -> dict | None:
    """`vae_signature` of a diffusers AutoencoderKLHunyuanVideo config.json; None for another class."""
    if config.get("_class_name") != VAE_CLASS:
        return None
    c = {**_VAE_CONFIG_DEFAULTS, **config}
    return {name: (list(c[name]) if name == "block_out_channels" else c[name]) for name in _VAE_CONFIG_DEFAULTS}


def check_vae_signature(found: dict | None, names, path: Path, key: str) -> None:
    """Raise ConfigError on `key` unless `found` (a `vae_signature`; None = `names` are not a HunyuanVideo
    VAE) is a HunyuanVideo VAE with 16 latent channels, 4 levels (8x spatial, 4x temporal compression)."""
    if found is None:
        message = f"{path} is not a HunyuanVideo VAE (it looks like {_describe_other(names)}); set {key}=<{VAE_HINT}>"
        raise ConfigError([(key, message)])
    if found["latent_channels"] != 16 or len(found["block_out_channels"]) != 4:
        raise ConfigError([(key, (
            f"{path} is a causal video VAE with {found['latent_channels']} latent channels and "
            f"{len(found['block_out_channels'])} levels, but HunyuanVideo's has 16 and 4; set {key}=<{VAE_HINT}>"
        ))])


def check_vae(value, key: str = "model.vae") -> Source:
    """Locate the VAE and check from config.json or safetensors headers that it is the HunyuanVideo VAE
    (.pt/.pth: the loader checks). Returns the Source."""
    source = locate_vae(value, key)
    if source.kind == "pretrained":
        check_vae_signature(vae_signature_from_config(read_config(source.path, key)), (), source.path, key)
        return source
    shapes = header_shapes(source.files, key, f"set {key}=<{VAE_HINT}>")
    if shapes is not None:
        shapes = vae_to_diffusers(shapes)
        check_vae_signature(vae_signature(shapes), shapes, source.path, key)
    return source
