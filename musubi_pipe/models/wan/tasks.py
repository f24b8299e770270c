"""Wan task table: the model shapes and sampling defaults behind each `model.task` name.

`get_task(cfg["task"])` returns a `WanTask`; its `dit_config`/`vae_config` are the constructor kwargs of
diffusers' `WanTransformer3DModel`/`AutoencoderKLWan` and `t5_config` those of transformers' `UMT5Config`.
Real tasks use the official Wan2.1 shapes; "tiny-t2v" is the small model that tests and the demo build
locally (see tiny.py). No torch here.
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
    text_len: int = 512  # T5 tokens per prompt; Wan pads embeddings with zeros to this length
    sample_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0

    def dit_signature(self) -> dict[str, int]:
        """Return the shape facts a checkpoint must match: dim, layers, in_channels, ffn_dim."""
        c = self.dit_config
        return {
            "dim": c["num_attention_heads"] * c["attention_head_dim"],
            "layers": c["num_layers"],
            "in_channels": c["in_channels"],
            "ffn_dim": c["ffn_dim"],
        }


def _dit(heads: int, head_dim: int, ffn_dim: int, layers: int, text_dim: int = 4096, freq_dim: int = 256) -> dict:
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": text_dim,
        "freq_dim": freq_dim,
        "ffn_dim": ffn_dim,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }


# google/umt5-xxl encoder, as shipped with Wan2.1 (models_t5_umt5-xxl-enc-bf16.pth)
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

TASKS: dict[str, WanTask] = {
    "t2v-1.3B": WanTask("t2v-1.3B", _dit(12, 128, 8960, 30), _UMT5_XXL),
    "t2v-14B": WanTask("t2v-14B", _dit(40, 128, 13824, 40), _UMT5_XXL),
    "tiny-t2v": WanTask(
        "tiny-t2v",
        _dit(4, 32, 256, 2, text_dim=32, freq_dim=32),
        _UMT5_TINY,
        # only the width shrinks (base_dim 96 -> 8); the block layout (dim_mult, num_res_blocks,
        # temperal_downsample) stays the official one, which diffusers' official key converter assumes
        vae_config={"base_dim": 8, "z_dim": 16},
        text_len=64,
        sample_steps=4,
    ),
}


def get_task(name: str) -> WanTask:
    """Return the task called `name`; raise ConfigError on `model.task` listing the valid names."""
    if name not in TASKS:
        raise ConfigError([("model.task", f"unknown Wan task {name!r}; set model.task to one of {sorted(TASKS)}")])
    return TASKS[name]
