"""The Wan text encoder (UMT5-XXL encoder) from the files users download, plus its tokenizer.

    source = locate_t5(cfg.model.t5)          # torch-free: what the path is
    check_t5(cfg.model.t5, task)              # torch-free: does it fit the task
    te = load_text_encoder(t5, tokenizer, task, "cuda", torch.bfloat16)   # WanTextEncoder

Accepted `model.t5` values (Source.kind):
  official           Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or a .safetensors with its keys; or the
                     root of an official Wan-AI download, which holds that file). Keys: token_embedding,
                     blocks.N.{norm1, attn.{q,k,v,o}, pos_embedding.embedding, norm2, ffn.{gate.0,fc1,fc2}}, norm
  transformers_file  one .safetensors with transformers UMT5 names, as ComfyUI's umt5_xxl_fp16.safetensors
                     (float8_e4m3fn files load too; ComfyUI "fp8_scaled" files do not)
  pretrained         a transformers UMT5EncoderModel folder, or a diffusers pipeline root with text_encoder/
For a .pth the layout is only known once it is read; it is assumed official and the loader detects
transformers names as well. Files are loaded into `UMT5EncoderModel` built from `task.t5_config`.

Nothing here imports torch at import time; locating and checking go through locate.EncoderSpec,
reading and assigning state dicts through models/statedict.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.files import Source, existing, folder_files, subfolder
from musubi_pipe.models.statedict import (
    assign_state,
    cast_state,
    compile_rules,
    empty_model,
    read_state_dict,
    rename_keys,
    reverse_rules,
    state_shapes,
)
from musubi_pipe.models.wan.locate import EncoderSpec, FrozenEncoder
from musubi_pipe.models.wan.tasks import WanTask

OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
_T5_HINT = f"{OFFICIAL_T5_FILE}, ComfyUI umt5_xxl_fp16.safetensors, or a transformers UMT5 folder"
_TOKENIZER_HINT = "a tokenizer folder (e.g. google/umt5-xxl) or a diffusers pipeline folder with tokenizer/"

# Rule = (transformers UMT5EncoderModel key, official Wan T5Encoder key); `{}` is the block index.
_T5_RULES: list[tuple[str, str]] = [
    ("shared.weight", "token_embedding.weight"),
    ("encoder.block.{}.layer.0.layer_norm.weight", "blocks.{}.norm1.weight"),
    ("encoder.block.{}.layer.0.SelfAttention.q.weight", "blocks.{}.attn.q.weight"),
    ("encoder.block.{}.layer.0.SelfAttention.k.weight", "blocks.{}.attn.k.weight"),
    ("encoder.block.{}.layer.0.SelfAttention.v.weight", "blocks.{}.attn.v.weight"),
    ("encoder.block.{}.layer.0.SelfAttention.o.weight", "blocks.{}.attn.o.weight"),
    # UMT5 has a relative position bias in every block (T5 shares the first block's)
    ("encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight",
     "blocks.{}.pos_embedding.embedding.weight"),
    ("encoder.block.{}.layer.1.layer_norm.weight", "blocks.{}.norm2.weight"),
    # official ffn: fc2(fc1(x) * gelu(gate(x))); transformers: wo(gelu(wi_0(x)) * wi_1(x))
    ("encoder.block.{}.layer.1.DenseReluDense.wi_0.weight", "blocks.{}.ffn.gate.0.weight"),
    ("encoder.block.{}.layer.1.DenseReluDense.wi_1.weight", "blocks.{}.ffn.fc1.weight"),
    ("encoder.block.{}.layer.1.DenseReluDense.wo.weight", "blocks.{}.ffn.fc2.weight"),
    ("encoder.final_layer_norm.weight", "norm.weight"),
]
# UMT5EncoderModel ties its encoder's embedding to `shared`; the official model has one embedding.
_SHARED, _TIED = "shared.weight", "encoder.embed_tokens.weight"
# non-weight entries some repacks carry (ComfyUI stores the sentencepiece model as a uint8 tensor)
_T5_EXTRAS = ("spiece_model",)
_T5_TO_TRANSFORMERS = compile_rules(reverse_rules(_T5_RULES))
_T5_TO_OFFICIAL = compile_rules(_T5_RULES)
_T5 = EncoderSpec(
    name="UMT5", hint=_T5_HINT, official_file=OFFICIAL_T5_FILE, subfolder="text_encoder", task_config="t5_config",
    width="d_model", width_label="d_model", layers="num_layers",
    # d_model is axis 1 of the embedding [vocab, d_model]; files may hold either tied transformers name
    signatures={
        "official": (("token_embedding.weight",), 1, re.compile(r"blocks\.(\d+)\.")),
        "transformers_file": ((_SHARED, _TIED), 1, re.compile(r"encoder\.block\.(\d+)\.")),
    },
    mismatch_fix="point {key} at the task's text encoder ({hint}) or change model.task",
)


# -- locating and checking (torch-free) -------------------------------------------------------------
def locate_t5(value, key: str = "model.t5") -> Source:
    """Resolve `model.t5` to an official file, a transformers-named file or a UMT5 folder (module doc).

    Raises ConfigError on `key` for a missing path, an unsupported file (e.g. fp8_scaled) or a folder
    without a UMT5 config.json.
    """
    return _T5.locate(value, key, t5_layout)


def t5_layout(names, path: Path, key: str) -> str:
    """Return "official" or "transformers_file" for a state dict with tensor `names`; ConfigError otherwise."""
    if "scaled_fp8" in names or any(n.endswith(".scale_weight") for n in names):
        message = (f"{path} is a ComfyUI fp8_scaled file, which is not supported; "
                   f"set {key}=<ComfyUI umt5_xxl_fp16.safetensors or the official {OFFICIAL_T5_FILE}>")
        raise ConfigError([(key, message)])
    if "token_embedding.weight" in names:
        return "official"
    if _SHARED in names or _TIED in names:
        return "transformers_file"
    message = f"{path} is not a UMT5 text encoder (no token_embedding.weight or shared.weight); set {key}=<{_T5_HINT}>"
    raise ConfigError([(key, message)])


def check_t5(value, task: WanTask, key: str = "model.t5") -> Source:
    """Raise ConfigError when `model.t5` does not fit `task.t5_config` (d_model, layers); return its Source.

    Torch-free: reads safetensors headers or config.json; a .pth is checked by the loader instead.
    """
    return _T5.check(locate_t5(value, key), task, key)


def locate_tokenizer(value, key: str = "model.t5_tokenizer") -> Source:
    """Resolve `model.t5_tokenizer`: a tokenizer folder or a pipeline root with tokenizer/."""
    path = existing(value, key, _TOKENIZER_HINT)
    folder = subfolder(path, "tokenizer")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        message = (
            f"{folder} is not a tokenizer folder (no tokenizer.json, tokenizer_config.json or spiece.model); "
            f"set {key}=<{_TOKENIZER_HINT}>"
        )
        raise ConfigError([(key, message)])
    return Source("pretrained", folder, folder_files(folder))


# -- key maps ------------------------------------------------------------------------------------------
def _drop_extras(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in _T5_EXTRAS}


def _tie(state: dict) -> dict:
    """Transformers names with both tied embedding keys holding the same value (files may carry either)."""
    out = dict(state)
    if _SHARED in out or _TIED in out:
        out[_SHARED] = out.get(_SHARED, out.get(_TIED))
        out[_TIED] = out[_SHARED]
    return out


def t5_to_transformers(state: dict) -> dict:
    """Official Wan T5 keys -> `UMT5EncoderModel` keys, with `encoder.embed_tokens.weight` tied to
    `shared.weight` (the same tensor); ValueError names a key no rule covers."""
    return _tie(rename_keys(state, _T5_TO_TRANSFORMERS, "transformers UMT5 name for official Wan T5"))


def t5_to_official(state: dict) -> dict:
    """`UMT5EncoderModel` keys -> official Wan T5 keys (the tied embedding once); ValueError on unknown keys."""
    state = _tie(state)
    state.pop(_TIED, None)
    return rename_keys(state, _T5_TO_OFFICIAL, "official Wan T5 name for transformers UMT5")


# -- the encoder ---------------------------------------------------------------------------------------
class WanTextEncoder(FrozenEncoder):
    """UMT5 encoder + tokenizer; `encode` returns {"embedding": [L_i, D]} per text, L_i = its real token count."""

    def __init__(self, tokenizer, model, text_len: int):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.text_len = text_len

    def encode(self, texts) -> list:
        import torch
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

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
        with torch.no_grad():
            hidden = self.model(input_ids=batch.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        # clone: a slice would keep the whole padded batch alive and share storage between items
        return [{"embedding": h[:n].clone()} for h, n in zip(hidden, mask.sum(dim=1).tolist())]


def load_text_encoder(t5_value, tokenizer_value, task: WanTask, device, dtype, key: str = "model.t5",
                      fp8: bool = False) -> WanTextEncoder:
    """Load the UMT5 encoder from any `model.t5` kind (module doc) and its tokenizer; frozen, eval, on `device`;
    with `fp8` (memory.fp8_t5) its Linear weights are stored in float8_e4m3fn.

    Raises ConfigError on `key` when the weights do not fit `task.t5_config`.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    source = check_t5(t5_value, task, key)
    tokenizer = AutoTokenizer.from_pretrained(locate_tokenizer(tokenizer_value).path)
    if source.kind == "pretrained":
        model = UMT5EncoderModel.from_pretrained(source.path, dtype=dtype)
    else:
        model = _load_t5_file(source.path, task, dtype, key)
    if fp8:
        from musubi_pipe.memory import quantize_text_encoder

        # not the feed-forward outputs: transformers casts their input to the weight's dtype (they are
        # kept in float32 for float16 runs), which would turn activations into fp8
        quantize_text_encoder(model, device, exclude=("DenseReluDense.wo",))
    return WanTextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), task.text_len)


