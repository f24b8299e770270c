"""Wan task table: the model shapes, conditioning and sampling defaults behind each `model.task` name.

`get_task(cfg["task"])` returns a `WanTask`. Its `dit_config`/`vae_config` are constructor kwargs of
diffusers' `WanTransformer3DModel`/`AutoencoderKLWan`, `t5_config` those of transformers' `UMT5Config`
and `clip_config` (Wan2.1 I2V only) those of `CLIPVisionConfig`. Real tasks use the official shapes
(Wan2.1 T2V 1.3B/14B and I2V 14B; Wan2.2 T2V-A14B and I2V-A14B, two experts each; Wan2.2 TI2V-5B).
Every real task has a "tiny-" twin with the same structure and tiny widths that tests and the demo
build locally (tiny.py). No torch here.

Conditioning kinds:
  none         text only
  image        the DiT input is [noisy latents (16), mask (4), latents of (first frame, zeros...) (16)]
               = 36 channels; Wan2.1 I2V also cross-attends to a CLIP embedding of the first frame
  first_frame  TI2V: the first latent frame is replaced by the clean latent of the image and its
               tokens see timestep 0 (no extra channels)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from musubi_pipe.errors import ConfigError


@dataclass(frozen=True)
class WanTask:
    name: str
    dit_config: dict
    t5_config: dict
    # empty = diffusers' AutoencoderKLWan defaults, which are the official Wan2.1 VAE
    vae_config: dict = field(default_factory=dict)
    vae_version: str = "2.1"  # "2.1" (16 latent channels, 8x) | "2.2" (48 channels, 16x; TI2V-5B)
    clip_config: dict | None = None  # CLIPVisionConfig kwargs; set only for Wan2.1 I2V
    conditioning: str = "none"  # none | image | first_frame (see module doc)
    boundary: float | None = None  # two experts: t >= boundary (t in [0, 1]) -> high-noise expert
    text_len: int = 512  # T5 tokens per prompt; Wan pads embeddings with zeros to this length
    fps: int = 16
    sample_steps: int = 50
    guidance_scale: float = 5.0  # the low-noise expert's scale when there are two
    guidance_scale_high: float | None = None  # the high-noise expert's scale
    shift: float = 5.0  # sampling shift

    @property
    def experts(self) -> tuple[str, ...]:
        """The DiT files the task needs: ("high_noise", "low_noise") for Wan2.2 A14B, else ("",)."""
        return ("high_noise", "low_noise") if self.boundary is not None else ("",)

    @property
    def latent_channels(self) -> int:
        return self.dit_config["out_channels"]

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        return (4, 16, 16) if self.vae_version == "2.2" else (4, 8, 8)

    def dit_signature(self) -> dict[str, int]:
        """Return the shape facts a checkpoint must match: dim, layers, in_channels, ffn_dim, image_dim."""
        c = self.dit_config
        return {
            "dim": c["num_attention_heads"] * c["attention_head_dim"],
            "layers": c["num_layers"],
            "in_channels": c["in_channels"],
            "ffn_dim": c["ffn_dim"],
            "image_dim": c.get("image_dim") or 0,  # CLIP image cross-attention (Wan2.1 I2V)
        }


def _dit(heads: int, head_dim: int, ffn_dim: int, layers: int, *, in_channels: int = 16, out_channels: int = 16,
         text_dim: int = 4096, freq_dim: int = 256, image_dim: int | None = None) -> dict:
    config = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "text_dim": text_dim,
        "freq_dim": freq_dim,
        "ffn_dim": ffn_dim,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }
    if image_dim:
        # Wan2.1 I2V: CLIP tokens get their own key/value projections in every cross-attention
        config.update(image_dim=image_dim, added_kv_proj_dim=heads * head_dim)
    return config


# google/umt5-xxl encoder, as shipped with Wan (models_t5_umt5-xxl-enc-bf16.pth)
_UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

_UMT5_TINY = {
    **_UMT5_XXL,
    # tiny.py replaces vocab_size with its tokenizer's size
    "vocab_size": 512,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
}

# The vision tower of open-clip xlm-roberta-large-vit-huge-14 (models_clip_open-clip-xlm-roberta-
# large-vit-huge-14.pth), as transformers' CLIPVisionModel; Wan uses the output of block 31 of 32.
_CLIP_VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

_CLIP_TINY = {**_CLIP_VIT_H, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": 28, "projection_dim": 16}

# Wan2.2 VAE (Wan2.2_VAE.pth): 48 channels, 16x spatial, patchified residual blocks
_VAE22_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
_VAE22_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]
_VAE22 = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
    "latents_mean": _VAE22_MEAN,
    "latents_std": _VAE22_STD,
}

# Tiny widths; the block layouts stay the official ones, which the key converters assume.
_TINY_VAE21 = {"base_dim": 8, "z_dim": 16}
_TINY_VAE22 = {**_VAE22, "base_dim": 8, "decoder_base_dim": 16}
_TINY = dict(text_dim=32, freq_dim=32)
# text_len stays the real 512: diffusers' Wan attention takes the tokens before the last 512 of the context as
# CLIP image tokens (I2V), so a shorter text would route CLIP through the text keys and leave k_img/v_img untrained
_TINY_SAMPLING = dict(sample_steps=4)

_T2V_A14B = dict(boundary=0.875, sample_steps=40, guidance_scale=3.0, guidance_scale_high=4.0, shift=12.0)
_I2V_A14B = dict(boundary=0.900, sample_steps=40, guidance_scale=3.5, guidance_scale_high=3.5, shift=5.0)
_TI2V_5B = dict(vae_version="2.2", conditioning="first_frame", fps=24, sample_steps=50, guidance_scale=5.0, shift=5.0)

TASKS: dict[str, WanTask] = {
    t.name: t
    for t in [
        # Wan2.1
        WanTask("t2v-1.3B", _dit(12, 128, 8960, 30), _UMT5_XXL),
        WanTask("t2v-14B", _dit(40, 128, 13824, 40), _UMT5_XXL),
        WanTask("i2v-14B", _dit(40, 128, 13824, 40, in_channels=36, image_dim=1280), _UMT5_XXL,
                clip_config=_CLIP_VIT_H, conditioning="image", sample_steps=40),
        # Wan2.2
        WanTask("t2v-A14B", _dit(40, 128, 13824, 40), _UMT5_XXL, **_T2V_A14B),
        WanTask("i2v-A14B", _dit(40, 128, 13824, 40, in_channels=36), _UMT5_XXL, conditioning="image", **_I2V_A14B),
        WanTask("ti2v-5B", _dit(24, 128, 14336, 30, in_channels=48, out_channels=48), _UMT5_XXL, vae_config=_VAE22,
                **_TI2V_5B),
        # tiny twins (2 blocks, dim 128)
        WanTask("tiny-t2v", _dit(4, 32, 256, 2, **_TINY), _UMT5_TINY, vae_config=_TINY_VAE21, **_TINY_SAMPLING),
        WanTask("tiny-i2v", _dit(4, 32, 256, 2, in_channels=36, image_dim=32, **_TINY), _UMT5_TINY,
                vae_config=_TINY_VAE21, clip_config=_CLIP_TINY, conditioning="image", **_TINY_SAMPLING),
        WanTask("tiny-t2v-A14B", _dit(4, 32, 256, 2, **_TINY), _UMT5_TINY, vae_config=_TINY_VAE21,
                **{**_T2V_A14B, **_TINY_SAMPLING}),
        WanTask("tiny-i2v-A14B", _dit(4, 32, 256, 2, in_channels=36, **_TINY), _UMT5_TINY, vae_config=_TINY_VAE21,
                conditioning="image", **{**_I2V_A14B, **_TINY_SAMPLING}),
        WanTask("tiny-ti2v-5B", _dit(4, 32, 256, 2, in_channels=48, out_channels=48, **_TINY), _UMT5_TINY,
                vae_config=_TINY_VAE22, **{**_TI2V_5B, **_TINY_SAMPLING}),
    ]
}


def get_task(name: str) -> WanTask:
    """Return the task called `name`; raise ConfigError on `model.task` listing the valid names."""
    if name not in TASKS:
        raise ConfigError([("model.task", f"unknown Wan task {name!r}; set model.task to one of {sorted(TASKS)}")])
    return TASKS[name]
