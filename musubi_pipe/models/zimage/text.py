"""Z-Image's text encoder, Qwen3-4B through transformers, from users' files.

    problems = check_text_encoder(cfg.model)           # torch-free: [(config key, message)]
    te = load_text_encoder(cfg.model, "cuda", torch.bfloat16)
    te.encode(["a cat"])   # [{"embedding": [L_i, 2560]}]

`model.text_encoder` accepts ComfyUI's `qwen_3_4b.safetensors` (Qwen3 keys `model.*`, an `lm_head.weight`
when present is dropped) or a folder: Tongyi-MAI's `text_encoder/` (a Qwen3 config.json and sharded weights;
its first shard works too), or the pipeline root holding `text_encoder/` and `tokenizer/`.
`model.text_encoder_tokenizer` names the tokenizer folder (Tongyi-MAI's `tokenizer/` or Qwen/Qwen3-4B); it may
be null for a folder that has one (or whose pipeline root has `tokenizer/`). Nothing is downloaded.

A single file holds no config: it is read off the tensor shapes (the head dim is q_norm's width, so heads and
KV heads follow), with Qwen3's fixed values (rope_theta 1e6, RMS eps 1e-6).

Encoding is musubi-tuner's and diffusers' ZImagePipeline's: each prompt goes through the tokenizer's chat
template as one user message (add_generation_prompt, enable_thinking=True), is cut at 512 tokens, and
hidden state -2 (the second to last layer's output) of its real tokens is kept, template tokens included.
"""

from __future__ import annotations

import re
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import UNSET, Source, existing, folder_files, read_config, shard_set, subfolder
from musubi_pipe.models.statedict import assign_state, cast_state, empty_model, header_shapes, read_state_dict, state_shapes

MAX_LENGTH = 512  # tokens of the templated prompt (musubi-tuner's DEFAULT_MAX_SEQUENCE_LENGTH)
HIDDEN_STATE = -2
QWEN3_FIXED_CONFIG = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                      "max_position_embeddings": 40960, "attention_bias": False, "tie_word_embeddings": True}
KEY, TOKENIZER_KEY = "model.text_encoder", "model.text_encoder_tokenizer"
HINT = ("Qwen3-4B: ComfyUI qwen_3_4b.safetensors (Comfy-Org/z_image split_files/text_encoders/), or Tongyi-MAI's "
        "text_encoder/ folder")
TOKENIZER_HINT = "the Qwen3 tokenizer folder: Tongyi-MAI/Z-Image-Turbo's tokenizer/ (or Qwen/Qwen3-4B)"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_PREFIXES = ("model.", "")
_QWEN3_KEY = re.compile(r"embed_tokens\.weight|norm\.weight|layers\.\d+\.[\w.]+")
_UNUSED = re.compile(r"lm_head\.weight|.*rotary_emb\.inv_freq")


def model_key(name: str) -> str | None:
    """The Qwen3Model key of tensor `name` of a file; None for one the encoder does not use; ValueError if unknown."""
    if _UNUSED.fullmatch(name):
        return None
    for prefix in _PREFIXES:
        if name.startswith(prefix) and _QWEN3_KEY.fullmatch(name[len(prefix):]):
            return name[len(prefix):]
    raise ValueError(f"no Qwen3 tensor {name!r}")


def qwen3_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Qwen3Config arguments for Qwen3Model tensors {key: shape} (module doc)."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    layers = len({name.split(".")[1] for name in shapes if name.startswith("layers.")})
    return {**QWEN3_FIXED_CONFIG, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0], "head_dim": head_dim,
            "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
            "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim}


def _describe(names) -> str:
    names = set(names)
    if any(n.endswith("embed_tokens.weight") for n in names) and not any("q_norm" in n for n in names):
        return "a language model without Qwen3's q_norm/k_norm (Qwen2.5, Llama, ...), not Qwen3"
    if "cap_embedder.1.weight" in names or any("attention.qkv" in n for n in names):
        return "a Z-Image DiT, which belongs in model.dit"
    if "encoder.conv_in.weight" in names:
        return "a VAE, which belongs in model.vae"
    return "not a Qwen3 text encoder"


def locate_text_encoder(value, key: str = KEY) -> Source:
    """A "transformers_file" Source (a single file or shard set with Qwen3 names) or a "pretrained" folder."""
    path = existing(value, key, HINT)
    if path.is_dir():
        folder = subfolder(path, "text_encoder")
        config = read_config(folder, key)
        if config.get("model_type") != "qwen3":
            found = f"a config.json of model_type {config['model_type']!r}" if config.get("model_type") else \
                "no config.json"
            raise ConfigError([(key, f"{folder} has {found}, not Qwen3's; set {key}=<{HINT}>")])
        return Source("pretrained", folder, folder_files(folder))
    if path.suffix != ".safetensors":
        raise ConfigError([(key, f"{path} is not a .safetensors file; set {key}=<{HINT}>")])
    files = shard_set(path, key)
    shapes = header_shapes(files, key, f"set {key}=<{HINT}>") or {}
    if "scaled_fp8" in shapes or any(n.endswith(".scale_weight") for n in shapes):
        raise ConfigError([(key, f"{path} is a ComfyUI fp8_scaled file, which is not supported; set {key}=<{HINT}> "
                                 "(bf16; memory.fp8_text_encoder stores it in fp8)")])
    try:
        renamed = {k: s for name, s in shapes.items() if (k := model_key(name)) is not None}
        qwen3_config(renamed)
    except (ValueError, KeyError):
        raise ConfigError([(key, f"{path} is {_describe(shapes)}; set {key}=<{HINT}>")]) from None
    return Source("transformers_file", path, files)


