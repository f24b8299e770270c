"""Decide what a configured Z-Image DiT or VAE path is and whether it fits, without torch.

    source = check_dit("z_image_turbo_bf16.safetensors")     # Source("official", ...)
    dit_signature(shapes)  # {"layout": "official", "dim": 3840, "n_layers": 30, "n_heads": 30, ...}
    source = check_vae("ae.safetensors")

DiT (`model.dit`): the official single file (Comfy-Org/z_image `z_image_turbo_bf16.safetensors`,
`z_image_bf16.safetensors`, ostris' `z_image_de_turbo_v1_bf16.safetensors`; fused qkv; ComfyUI's
`model.diffusion_model.` prefix is stripped), a shard of Tongyi-MAI's transformer/ folder (diffusers names;
every shard is read), that folder itself (config.json of class ZImageTransformer2DModel) or the pipeline root.
VAE (`model.vae`): FLUX.1's `ae.safetensors` (16 latent channels, the original names), the same weights with
diffusers names, or a diffusers AutoencoderKL folder (Tongyi-MAI's vae/, or the pipeline root).

The checks read safetensors headers or config.json only, and name what a wrong file is (a FLUX.2 VAE has 32
latent channels, an SD/SDXL VAE 4; Qwen3 belongs in model.text_encoder).
"""

from __future__ import annotations

import re
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import Source, existing, folder_files, read_config, shard_set, subfolder
from musubi_pipe.models.statedict import header_shapes
from musubi_pipe.models.zimage.names import dit_layout, strip_prefix

DIT_HINT = ("a Z-Image DiT: z_image_turbo_bf16.safetensors / z_image_bf16.safetensors (Comfy-Org/z_image), "
            "z_image_de_turbo_v1_bf16.safetensors (ostris/Z-Image-De-Turbo), the first shard of Tongyi-MAI's "
            "transformer/ folder, that folder or the pipeline folder")
VAE_HINT = ("the FLUX.1 VAE Z-Image uses: ae.safetensors (16 latent channels; Comfy-Org/z_image split_files/vae/), "
            "or Tongyi-MAI's vae/ folder (or the pipeline folder)")
DIT_CLASS, VAE_CLASS = "ZImageTransformer2DModel", "AutoencoderKL"
REAL_HEAD_DIM = 128  # Z-Image's attention heads (3840 = 30 x 128); tiny models use TINY_HEAD_DIM
TINY_HEAD_DIM = 32
LATENT_CHANNELS = 16

# what other checkpoints look like: (a tensor only they have, description)
_OTHER_MODELS = [
    ("head.modulation", "a Wan DiT"),
    ("img_in.proj.weight", "a HunyuanVideo DiT"),
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX-style DiT"),
    ("transformer_blocks.0.img_mod.1.weight", "a Qwen-Image DiT"),
    ("encoder.conv_in.weight", "a VAE, which belongs in model.vae"),
    ("encoder.conv1.weight", "a Wan VAE"),
    ("model.embed_tokens.weight", "a language model (Qwen3 belongs in model.text_encoder)"),
    ("embed_tokens.weight", "a language model (Qwen3 belongs in model.text_encoder)"),
    ("text_model.embeddings.token_embedding.weight", "a CLIP text encoder"),
]


def _describe_other(names) -> str:
    names = set(names)
    if "cap_embedder.1.weight" in names and "x_pad_token" not in names:
        return "a Lumina 2 DiT (Z-Image's predecessor), which is not supported"
    return next((what for marker, what in _OTHER_MODELS if marker in names), "no model this loader knows")


def _reject_scaled_fp8(names, path: Path, key: str, hint: str) -> None:
    if "scaled_fp8" in names or any(n.endswith(".scale_weight") for n in names):
        raise ConfigError([(key, f"{path} is a ComfyUI fp8_scaled file, which is not supported as base weights; "
                                 f"set {key}=<{hint}> (bf16)")])


# --- the DiT --------------------------------------------------------------------------------------


def locate_dit(value, key: str = "model.dit") -> Source:
    """Resolve a DiT path into a Source: a single file or shard set ("official"), or a diffusers transformer
    folder / pipeline root ("pretrained"). ConfigError on `key` for anything else."""
    path = existing(value, key, DIT_HINT)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError([(key, f"{path} is not a .safetensors file; set {key}=<{DIT_HINT}>")])
        return Source("official", path, shard_set(path, key))
    folder = subfolder(path, "transformer")
    config = read_config(folder, key)
    if config.get("_class_name") != DIT_CLASS:
        found = f"a config.json of class {config['_class_name']}" if config.get("_class_name") else "no config.json"
        raise ConfigError([(key, f"{folder} has {found}; set {key}=<{DIT_HINT}>")])
    return Source("pretrained", folder, folder_files(folder))


def _count(names, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m[1] for name in names if (m := pattern.match(name))})