def _load_t5_file(path: Path, task: WanTask, dtype, key: str):
    """Build `UMT5EncoderModel` from task.t5_config (vocab from the file) and assign an official or
    transformers-named state dict, cast to `dtype`."""
    from transformers import UMT5Config, UMT5EncoderModel

    raw = read_state_dict([path], key)
    kind = t5_layout(raw.keys(), path, key)  # a .pth may hold either layout
    try:
        state = _tie(_drop_extras(raw)) if kind == "transformers_file" else t5_to_transformers(_drop_extras(raw))
    except ValueError as e:
        raise ConfigError([(key, f"{path} is not a Wan UMT5 encoder file ({e}); set {key}=<{_T5_HINT}>")]) from e
    shapes = state_shapes(state)
    _T5.check_signature(_T5.signature(shapes, "transformers_file"), task, path, key)
    config = UMT5Config(**{**task.t5_config, "vocab_size": shapes[_SHARED][0]})
    model = empty_model(lambda: UMT5EncoderModel(config))
    # cast once, then tie: casting both keys separately would hold the embedding twice
    del state[_TIED]
    state = cast_state(model, state, dtype)
    state[_TIED] = state[_SHARED]
    assign_state(model, state, path, key, f"point {key} at a {task.name} text encoder ({_T5_HINT})")
    model.tie_weights()
    return model
