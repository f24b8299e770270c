"""HunyuanVideo's two text encoders (LLaVA-Llama-3-8B's language model and CLIP-L) from users' files.

    problems = check_text_encoders(cfg.model)            # torch-free: [(config key, message)]
    files = text_files(cfg.model)                         # every file the text embeddings depend on
    te = load_text_encoder(cfg.model, "cuda", torch.float16)
    te.encode(["a cat walks"])   # [{"llm": [L_i, 4096], "clip_pooled": [768]}]

`model.text_encoder1` (the LLM) accepts ComfyUI's `llava_llama3_fp16.safetensors` (LlamaForCausalLM keys
`model.*` plus `lm_head.weight`, sometimes a `tokenizer` entry; float8_e4m3fn files load too, ComfyUI
"fp8_scaled" files do not). Files with a LLaVA vision tower (`model.language_model.*` / `language_model.model.*`
text keys plus `vision_tower`/`multi_modal_projector`) and bare LlamaModel keys load as well; whatever the text
model does not use is dropped. A folder is a transformers Llama folder: HunyuanVideo's `text_encoder/` (made by
its preprocess_text_encoder_tokenizer_utils.py: LlamaForCausalLM weights and the tokenizer) or a diffusers
pipeline root with `text_encoder/` (LlamaModel) and `tokenizer/`.

`model.text_encoder2` (CLIP-L) accepts ComfyUI's `clip_l.safetensors` (`text_model.*` keys; `text_projection`,
`logit_scale`, `position_ids` and vision tensors are dropped) or a folder: HunyuanVideo's `text_encoder_2/`
(openai/clip-vit-large-patch14, a CLIPModel with its tokenizer) or a diffusers root with `text_encoder_2/` and
`tokenizer_2/`.

Single files hold no config: it is inferred from tensor shapes. Hidden size 4096 is LLaMA-3-8B (head_dim 128,
so 32 heads and 8 KV heads, rope_theta 500000, RMS eps 1e-5); CLIP width 768 is CLIP-L (12 heads). Any other
width is a tiny test model with heads of TINY_LLM_HEAD_DIM / TINY_CLIP_HEAD_DIM. Single files hold no tokenizer
either: `model.text_encoder1_tokenizer` / `model.text_encoder2_tokenizer` name tokenizer folders (nothing is
downloaded); for a folder they may be null when the folder (or the pipeline's tokenizer/, tokenizer_2/) has one.

Encoding follows diffusers' HunyuanVideoPipeline and musubi-tuner: the prompt goes into PROMPT_TEMPLATE, is
tokenized to LLM_MAX_LENGTH + crop_start tokens, and hidden state -(HIDDEN_STATE_SKIP_LAYER + 1) (no final
norm) is taken; its first crop_start tokens (the template prefix) are cut. crop_start is the token count of
the template prefix, <|begin_of_text|> included: 95 with the real Llama-3 tokenizer (the fixed value of diffusers
and musubi-tuner), fewer with a tiny one. CLIP gives its pooler_output (no projection), prompt cut at 77 tokens.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import (
    UNSET,
    Source,
    existing,
    folder_files,
    read_config,
    safetensors_shapes,
    subfolder,
)
from musubi_pipe.models.statedict import assign_state, cast_state, empty_model, read_state_dict, state_shapes

PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
LLM_MAX_LENGTH = 256  # prompt tokens after the template prefix
CLIP_MAX_LENGTH = 77
HIDDEN_STATE_SKIP_LAYER = 2

LLAMA3_8B_HIDDEN = 4096
TINY_LLM_HEAD_DIM = 16
CLIP_L_HIDDEN = 768
TINY_CLIP_HEAD_DIM = 8
# Llama config values the shapes do not show (LLaMA-3-8B's; tiny models use them too)
LLM_FIXED_CONFIG = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "max_position_embeddings": 8192, "attention_bias": False, "tie_word_embeddings": False}
# CLIP-L text config values the shapes do not show; eos_token_id 2 makes CLIP pool at the highest token id
# (its <|endoftext|>), as openai/clip-vit-large-patch14's config does
CLIP_FIXED_CONFIG = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "pad_token_id": 1,
                     "eos_token_id": 2}

_LLM_TOKENIZER_REPO = "xtuner/llava-llama-3-8b-v1_1-transformers"
_CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

# LLM tensor names: the text model's LlamaModel keys behind one of these prefixes (longest first)
_LLM_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
_LLM_KEY = re.compile(r"embed_tokens\.weight|norm\.weight|layers\.\d+\.[\w.]+")
# tensors of LLM files the text model does not use: the LM head, a LLaVA vision tower, ComfyUI's tokenizer blob
_LLM_UNUSED = re.compile(r"(language_model\.)?lm_head\.weight|tokenizer|(model\.)?(vision_tower|multi_modal_projector"
                         r"|image_newline)(\..*)?|.*rotary_emb\.inv_freq")
_CLIP_KEY = re.compile(r"text_model\.[\w.]+")
_CLIP_UNUSED = re.compile(r"text_projection(\.weight)?|logit_scale|visual_projection\.weight|vision_model\..*"
                          r"|text_model\.embeddings\.position_ids")


# -- key names (torch-free) --------------------------------------------------------------------------
def llm_key(name: str) -> str | None:
    """The LlamaModel key of tensor `name` of an LLM file; None for a tensor the text model does not use.

    Raises ValueError for a name that is neither.
    """
    if _LLM_UNUSED.fullmatch(name):
        return None
    for prefix in _LLM_PREFIXES:
        if name.startswith(prefix) and _LLM_KEY.fullmatch(name[len(prefix):]):
            return name[len(prefix):]
    raise ValueError(f"no Llama text model tensor {name!r}")


def clip_key(name: str) -> str | None:
    """The CLIPTextModel key (transformers 5's, without `text_model.`) of tensor `name` of a CLIP file; None
    if unused; ValueError if unknown."""
    if _CLIP_UNUSED.fullmatch(name):
        return None
    if _CLIP_KEY.fullmatch(name):
        return name.removeprefix("text_model.")
    raise ValueError(f"no CLIP text model tensor {name!r}")


def _file_kind(names, path: Path, key: str) -> str | None:
    """"llm", "clip" or None (neither) for a state dict with tensor `names`; ConfigError for fp8_scaled files."""
    if "scaled_fp8" in names or any(n.endswith(".scale_weight") for n in names):
        raise ConfigError([(key, f"{path} is a ComfyUI fp8_scaled file, which is not supported; "
                                 f"set {key}=<the fp16 (or plain fp8_e4m3fn) file>")])
    if "text_model.embeddings.token_embedding.weight" in names:
        return "clip"
    if any(n.endswith("embed_tokens.weight") for n in names) and any(".layers.0.self_attn." in f".{n}" for n in names):
        return "llm"
    return None


def _folder_kind(config: dict) -> str | None:
    """"llm", "clip", "llava" or None for a from_pretrained folder's config.json."""
    model_type = config.get("model_type")
    return {"llama": "llm", "clip": "clip", "clip_text_model": "clip", "llava": "llava"}.get(model_type)


# -- configs from shapes ------------------------------------------------------------------------------
def llm_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """LlamaConfig arguments for LlamaModel tensors {key: shape} (module doc: the head_dim rule)."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = 128 if hidden == LLAMA3_8B_HIDDEN else TINY_LLM_HEAD_DIM
    layers = len({name.split(".")[1] for name in shapes if name.startswith("layers.")})
    return {**LLM_FIXED_CONFIG, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0], "head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim}


def clip_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """CLIPTextConfig arguments for clip_key-named tensors {key: shape} (CLIP-L's at width 768)."""
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    layers = len({name.split(".")[2] for name in shapes if name.startswith("encoder.layers.")})
    return {**CLIP_FIXED_CONFIG, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": shapes["encoder.layers.0.mlp.fc1.weight"][0],
            "num_attention_heads": 12 if hidden == CLIP_L_HIDDEN else hidden // TINY_CLIP_HEAD_DIM,
            "max_position_embeddings": shapes["embeddings.position_embedding.weight"][0],
            "projection_dim": hidden}


@dataclass(frozen=True)
class _Encoder:
    """What differs between the two encoders when locating and checking them."""

    kind: str  # "llm" | "clip", as _file_kind/_folder_kind report it
    name: str
    hint: str
    pipeline_part: str  # subfolder of a diffusers pipeline root / official HunyuanVideo ckpts/
    pipeline_tokenizer: str  # the tokenizer's subfolder of that root
    tokenizer_repo: str
    key: str  # its config key, named when the other encoder's file is given
    rename: object  # tensor name in a file -> model key (None: unused), llm_key / clip_key
    config: object  # {model key: shape} -> config arguments, llm_config / clip_config


_LLM = _Encoder("llm", "the LLaVA-Llama-3 language model",
                "ComfyUI llava_llama3_fp16.safetensors or HunyuanVideo's text_encoder/ folder",
                "text_encoder", "tokenizer", _LLM_TOKENIZER_REPO, "model.text_encoder1", llm_key, llm_config)
_CLIP = _Encoder("clip", "the CLIP-L text model",
                 "ComfyUI clip_l.safetensors or HunyuanVideo's text_encoder_2/ folder (openai/clip-vit-large-patch14)",
                 "text_encoder_2", "tokenizer_2", _CLIP_TOKENIZER_REPO, "model.text_encoder2", clip_key,
                 clip_config)
_ENCODERS = {"llm": _LLM, "clip": _CLIP}



# -- locating (torch-free) ----------------------------------------------------------------------------
def _locate(value, key: str, encoder: _Encoder) -> Source:
    path = existing(value, key, encoder.hint)
    if path.is_dir():
        folder = subfolder(path, encoder.pipeline_part)
        found = _folder_kind(read_config(folder, key))
        if found == encoder.kind:
            return Source("pretrained", folder, folder_files(folder))
        if found == "llava":
            raise ConfigError([(key, (
                f"{folder} is a whole LLaVA model; HunyuanVideo uses its language model only: set {key}=<ComfyUI "
                "llava_llama3_fp16.safetensors, or the text_encoder/ folder HunyuanVideo's "
                "preprocess_text_encoder_tokenizer_utils.py makes from it>"))])
        what = f"holds {_ENCODERS[found].name}" if found else f"has no config.json of {encoder.name}"
        raise ConfigError([(key, f"{folder} {what}; set {key}=<{encoder.hint}>")])
    if path.suffix != ".safetensors":
        raise ConfigError([(key, f"{path} is not a .safetensors file; set {key}=<{encoder.hint}>")])
    try:
        shapes = {name: shape for name, (_, shape) in safetensors_shapes([path]).items()}
    except ValueError as e:
        raise ConfigError([(key, f"{e}; set {key}=<{encoder.hint}>")]) from e
    found = _file_kind(shapes, path, key)
    if found != encoder.kind:
        what = f"{_ENCODERS[found].name}, which belongs in {_ENCODERS[found].key}" if found else "neither text encoder"
        raise ConfigError([(key, f"{path} is {what}, not {encoder.name}; set {key}=<{encoder.hint}>")])
    renamed = _rename(shapes, encoder, path, key)
    try:
        encoder.config(renamed)
    except KeyError as e:
        raise ConfigError([(key, f"{path} has no {e.args[0]} tensor of {encoder.name}; set {key}=<{encoder.hint}>")]) from e
    return Source("transformers_file", path, (path,))


def _rename(state: dict, encoder: _Encoder, path: Path, key: str) -> dict:
    """`state` ({name: tensor or shape}) under the model's keys, without the tensors the model does not use;
    ConfigError on `key` for a name that is neither."""
    out = {}
    for name, value in state.items():
        try:
            model_key = encoder.rename(name)
        except ValueError as e:
            raise ConfigError([(key, f"{path} is not a usable file of {encoder.name} ({e}); "
                                     f"set {key}=<{encoder.hint}>")]) from e
        if model_key is not None:
            out[model_key] = value
    return out


def locate_llm(value, key: str = "model.text_encoder1") -> Source:
    """Resolve `model.text_encoder1` (module doc) to a "transformers_file" or "pretrained" Source.

    Raises ConfigError on `key` for a missing path, a CLIP (or other) model, a whole LLaVA folder or an
    fp8_scaled file.
    """
    return _locate(value, key, _LLM)


def locate_clip(value, key: str = "model.text_encoder2") -> Source:
    """Resolve `model.text_encoder2` (module doc) to a "transformers_file" or "pretrained" Source.

    Raises ConfigError on `key` for a missing path or a file/folder that is not a CLIP text model.
    """
    return _locate(value, key, _CLIP)


def _tokenizer_source(folder: Path) -> Source | None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    files = [p for pattern in ("*.json", "*.txt", "*.model") for p in folder.glob(pattern) if p.is_file()]
    return Source("pretrained", folder, tuple(sorted(files)))


def _tokenizer_class(folder: Path) -> str:
    path = folder / "tokenizer_config.json"
    try:
        return str(json.loads(path.read_text()).get("tokenizer_class") or "") if path.is_file() else ""
    except (OSError, ValueError):
        return ""


def locate_tokenizer(value, encoder_source: Source | None, key: str, encoder: str | None = None) -> Source:
    """Resolve a tokenizer key to a tokenizer folder Source (its .json/.txt/.model files).

    `encoder` is "llm" or "clip"; None takes "clip" for a key ending in `text_encoder2_tokenizer`, else
    "llm". A set `value` is a tokenizer folder or a pipeline root with tokenizer/ (tokenizer_2/). An unset `value` means the tokenizer of `encoder_source`: its folder, or the pipeline's
    tokenizer/ (tokenizer_2/) beside it. Raises ConfigError on `key` when there is none (a single weights
    file has none: the message names the Hub repository to download), or when a CLIP tokenizer is given for
    the LLM or another tokenizer for CLIP.
    """
    spec = _ENCODERS[encoder or ("clip" if key.endswith("text_encoder2_tokenizer") else "llm")]
    hint = f"a folder with the tokenizer of {spec.tokenizer_repo} (download it from the Hugging Face Hub)"
    if value not in UNSET:
        folder = subfolder(existing(value, key, hint), spec.pipeline_tokenizer)
        source = _tokenizer_source(folder) if folder.is_dir() else None
        if source is None:
            raise ConfigError([(key, f"{folder} is not a tokenizer folder (no {', '.join(_TOKENIZER_FILES)}); "
                                     f"set {key}=<{hint}>")])
    elif encoder_source is not None and encoder_source.kind == "pretrained":
        folder = encoder_source.path
        source = _tokenizer_source(folder) or _tokenizer_source(folder.parent / spec.pipeline_tokenizer)
        if source is None:
            raise ConfigError([(key, f"not set, and {folder} holds no tokenizer; set {key}=<{hint}>")])
    else:
        weights = f"{encoder_source.path} is a single weights file without one" if encoder_source else "it is not set"
        raise ConfigError([(key, f"{spec.name} needs a tokenizer and {weights}; set {key}=<{hint}>")])
    tokenizer_class = _tokenizer_class(source.path)
    if tokenizer_class and tokenizer_class.startswith("CLIP") != (spec is _CLIP):
        raise ConfigError([(key, f"{source.path} holds a {tokenizer_class}, not the tokenizer of {spec.name}; "
                                 f"set {key}=<{hint}>")])
    return source


def _sources(model_cfg) -> tuple[dict[str, Source], list[tuple[str, str]]]:
    """{"llm", "llm_tokenizer", "clip", "clip_tokenizer": Source} of what could be located, and the problems."""
    sources, problems = {}, []
    for field, encoder, locate in (("text_encoder1", "llm", locate_llm), ("text_encoder2", "clip", locate_clip)):
        key, tokenizer_field = f"model.{field}", f"{field}_tokenizer"
        try:
            sources[encoder] = locate(model_cfg.get(field), key)
        except ConfigError as e:
            problems += e.problems
        tokenizer_value = model_cfg.get(tokenizer_field)
        if encoder not in sources and tokenizer_value in UNSET:
            continue  # the encoder's problem says it all
        try:
            sources[f"{encoder}_tokenizer"] = locate_tokenizer(
                tokenizer_value, sources.get(encoder), f"model.{tokenizer_field}", encoder)
        except ConfigError as e:
            problems += e.problems
    return sources, problems


def check_text_encoders(model_cfg) -> list[tuple[str, str]]:
    """Every problem with model.text_encoder1/2 and their tokenizers, as (config key, message); torch-free.

    Reads only safetensors headers, config.json and tokenizer_config.json.
    """
    return _sources(model_cfg)[1]


def text_files(model_cfg) -> list[Path]:
    """Every file whose content determines the text embeddings: both encoders' weights (and configs) and
    both tokenizers, in that order without repeats. Raises ConfigError with check_text_encoders' problems."""
    sources, problems = _sources(model_cfg)
    if problems:
        raise ConfigError(problems)
    files = [f for name in ("llm", "llm_tokenizer", "clip", "clip_tokenizer") for f in sources[name].files]
    return list(dict.fromkeys(files))


# -- loading ------------------------------------------------------------------------------------------
def _load_file(source: Source, encoder: _Encoder, build, dtype, nesting: str = ""):
    """Read a single-file encoder under the model's keys, build the model from their shapes with
    `build(config arguments)` (empty) and assign them cast to `dtype`, under the model's attribute `nesting`
    when it has one."""
    state = _rename(read_state_dict(source.files, encoder.key), encoder, source.path, encoder.key)
    model = empty_model(lambda: build(encoder.config(state_shapes(state))))
    if nesting and hasattr(model, nesting):
        state = {f"{nesting}.{k}": v for k, v in state.items()}
    assign_state(model, cast_state(model, state, dtype), source.path, encoder.key, f"set {encoder.key}=<{encoder.hint}>")
    return model


def _from_pretrained(model_class, source: Source, dtype, encoder: _Encoder):
    """`model_class.from_pretrained(folder)`; ConfigError on the encoder's key when the folder lacks some of
    its tensors.

    The tensors the text model leaves out (an LM head, CLIP's vision tower) are dropped without the
    load report transformers would log for them.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(source.path, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ConfigError([(encoder.key, f"{source.path} lacks {len(missing)} tensors of {model_class.__name__} "
                                         f"(e.g. {', '.join(missing[:3])}); set {encoder.key}=<{encoder.hint}>")])
    return model


def _load_llm(source: Source, dtype):
    from transformers import LlamaConfig, LlamaModel

    if source.kind == "pretrained":
        # a LlamaForCausalLM folder loads too: from_pretrained drops the `model.` prefix and the LM head
        return _from_pretrained(LlamaModel, source, dtype, _LLM)
    return _load_file(source, _LLM, lambda config: LlamaModel(LlamaConfig(**config)), dtype)


def _load_clip(source: Source, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    if source.kind == "pretrained":
        # a CLIPModel folder (openai/clip-vit-large-patch14) loads its text tower
        return _from_pretrained(CLIPTextModel, source, dtype, _CLIP)
    # transformers 4 nests CLIPTextModel's tensors in `text_model.`
    return _load_file(source, _CLIP, lambda config: CLIPTextModel(CLIPTextConfig(**config)), dtype,
                      nesting="text_model")


class HunyuanTextEncoder:
    """Both encoders and tokenizers; `encode` gives each text's LLM tokens and CLIP pooled vector."""

    def __init__(self, llm_tokenizer, llm, clip_tokenizer, clip):
        self.llm_tokenizer, self.llm = llm_tokenizer, llm
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        if llm_tokenizer.pad_token is None:
            # padded positions are cut off after the forward pass, so any token pads
            llm_tokenizer.pad_token = llm_tokenizer.eos_token
        # the template prefix's token count (<|begin_of_text|> included): 95 with the real tokenizer
        self.crop_start = len(llm_tokenizer(PROMPT_TEMPLATE[: PROMPT_TEMPLATE.index("{}")]).input_ids)

    def encode(self, texts) -> list[dict]:
        """One dict per text: "llm" [L_i, D1] (the prompt's real tokens after the template prefix, its final
        <|eot_id|> included, so L_i >= 1) and "clip_pooled" [D2], both in the models' dtype."""
        import torch

        texts = list(texts)
        # padding to the longest prompt, not to max_length as diffusers does: the models are causal and
        # padded on the right, so the real tokens' states are the same and the padding is cut off anyway
        llm_batch = self.llm_tokenizer([PROMPT_TEMPLATE.format(t) for t in texts], padding="longest",
                                       max_length=LLM_MAX_LENGTH + self.crop_start, truncation=True,
                                       return_tensors="pt")
        clip_batch = self.clip_tokenizer(texts, padding="longest", max_length=CLIP_MAX_LENGTH, truncation=True,
                                         return_tensors="pt")
        mask = llm_batch.attention_mask.to(self.llm.device)
        with torch.no_grad():
            hidden = self.llm(input_ids=llm_batch.input_ids.to(self.llm.device), attention_mask=mask,
                              output_hidden_states=True).hidden_states[-(HIDDEN_STATE_SKIP_LAYER + 1)]
            # no attention mask, as diffusers: the pooled token (<|endoftext|>) sees no padding in a causal model
            pooled = self.clip(input_ids=clip_batch.input_ids.to(self.clip.device)).pooler_output
        # clone: a slice would keep the whole padded batch alive
        return [{"llm": h[self.crop_start:n].clone(), "clip_pooled": p.clone()}
                for h, n, p in zip(hidden, mask.sum(dim=1).tolist(), pooled)]


def load_text_encoder(model_cfg, device, dtype, fp8: bool = False) -> HunyuanTextEncoder:
    """Load both encoders (module doc: every accepted layout) in `dtype` on `device`, frozen, eval, with
    their tokenizers; `fp8` (memory.fp8_llm) stores the LLM's Linear weights in float8_e4m3fn. musubi-tuner
    runs both in float16. Raises ConfigError with every problem of check_text_encoders, or on the key of
    a file whose tensors do not fit the model its shapes imply."""
    from transformers import AutoTokenizer

    sources, problems = _sources(model_cfg)
    if problems:
        raise ConfigError(problems)
    llm = _load_llm(sources["llm"], dtype)
    if fp8:
        from musubi_pipe.memory import quantize_text_encoder

        quantize_text_encoder(llm, device, exclude=("lm_head",))
    llm = llm.to(device).eval().requires_grad_(False)
    clip = _load_clip(sources["clip"], dtype).to(device).eval().requires_grad_(False)
    llm_tokenizer = AutoTokenizer.from_pretrained(sources["llm_tokenizer"].path, padding_side="right")
    clip_tokenizer = AutoTokenizer.from_pretrained(sources["clip_tokenizer"].path, padding_side="right")
    return HunyuanTextEncoder(llm_tokenizer, llm, clip_tokenizer, clip)