def dit_signature(shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """The architecture of a Z-Image DiT from its prefix-stripped tensor shapes {name: shape}, or None when the
    names are not a Z-Image DiT's. Heads come from the q-norm's width (the head dim)."""
    layout = dit_layout(shapes)
    if layout is None:
        return None
    dim, cap_feat_dim = shapes["cap_embedder.1.weight"]
    embedder = shapes["x_embedder.weight" if layout == "official" else "all_x_embedder.2-1.weight"]
    head_dim = shapes["layers.0.attention." + ("q_norm.weight" if layout == "official" else "norm_q.weight")][0]
    return {"layout": layout, "dim": dim, "cap_feat_dim": cap_feat_dim, "in_channels": embedder[1] // 4,
            "n_layers": _count(shapes, "layers"), "n_refiner_layers": _count(shapes, "noise_refiner"),
            "head_dim": head_dim, "n_heads": dim // head_dim}


def check_dit(value, key: str = "model.dit") -> Source:
    """locate_dit, then read the DiT's names and shapes (headers or config.json): ConfigError naming what the
    file is when it is not a Z-Image DiT."""
    source = locate_dit(value, key)
    if source.kind == "pretrained":
        return source
    shapes = header_shapes(source.files, key, f"set {key}=<{DIT_HINT}>") or {}
    _reject_scaled_fp8(shapes, source.path, key, DIT_HINT)
    stripped = {strip_prefix(name): shape for name, shape in shapes.items()}
    signature = dit_signature(stripped)
    if signature is None:
        raise ConfigError([(key, f"{source.path} is {_describe_other(stripped)}, not a Z-Image DiT; "
                                 f"set {key}=<{DIT_HINT}>")])
    if signature["in_channels"] != LATENT_CHANNELS:
        raise ConfigError([(key, f"{source.path} takes {signature['in_channels']} latent channels, not Z-Image's "
                                 f"{LATENT_CHANNELS}; set {key}=<{DIT_HINT}>")])
    return source


# --- the VAE --------------------------------------------------------------------------------------

# (the encoder's output conv, the first down block's first conv) in FLUX's original names and in diffusers'
_VAE_NAMES = {"original": ("encoder.conv_out.weight", "encoder.down.{}.block.0.conv1.weight", "encoder.down.0.block"),
              "diffusers": ("encoder.conv_out.weight", "encoder.down_blocks.{}.resnets.0.conv1.weight",
                            "encoder.down_blocks.0.resnets")}


def vae_layout(names) -> str | None:
    """"original" (ae.safetensors' names), "diffusers" or None for a VAE state dict's tensor names."""
    names = set(names)
    if "encoder.down.0.block.0.conv1.weight" in names and "decoder.conv_out.weight" in names:
        return "original"
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in names and "decoder.conv_out.weight" in names:
        return "diffusers"
    return None


def vae_signature(shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """{"layout", "latent_channels", "block_out_channels", "layers_per_block", "quant_conv"} of a 2D VAE, or None."""
    layout = vae_layout(shapes)
    if layout is None:
        return None
    out_conv, first_conv, first_block = _VAE_NAMES[layout]
    channels = []
    while first_conv.format(len(channels)) in shapes:
        channels.append(shapes[first_conv.format(len(channels))][0])
    return {"layout": layout, "latent_channels": shapes[out_conv][0] // 2, "block_out_channels": channels,
            "layers_per_block": _count(shapes, first_block),
            "quant_conv": "quant_conv.weight" in shapes}


def locate_vae(value, key: str = "model.vae") -> Source:
    path = existing(value, key, VAE_HINT)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError([(key, f"{path} is not a .safetensors file; set {key}=<{VAE_HINT}>")])
        return Source("official", path, (path,))
    folder = subfolder(path, "vae")
    config = read_config(folder, key)
    if config.get("_class_name") != VAE_CLASS:
        found = f"a config.json of class {config['_class_name']}" if config.get("_class_name") else "no config.json"
        raise ConfigError([(key, f"{folder} has {found}; set {key}=<{VAE_HINT}>")])
    if config.get("latent_channels", 4) != LATENT_CHANNELS:
        raise ConfigError([(key, f"{folder} is a VAE with {config.get('latent_channels', 4)} latent channels, not "
                                 f"the FLUX.1 VAE's {LATENT_CHANNELS}; set {key}=<{VAE_HINT}>")])
    return Source("pretrained", folder, folder_files(folder))


def check_vae(value, key: str = "model.vae") -> Source:
    """locate_vae, then read the VAE's shapes: ConfigError naming a FLUX.2 (32 channels), SD/SDXL (4), video or
    other model's file."""
    source = locate_vae(value, key)
    if source.kind == "pretrained":
        return source
    shapes = header_shapes(source.files, key, f"set {key}=<{VAE_HINT}>") or {}
    signature = vae_signature({strip_prefix(n): s for n, s in shapes.items()})
    if signature is None:
        what = "a Wan video VAE" if "encoder.conv1.weight" in shapes else _describe_other(shapes)
        if dit_layout({strip_prefix(n) for n in shapes}):
            what = "a Z-Image DiT, which belongs in model.dit"
        raise ConfigError([(key, f"{source.path} is {what}, not an image VAE; set {key}=<{VAE_HINT}>")])
    channels = signature["latent_channels"]
    if channels != LATENT_CHANNELS:
        what = {32: "the FLUX.2 VAE (32 latent channels)", 4: "an SD/SDXL VAE (4 latent channels)"}.get(
            channels, f"a VAE with {channels} latent channels")
        raise ConfigError([(key, f"{source.path} is {what}; Z-Image uses FLUX.1's ae.safetensors "
                                 f"({LATENT_CHANNELS}); set {key}=<{VAE_HINT}>")])
    return source
