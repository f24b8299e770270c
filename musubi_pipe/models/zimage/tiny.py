"""Write a tiny Z-Image model in the files users download (Comfy-Org/z_image's split_files layout).

    paths = write_tiny(root)
    # {"dit": .../z_image_tiny_bf16.safetensors, "vae": .../ae_tiny.safetensors,
    #  "text_encoder": .../qwen_3_tiny.safetensors, "text_encoder_tokenizer": .../qwen3_tiny_tokenizer}

- DiT: diffusers' ZImageTransformer2DModel at TINY_DIT_CONFIG, written in the official single-file names
  (fused qkv, `x_embedder`, `final_layer`, plus `norm_final.weight`), bf16 as the real files.
- VAE: an AutoencoderKL with the FLUX.1 VAE's structure (four blocks, 16 latent channels, its scale and
  shift) and 32 channels per block, in ae.safetensors' original names.
- Text encoder: a 3-layer Qwen3 in ComfyUI's qwen_3_4b.safetensors layout (`model.*`, tied LM head left
  out, bf16), and a tokenizer folder: byte-level BPE with Qwen2's split pattern over a fixed word list, Qwen's
  special tokens and a chat template rendering one user message as Qwen3's does
  (`<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`).

Weights are seeded and the word list fixed, so every call writes the same bytes (files already holding them
are left alone; each is written atomically). Loading goes through loading.py and text.py like real files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from musubi_pipe.models.tiny_files import save_pretrained_files, seeded, write_file
from musubi_pipe.models.tiny_tokenizers import bpe, byte_alphabet
from musubi_pipe.models.zimage.keymap import VAE_FIXED_CONFIG, dit_to_official, vae_to_original
from musubi_pipe.models.zimage.text import QWEN3_FIXED_CONFIG

TINY_DIM, TINY_TEXT_DIM = 64, 32
TINY_DIT_CONFIG = {"in_channels": 16, "dim": TINY_DIM, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
                   "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": TINY_TEXT_DIM,
                   "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512]}
TINY_VAE_CHANNELS = (32, 32, 32, 32)
_DIT_SEED, _VAE_SEED, _TEXT_SEED = 60, 61, 62

_WORDS = """
a an the and or of in on at to with by is are one two three small big red blue green yellow white black orange
purple pink gray cat cats dog dogs bird fish horse car boat tree trees flower sea sky sun moon river road city
house ball cube circle square triangle rectangle star light shadow water snow rain fire photo painting portrait
style background forest beach street mountain sunset night day sitting standing user assistant system
""".split()
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen2's (and Qwen3's) pre-tokenizer split
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(_WORDS))
    vocab, merges = bpe(byte_alphabet(), [list(w) for w in words] + [["Ġ", *w] for w in words])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=131072)


def text_encoder(vocab_size: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(**QWEN3_FIXED_CONFIG, vocab_size=vocab_size, hidden_size=TINY_TEXT_DIM, intermediate_size=64,
                         num_hidden_layers=3, head_dim=16, num_attention_heads=2, num_key_value_heads=1)
    return seeded(_TEXT_SEED, lambda: Qwen3ForCausalLM(config))


def dit():
    from diffusers import ZImageTransformer2DModel

    def build():
        model = ZImageTransformer2DModel(**TINY_DIT_CONFIG)
        with torch.no_grad():  # no zero-initialised tensor: every module and LoRA target gets a gradient
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return model

    return seeded(_DIT_SEED, build).eval()


def vae():
    from diffusers import AutoencoderKL

    blocks = len(TINY_VAE_CHANNELS)
    config = {**VAE_FIXED_CONFIG, "latent_channels": 16, "block_out_channels": TINY_VAE_CHANNELS,
              "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * blocks,
              "up_block_types": ("UpDecoderBlock2D",) * blocks}
    return seeded(_VAE_SEED, lambda: AutoencoderKL(**config)).eval()


def _bf16(state: dict) -> dict:
    return {k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def write_tiny(root) -> dict[str, str]:
    """Write the tiny model under `root` (module doc); return {model config key: path}."""
    root = Path(root)
    paths = {"dit": root / "z_image_tiny_bf16.safetensors", "vae": root / "ae_tiny.safetensors",
             "text_encoder": root / "qwen_3_tiny.safetensors", "text_encoder_tokenizer": root / "qwen3_tiny_tokenizer"}
    official = dit_to_official(dit().state_dict())
    official["norm_final.weight"] = torch.ones(TINY_DIM)  # in the official files; diffusers drops it
    write_file(paths["dit"], save(_bf16(official)))
    write_file(paths["vae"], save({k: v.contiguous() for k, v in
                                   vae_to_original(vae().state_dict(), len(TINY_VAE_CHANNELS)).items()}))
    tok = tokenizer()
    model = text_encoder(len(tok))
    text_state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not in the file
    write_file(paths["text_encoder"], save(_bf16(text_state)))
    save_pretrained_files(tok, paths["text_encoder_tokenizer"])
    return {key: str(path) for key, path in paths.items()}
