"""Wan text encoder (t5.py) and Wan2.1 I2V image encoder (clip.py): key maps, every accepted file layout,
torch-free checks and the encodings themselves. Tiny seeded models written into tmp folders; CPU only."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.wan import clip, t5, tiny
from musubi_pipe.models.wan.tasks import TASKS

T2V, I2V = TASKS["tiny-t2v"], TASKS["tiny-i2v"]
TEXTS = ["a red ball rolls slowly", "two cats", "the blue sea at sunset with waves"]


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _problem(excinfo) -> tuple[str, str]:
    (problem,) = excinfo.value.problems
    return problem


# --- fixtures: tiny models written in every layout ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny._tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def umt5(tokenizer_dir) -> UMT5EncoderModel:
    vocab = len(tiny._tokenizer())
    return _seeded(0, lambda: UMT5EncoderModel(UMT5Config(**{**T2V.t5_config, "vocab_size": vocab})).eval())


@pytest.fixture(scope="module")
def t5_paths(tmp_path_factory, umt5) -> dict:
    root = tmp_path_factory.mktemp("t5")
    state = umt5.state_dict()
    official = t5.t5_to_official(state)
    paths = {kind: root / name for kind, name in [
        ("official_pth", "models_t5_umt5-xxl-enc-bf16.pth"),
        ("official_safetensors", "t5_official.safetensors"),
        ("comfy", "umt5_xxl_fp16.safetensors"),
        ("fp8", "umt5_xxl_fp8_e4m3fn.safetensors"),
    ]}
    torch.save(official, paths["official_pth"])
    save_file(official, paths["official_safetensors"])
    # ComfyUI style: both embedding names, and the sentencepiece model as a uint8 tensor
    comfy = {k: v.clone() for k, v in state.items()}
    comfy["spiece_model"] = torch.arange(16, dtype=torch.uint8)
    save_file(comfy, paths["comfy"])
    # fp8 with only shared.weight (as transformers' save_pretrained writes it)
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items() if k != "encoder.embed_tokens.weight"},
              paths["fp8"])
    umt5.save_pretrained(root / "pipeline" / "text_encoder")
    paths["pipeline"] = root / "pipeline"  # a diffusers pipeline root
    return paths


@pytest.fixture(scope="module")
def vision():
    """A tiny CLIPVisionModel and a visual_projection weight [projection_dim, hidden]."""
    config = CLIPVisionConfig(**I2V.clip_config)
    model = _seeded(1, lambda: CLIPVisionModel(config).eval())
    projection = _seeded(2, lambda: torch.randn(config.projection_dim, config.hidden_size))
    return model, projection


@pytest.fixture(scope="module")
def clip_paths(tmp_path_factory, vision) -> dict:
    model, projection = vision
    root = tmp_path_factory.mktemp("clip")
    official = clip.clip_to_official(model.state_dict(), projection)
    official["textual.token_embedding.weight"] = torch.randn(10, 8)  # the XLM-R tower, ignored
    paths = {"official": root / clip.OFFICIAL_CLIP_FILE, "official_safetensors": root / "clip_official.safetensors",
             "comfy": root / "clip_vision_h.safetensors"}
    torch.save(official, paths["official"])
    save_file(official, paths["official_safetensors"])
    comfy = {"vision_model." + k: v.clone() for k, v in model.state_dict().items()}
    save_file({**comfy, "visual_projection.weight": projection}, paths["comfy"])
    with_projection = CLIPVisionModelWithProjection(CLIPVisionConfig(**I2V.clip_config))
    with_projection.vision_model.load_state_dict(model.state_dict())
    with_projection.visual_projection.weight.data.copy_(projection)
    with_projection.save_pretrained(root / "pipeline" / "image_encoder")
    paths["pipeline"] = root / "pipeline"
    return paths


# --- key maps -------------------------------------------------------------------------------------


def test_t5_keymap_round_trips(umt5):
    state = umt5.state_dict()
    official = t5.t5_to_official(state)
    assert official["token_embedding.weight"] is state["shared.weight"]
    assert "blocks.1.pos_embedding.embedding.weight" in official and "norm.weight" in official
    assert official["blocks.0.ffn.gate.0.weight"] is state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    assert len(official) == len(state) - 1  # the tied embedding once
    back = t5.t5_to_transformers(official)
    _assert_same_state(back, state)
    assert back["encoder.embed_tokens.weight"] is back["shared.weight"]
    _assert_same_state(t5.t5_to_official(back), official)


def test_clip_keymap_round_trips(vision):
    model, projection = vision
    state = model.state_dict()
    official = clip.clip_to_official(state, projection)
    assert official["visual.cls_embedding"].shape == (1, 1, 32)
    assert official["visual.pos_embedding"].shape == (1, 5, 32)
    assert torch.equal(official["visual.head"], projection.t())
    assert official["log_scale"].shape == () and official["log_scale"].item() == pytest.approx(math.log(1 / 0.07))
    qkv = official["visual.transformer.2.attn.to_qkv.weight"]
    assert torch.equal(qkv[32:64], state["encoder.layers.2.self_attn.k_proj.weight"])
    _assert_same_state(clip.clip_to_transformers(official), state)
    _assert_same_state(clip.clip_to_official(clip.clip_to_transformers(official), projection), official)
    assert clip.clip_to_official(state, projection_dim=16)["visual.head"].abs().sum() == 0


@pytest.mark.parametrize("convert, key", [
    (t5.t5_to_official, "encoder.block.0.layer.2.foo.weight"),
    (t5.t5_to_transformers, "blocks.0.ffn.gate.1.weight"),
    (clip.clip_to_official, "encoder.layers.0.self_attn.qkv.weight"),
    (clip.clip_to_transformers, "visual.transformer.0.attn.qkv.weight"),
])
def test_keymaps_name_an_unknown_key(convert, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert({key: torch.zeros(1)})


# --- T5 -------------------------------------------------------------------------------------------


def test_locate_t5_kinds(t5_paths):
    kinds = {name: t5.locate_t5(path).kind for name, path in t5_paths.items()}
    assert kinds == {"official_pth": "official", "official_safetensors": "official", "comfy": "transformers_file",
                     "fp8": "transformers_file", "pipeline": "pretrained"}
    assert t5.locate_t5(t5_paths["pipeline"]).path == t5_paths["pipeline"] / "text_encoder"
    # the root of an official download holds the .pth next to other things
    assert t5.locate_t5(t5_paths["official_pth"].parent).path == t5_paths["official_pth"]


def _reference_embeddings(model, tokenizer_dir) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tokenizer(TEXTS, padding="max_length", max_length=T2V.text_len, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return [h[:n] for h, n in zip(hidden, batch.attention_mask.sum(1).tolist())]


@pytest.mark.parametrize("layout", ["official_pth", "official_safetensors", "comfy", "pipeline"])
def test_t5_layouts_encode_like_umt5(layout, t5_paths, tokenizer_dir, umt5):
    encoder = t5.load_text_encoder(t5_paths[layout], tokenizer_dir, T2V, "cpu", torch.float32)
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    got = [e["embedding"] for e in encoder.encode(TEXTS)]
    expected = _reference_embeddings(umt5, tokenizer_dir)
    assert [e.shape for e in got] == [(6, 32), (3, 32), (8, 32)]  # words + </s>
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


def test_t5_fp8_file_is_upcast(t5_paths, tokenizer_dir, umt5):
    encoder = t5.load_text_encoder(t5_paths["fp8"], tokenizer_dir, T2V, "cpu", torch.float32)
    assert encoder.dtype == torch.float32
    rounded = UMT5EncoderModel(umt5.config).eval()
    rounded.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in umt5.state_dict().items()})
    got = [e["embedding"] for e in encoder.encode(TEXTS)]
    expected, original = _reference_embeddings(rounded, tokenizer_dir), _reference_embeddings(umt5, tokenizer_dir)
    for g, e, exact in zip(got, expected, original):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)  # exactly the fp8-rounded weights
        torch.testing.assert_close(g, exact, rtol=0, atol=0.25)  # and near the original model


def test_t5_bf16_keeps_one_embedding(t5_paths, tokenizer_dir):
    encoder = t5.load_text_encoder(t5_paths["official_safetensors"], tokenizer_dir, T2V, "cpu", torch.bfloat16)
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    assert encoder.encode(["a cat"])[0]["embedding"].dtype == torch.bfloat16


def test_pth_is_read_with_weights_only(t5_paths, clip_paths, tokenizer_dir, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    t5.load_text_encoder(t5_paths["official_pth"], tokenizer_dir, T2V, "cpu", torch.float32)
    clip.load_clip(clip_paths["official"], I2V, "cpu", torch.float32)
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}] * 2


def test_fp8_scaled_is_refused(tmp_path, umt5):
    state = {k: v.to(torch.float8_e4m3fn) for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(1)
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(state, path)
    with pytest.raises(ConfigError) as excinfo:
        t5.check_t5(str(path), T2V)
    key, message = _problem(excinfo)
    assert key == "model.t5" and "fp8_scaled" in message and "umt5_xxl_fp16.safetensors" in message


@pytest.mark.parametrize("layout", ["official_safetensors", "comfy", "pipeline"])
def test_t5_of_another_size_is_a_config_error(layout, t5_paths):
    t5.check_t5(t5_paths[layout], T2V)
    with pytest.raises(ConfigError) as excinfo:
        t5.check_t5(t5_paths[layout], TASKS["t2v-14B"])
    key, message = _problem(excinfo)
    assert key == "model.t5"
    assert "d_model 32 and 2 layers" in message and "d_model 4096 and 24 layers" in message


def test_t5_pth_size_is_checked_by_the_loader(t5_paths, tokenizer_dir):
    t5.check_t5(t5_paths["official_pth"], TASKS["t2v-14B"])  # a .pth is not read at check time
    with pytest.raises(ConfigError, match="d_model 4096"):
        t5.load_text_encoder(t5_paths["official_pth"], tokenizer_dir, TASKS["t2v-14B"], "cpu", torch.float32)


def test_t5_reshaped_tensor_is_named(tmp_path, umt5, tokenizer_dir):
    official = t5.t5_to_official(umt5.state_dict())
    official["blocks.1.ffn.gate.0.weight"] = official["blocks.1.ffn.gate.0.weight"][:48]
    path = tmp_path / "t5.safetensors"
    save_file(official, path)
    with pytest.raises(ConfigError) as excinfo:
        t5.load_text_encoder(path, tokenizer_dir, T2V, "cpu", torch.float32)
    key, message = _problem(excinfo)
    assert key == "model.t5"
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0.weight: file [48, 32], model [64, 32]" in message


def test_t5_wrong_files_name_path_and_fix(tmp_path, clip_paths):
    bin_file = tmp_path / "pytorch_model.bin"
    bin_file.write_bytes(b"x")
    for value, expected in [(bin_file, "is not a .safetensors/.pt/.pth file"),
                            (clip_paths["comfy"], "is not a UMT5 text encoder"),
                            (clip_paths["pipeline"], "has no UMT5 config.json")]:
        with pytest.raises(ConfigError) as excinfo:
            t5.locate_t5(str(value))
        key, message = _problem(excinfo)
        assert key == "model.t5" and expected in message and "set model.t5=<models_t5_umt5-xxl-enc-bf16.pth" in message


def test_checks_do_not_import_torch(t5_paths, clip_paths, tokenizer_dir):
    code = (
        "import sys\n"
        "from musubi_pipe.models.wan import clip, t5\n"
        "from musubi_pipe.models.wan.tasks import TASKS\n"
        f"t5.check_t5({str(t5_paths['comfy'])!r}, TASKS['tiny-t2v'])\n"
        f"t5.check_t5({str(t5_paths['pipeline'])!r}, TASKS['tiny-t2v'])\n"
        f"t5.locate_tokenizer({str(tokenizer_dir)!r})\n"
        f"clip.check_clip({str(clip_paths['comfy'])!r}, TASKS['tiny-i2v'])\n"
        f"clip.check_clip({str(clip_paths['pipeline'])!r}, TASKS['tiny-i2v'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CLIP -----------------------------------------------------------------------------------------


def test_locate_clip_kinds(clip_paths):
    assert {name: clip.locate_clip(path).kind for name, path in clip_paths.items()} == {
        "official": "official", "official_safetensors": "official", "comfy": "transformers_file",
        "pipeline": "pretrained"}
    assert clip.locate_clip(clip_paths["pipeline"]).path == clip_paths["pipeline"] / "image_encoder"


def _reference_image_tokens(model, pixels) -> torch.Tensor:
    x = F.interpolate(pixels, size=(28, 28), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=(x * 0.5 + 0.5 - mean) / std, output_hidden_states=True).hidden_states[-2]


def test_clip_layouts_encode_like_clip_vision(clip_paths, vision):
    model, _ = vision
    pixels = _seeded(3, lambda: torch.rand(2, 3, 40, 24) * 2 - 1)
    expected = _reference_image_tokens(model, pixels)
    assert expected.shape == (2, 5, 32)
    for layout, path in clip_paths.items():
        encoder = clip.load_clip(path, I2V, "cpu", torch.float32)
        assert encoder.dtype == torch.float32 and not encoder.model.training
        assert not any(p.requires_grad for p in encoder.model.parameters())
        torch.testing.assert_close(encoder.encode(pixels), expected, rtol=0, atol=1e-6, msg=layout)


def test_clip_of_another_size_is_a_config_error(clip_paths):
    for value in (clip_paths["official_safetensors"], clip_paths["comfy"], clip_paths["pipeline"]):
        clip.check_clip(value, I2V)
        with pytest.raises(ConfigError) as excinfo:
            clip.check_clip(value, TASKS["i2v-14B"])
        key, message = _problem(excinfo)
        assert key == "model.clip"
        assert "hidden size 32 and 3 layers" in message and "hidden size 1280 and 32 layers" in message
    with pytest.raises(ConfigError, match="hidden size 1280"):
        clip.load_clip(clip_paths["official"], TASKS["i2v-14B"], "cpu", torch.float32)


def test_clip_wrong_file_names_path_and_fix(t5_paths):
    with pytest.raises(ConfigError) as excinfo:
        clip.locate_clip(str(t5_paths["comfy"]))
    key, message = _problem(excinfo)
    assert key == "model.clip" and str(t5_paths["comfy"]) in message and "clip_vision_h.safetensors" in message
