"""Write tiny HunyuanVideo text encoders (LLM and CLIP-L, with tokenizers) in the layouts users download.

    paths = write_tiny_text_encoders(root, "comfy")
    # {"text_encoder1": ..., "text_encoder2": ..., "text_encoder1_tokenizer": ..., "text_encoder2_tokenizer": ...}

Layouts (file names under `root`; the dict maps `model.*` config keys to paths):

  comfy     llava_llama3_tiny_fp16.safetensors (LlamaForCausalLM keys `model.*` + `lm_head.weight`, fp16, as
            ComfyUI's llava_llama3_fp16.safetensors), clip_l_tiny.safetensors (`text_model.*` keys, fp16, as
            ComfyUI's clip_l.safetensors), and the tokenizers their users download separately:
            llava-llama-3-tiny-tokenizer/ and clip-vit-tiny-tokenizer/
  official  HunyuanVideo's ckpts layout: hunyuan-tiny-text_encoder/ (LlamaForCausalLM from_pretrained folder,
            fp16, with its tokenizer, as HunyuanVideo's preprocess script writes it) and
            hunyuan-tiny-text_encoder_2/ (a CLIPModel folder with a vision tower and its tokenizer, fp32, as
            openai/clip-vit-large-patch14). The tokenizer keys are None: text.py finds them in the folders.

Both layouts hold the same weights: the models are seeded, and CLIP's fp32 weights are rounded to fp16 values,
so every layout gives the same embeddings. Sizes follow text.py's shape rules (LLM width TINY_LLM_DIM with heads
of TINY_LLM_HEAD_DIM, 3 layers so hidden state -3 is not the last; CLIP width TINY_CLIP_DIM, 2 layers).
Tokenizers are built from fixed word lists (Llama: byte-level BPE with the Llama-3 split pattern and the
template's special tokens; CLIP: CLIP's BPE with <|startoftext|>/<|endoftext|> as the highest ids), so every
call writes the same bytes; identical files are not rewritten and each file is written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from musubi_pipe.models.hunyuan_video.text import (
    CLIP_FIXED_CONFIG,
    CLIP_MAX_LENGTH,
    LLM_FIXED_CONFIG,
    PROMPT_TEMPLATE,
    TINY_CLIP_HEAD_DIM,
    TINY_LLM_HEAD_DIM,
)
from musubi_pipe.models.tiny_files import save_pretrained_files as _save_pretrained
from musubi_pipe.models.tiny_tokenizers import bpe, byte_alphabet
from musubi_pipe.models.tiny_files import seeded as _seeded
from musubi_pipe.models.tiny_files import write_file as _write

TINY_LLM_DIM = 32
TINY_CLIP_DIM = 24
_LLM_SEED, _CLIP_SEED = 50, 51

# Words both tokenizers know whole (plus the template's words for the LLM); others are spelled out.
_WORDS = """
a an the and or of in on at to with by is are one two three small big red blue green yellow white black
cat cats dog dogs bird fish horse car boat tree trees flower sea sky sun moon river road city house
ball cube circle square light shadow water snow rain fire walks runs jumps flies swims rolls spins falls
walking running jumping flying swimming rolling spinning falling slowly quickly left right up down
video scene camera view sunset night day background forest beach street
""".split()
_LLM_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<pad>")
# Llama-3's pre-tokenizer split (its tokenizer.json)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# --- tokenizers -----------------------------------------------------------------------------------
def _llm_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-3-style byte-level BPE over the template's and `_WORDS`' words, with its special tokens."""
    words = sorted(set(re.findall(r"[A-Za-z]+", PROMPT_TEMPLATE.replace("{}", ""))) | set(_WORDS))
    # byte-level: a space is "Ġ"; every word is known with and without a leading space
    vocab, merges = bpe(byte_alphabet(), [list(w) for w in words] + [["Ġ", *w] for w in words])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _LLM_SPECIALS])
    bos = _LLM_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<pad>")


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE (lowercased, words end in "</w>") over `_WORDS`, <|startoftext|> and <|endoftext|> last."""
    alphabet = byte_alphabet()
    words = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(_WORDS))]
    vocab, merges = bpe(alphabet + [c + "</w>" for c in alphabet], words)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


# --- models ---------------------------------------------------------------------------------------
def _llm(vocab_size: int) -> LlamaForCausalLM:
    """The tiny LLaVA-Llama-3 language model (with its LM head, as the files have it), in fp16."""
    config = LlamaConfig(**LLM_FIXED_CONFIG, vocab_size=vocab_size, hidden_size=TINY_LLM_DIM, intermediate_size=64,
                         num_hidden_layers=3, head_dim=TINY_LLM_HEAD_DIM,
                         num_attention_heads=TINY_LLM_DIM // TINY_LLM_HEAD_DIM, num_key_value_heads=1)
    return _seeded(_LLM_SEED, lambda: LlamaForCausalLM(config)).to(torch.float16)


def _clip(vocab_size: int) -> CLIPModel:
    """The tiny CLIP model (text and vision towers, as openai/clip-vit-large-patch14), fp32 holding fp16 values."""
    heads = TINY_CLIP_DIM // TINY_CLIP_HEAD_DIM
    text = dict(CLIP_FIXED_CONFIG, vocab_size=vocab_size, hidden_size=TINY_CLIP_DIM, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=CLIP_MAX_LENGTH,
                projection_dim=TINY_CLIP_DIM)
    vision = dict(hidden_size=TINY_CLIP_DIM, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                  image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=TINY_CLIP_DIM)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_CLIP_DIM)
    # fp16-representable weights: ComfyUI's fp16 file and the fp32 folder then hold the same values
    return _seeded(_CLIP_SEED, lambda: CLIPModel(config)).to(torch.float16).to(torch.float32)


# --- writing --------------------------------------------------------------------------------------
def _comfy_clip_state(model: CLIPModel) -> dict:
    """ComfyUI clip_l.safetensors layout: the text tower's `text_model.*` tensors in fp16."""
    return {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if k.startswith("text_model.")}