def locate_tokenizer(value, encoder: Source | None, key: str = TOKENIZER_KEY) -> Source:
    def source_of(folder: Path) -> Source | None:
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return None
        files = [p for pattern in ("*.json", "*.txt", "*.jinja") for p in folder.glob(pattern) if p.is_file()]
        return Source("pretrained", folder, tuple(sorted(files)))

    if value not in UNSET:
        folder = subfolder(existing(value, key, TOKENIZER_HINT), "tokenizer")
        found = source_of(folder) if folder.is_dir() else None
        if found is None:
            raise ConfigError([(key, f"{folder} is not a tokenizer folder (no {', '.join(_TOKENIZER_FILES)}); "
                                     f"set {key}=<{TOKENIZER_HINT}>")])
        return found
    if encoder is not None and encoder.kind == "pretrained":
        found = source_of(encoder.path) or source_of(encoder.path.parent / "tokenizer")
        if found is not None:
            return found
        raise ConfigError([(key, f"not set, and {encoder.path} holds no tokenizer; set {key}=<{TOKENIZER_HINT}>")])
    what = f"{encoder.path} is a weights file without one" if encoder else "it is not set"
    raise ConfigError([(key, f"Qwen3 needs a tokenizer and {what}; set {key}=<{TOKENIZER_HINT}>")])


def _sources(model_cfg) -> tuple[dict[str, Source], list[tuple[str, str]]]:
    sources, problems = {}, []
    try:
        sources["encoder"] = locate_text_encoder(model_cfg.get("text_encoder"))
    except ConfigError as e:
        problems += e.problems
    if "encoder" in sources or model_cfg.get("text_encoder_tokenizer") not in UNSET:
        try:
            sources["tokenizer"] = locate_tokenizer(model_cfg.get("text_encoder_tokenizer"), sources.get("encoder"))
        except ConfigError as e:
            problems += e.problems
    return sources, problems


def check_text_encoder(model_cfg) -> list[tuple[str, str]]:
    """Every problem with model.text_encoder and its tokenizer (torch-free: headers and config files only)."""
    return _sources(model_cfg)[1]


def text_files(model_cfg) -> list[Path]:
    """The files the text embeddings depend on: the encoder's weights (and config), then the tokenizer's."""
    sources, problems = _sources(model_cfg)
    if problems:
        raise ConfigError(problems)
    return list(dict.fromkeys([*sources["encoder"].files, *sources["tokenizer"].files]))


def _load_model(source: Source, dtype):
    from transformers import Qwen3Config, Qwen3Model

    if source.kind == "pretrained":
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a Qwen3ForCausalLM folder's lm_head is dropped without a report
        try:
            model, info = Qwen3Model.from_pretrained(source.path, dtype=dtype, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ConfigError([(KEY, f"{source.path} lacks {len(missing)} Qwen3 tensors (e.g. "
                                     f"{', '.join(missing[:3])}); set {KEY}=<{HINT}>")])
        return model
    state = {k: v for name, v in read_state_dict(source.files, KEY).items() if (k := model_key(name)) is not None}
    model = empty_model(lambda: Qwen3Model(Qwen3Config(**qwen3_config(state_shapes(state)))))
    assign_state(model, cast_state(model, state, dtype), source.path, KEY, f"set {KEY}=<{HINT}>")
    return model


class ZImageTextEncoder:
    """Qwen3 and its tokenizer; `encode` gives each prompt's hidden state -2 over its real tokens."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model

    def templated(self, text: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    def encode(self, texts) -> list[dict]:
        """One dict per text: "embedding" [L_i, D] in the model's dtype, L_i its templated token count (<= 512)."""
        import torch

        batch = self.tokenizer([self.templated(t) for t in texts], padding="longest", max_length=MAX_LENGTH,
                               truncation=True, return_tensors="pt")
        mask = batch.attention_mask.to(self.model.device)
        with torch.no_grad():
            hidden = self.model(input_ids=batch.input_ids.to(self.model.device), attention_mask=mask,
                                output_hidden_states=True).hidden_states[HIDDEN_STATE]
        # right padding: the real tokens come first (clone: a slice would keep the padded batch alive)
        return [{"embedding": h[:n].clone()} for h, n in zip(hidden, mask.sum(dim=1).tolist())]


def load_text_encoder(model_cfg, device, dtype, fp8: bool = False) -> ZImageTextEncoder:
    """Load Qwen3 (module doc) frozen in `dtype` on `device`, with its tokenizer; `fp8` (memory.fp8_text_encoder,
    musubi-tuner's --fp8_llm) stores its Linear weights in float8_e4m3fn."""
    from transformers import AutoTokenizer

    sources, problems = _sources(model_cfg)
    if problems:
        raise ConfigError(problems)
    model = _load_model(sources["encoder"], dtype)
    if fp8:
        from musubi_pipe.memory import quantize_text_encoder

        quantize_text_encoder(model, device)
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(sources["tokenizer"].path, padding_side="right")
    return ZImageTextEncoder(tokenizer, model)