def write_tiny_text_encoders(root, layout: str) -> dict[str, str | None]:
    """Write the tiny text encoders under `root` in `layout` ("comfy" or "official", module doc).

    Returns {config key under `model.`: path}, the tokenizer keys None for "official". ValueError for
    another layout.
    """
    if layout not in ("comfy", "official"):
        raise ValueError(f"unknown tiny text encoder layout {layout!r}; use 'comfy' or 'official'")
    root = Path(root)
    llm_tokenizer, clip_tokenizer = _llm_tokenizer(), _clip_tokenizer()
    llm, clip = _llm(len(llm_tokenizer)), _clip(len(clip_tokenizer))
    if layout == "comfy":
        paths = {
            "text_encoder1": root / "llava_llama3_tiny_fp16.safetensors",
            "text_encoder2": root / "clip_l_tiny.safetensors",
            "text_encoder1_tokenizer": root / "llava-llama-3-tiny-tokenizer",
            "text_encoder2_tokenizer": root / "clip-vit-tiny-tokenizer",
        }
        _write(paths["text_encoder1"], save({k: v.contiguous() for k, v in llm.state_dict().items()}))
        _write(paths["text_encoder2"], save(_comfy_clip_state(clip)))
        _save_pretrained(llm_tokenizer, paths["text_encoder1_tokenizer"])
        _save_pretrained(clip_tokenizer, paths["text_encoder2_tokenizer"])
        return {key: str(path) for key, path in paths.items()}
    llm_folder, clip_folder = root / "hunyuan-tiny-text_encoder", root / "hunyuan-tiny-text_encoder_2"
    for obj, folder in ((llm, llm_folder), (llm_tokenizer, llm_folder), (clip, clip_folder),
                        (clip_tokenizer, clip_folder)):
        _save_pretrained(obj, folder)
    return {"text_encoder1": str(llm_folder), "text_encoder2": str(clip_folder),
            "text_encoder1_tokenizer": None, "text_encoder2_tokenizer": None}
