"""HunyuanVideo text encoders (models/hunyuan_video/text.py): every layout the tiny writer produces, the
encodings against plain transformers runs, other key variants of ComfyUI files, and the torch-free checks."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.hunyuan_video import text
from musubi_pipe.models.hunyuan_video.tiny_text import TINY_CLIP_DIM, TINY_LLM_DIM, write_tiny_text_encoders

TEXTS = ["a cat walks", "two red balls roll slowly on the beach at sunset", ""]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hunyuan_text")


@pytest.fixture(scope="module")
def paths(root) -> dict:
    return {layout: write_tiny_text_encoders(root, layout) for layout in ("comfy", "official")}


@pytest.fixture(scope="module")
def encoded(paths) -> dict:
    return {layout: text.load_text_encoder(cfg, "cpu", torch.float32).encode(TEXTS) for layout, cfg in paths.items()}


@pytest.fixture(scope="module")
def encoder(paths):
    return text.load_text_encoder(paths["official"], "cpu", torch.float32)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"llm", "clip_pooled"}
        assert torch.equal(x["llm"], y["llm"]) and torch.equal(x["clip_pooled"], y["clip_pooled"])


def _problems(cfg: dict) -> dict[str, str]:
    return dict(text.check_text_encoders(cfg))


# --- the encodings ----------------------------------------------------------------------------------


def test_layouts_give_identical_embeddings(paths, encoded):
    assert paths["official"]["text_encoder1_tokenizer"] is None  # found in the from_pretrained folders
    _assert_same(encoded["comfy"], encoded["official"])
    for item in encoded["comfy"]:
        assert item["llm"].dtype == torch.float32 and item["llm"].shape[1] == TINY_LLM_DIM
        assert item["clip_pooled"].shape == (TINY_CLIP_DIM,)


def test_llm_tokens_are_the_prompts_after_the_template_prefix(encoder, encoded):
    tokenizer = encoder.llm_tokenizer
    assert 0 < encoder.crop_start < 200  # the tiny tokenizer's prefix (95 with the real one)
    lengths = [item["llm"].shape[0] for item in encoded["official"]]
    # the prompt's tokens and the template's final <|eot_id|>: an empty prompt still has one
    expected = [len(tokenizer(text.PROMPT_TEMPLATE.format(t)).input_ids) - encoder.crop_start for t in TEXTS]
    assert lengths == expected and lengths[1] > lengths[0] > lengths[2] == 1
    ids = tokenizer(text.PROMPT_TEMPLATE.format(TEXTS[0])).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[encoder.crop_start:]) == ["a", "Ġcat", "Ġwalks", "<|eot_id|>"]


def test_llm_states_are_layer_minus_3_of_a_plain_transformers_run(paths, encoder, encoded):
    """Each text alone, unpadded, through transformers' LlamaModel: the batch's padding changes nothing."""
    folder = paths["official"]["text_encoder1"]
    model = LlamaModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 3
    for prompt, item in zip(TEXTS, encoded["official"]):
        ids = tokenizer(text.PROMPT_TEMPLATE.format(prompt), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        assert len(out.hidden_states) == 4  # embeddings and 3 layers: -3 is the first layer's output
        expected = out.hidden_states[-3][0, encoder.crop_start:]
        assert torch.allclose(item["llm"], expected, atol=1e-5)
        # the first returned token is the first prompt token, not the template's
        assert torch.allclose(item["llm"][0], out.hidden_states[-3][0, encoder.crop_start], atol=1e-5)
        assert not torch.allclose(item["llm"], out.last_hidden_state[0, encoder.crop_start:], atol=1e-3)


def test_clip_pooled_is_the_pooler_output(paths, encoded):
    folder = paths["official"]["text_encoder2"]
    model = CLIPTextModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # as diffusers' HunyuanVideoPipeline: padded to 77, no attention mask
    ids = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = model(input_ids=ids).pooler_output
    for item, expected in zip(encoded["official"], pooled):
        assert torch.allclose(item["clip_pooled"], expected, atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_run_on_cpu(paths, encoded, dtype):
    out = text.load_text_encoder(paths["comfy"], "cpu", dtype).encode(TEXTS)
    for item, reference in zip(out, encoded["comfy"]):
        assert item["llm"].dtype == item["clip_pooled"].dtype == dtype
        assert item["llm"].shape == reference["llm"].shape
        assert torch.allclose(item["llm"].float(), reference["llm"], atol=0.05, rtol=0.05)
        assert torch.allclose(item["clip_pooled"].float(), reference["clip_pooled"], atol=0.05, rtol=0.05)


# --- other file variants ----------------------------------------------------------------------------


def test_comfy_file_variants_load(paths, encoded, tmp_path):
    comfy = paths["comfy"]
    llm, clip = load_file(comfy["text_encoder1"]), load_file(comfy["text_encoder2"])
    # a LLaVA file: text keys under model.language_model., a vision tower, and ComfyUI's tokenizer blob
    llava = {k.replace("model.", "model.language_model.", 1): v for k, v in llm.items() if k.startswith("model.")}
    llava.update({"lm_head.weight": llm["lm_head.weight"], "tokenizer": torch.arange(8, dtype=torch.uint8),
                  "model.vision_tower.vision_model.post_layernorm.weight": torch.ones(4, dtype=torch.float16),
                  "model.multi_modal_projector.linear_1.weight": torch.ones(4, 4, dtype=torch.float16)})
    # a CLIP file with the projection and logit scale some repacks keep
    clip.update({"text_projection.weight": torch.eye(TINY_CLIP_DIM, dtype=torch.float16),
                 "logit_scale": torch.tensor(4.6, dtype=torch.float16)})
    cfg = dict(comfy, text_encoder1=tmp_path / "llava.safetensors", text_encoder2=tmp_path / "clip.safetensors")
    save_file(llava, cfg["text_encoder1"])
    save_file(clip, cfg["text_encoder2"])
    assert text.check_text_encoders(cfg) == []
    _assert_same(text.load_text_encoder(cfg, "cpu", torch.float32).encode(TEXTS), encoded["comfy"])


def test_pipeline_root_with_tokenizer_subfolders(paths, encoded, tmp_path):
    """A diffusers-style root: text_encoder/ and text_encoder_2/ without tokenizers, tokenizer/ and tokenizer_2/."""
    for part, tokenizer, key in (("text_encoder", "tokenizer", "text_encoder1"),
                                 ("text_encoder_2", "tokenizer_2", "text_encoder2")):
        source = paths["official"][key]
        shutil.copytree(source, tmp_path / part, ignore=shutil.ignore_patterns("tokenizer*"))
        shutil.copytree(source, tmp_path / tokenizer, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    cfg = {"text_encoder1": tmp_path, "text_encoder2": tmp_path}
    assert text.check_text_encoders(cfg) == []
    files = text.text_files(cfg)
    assert tmp_path / "tokenizer" / "tokenizer.json" in files and tmp_path / "tokenizer_2" / "tokenizer.json" in files
    _assert_same(text.load_text_encoder(cfg, "cpu", torch.float32).encode(TEXTS), encoded["official"])


# --- torch-free checks --------------------------------------------------------------------------------


def test_check_reports_a_single_file_without_tokenizer(paths):
    cfg = dict(paths["comfy"], text_encoder1_tokenizer=None)
    problems = _problems(cfg)
    assert problems.keys() == {"model.text_encoder1_tokenizer"}
    message = problems["model.text_encoder1_tokenizer"]
    assert "single weights file" in message and "xtuner/llava-llama-3-8b-v1_1-transformers" in message
    with pytest.raises(ConfigError):
        text.load_text_encoder(cfg, "cpu", torch.float32)


def test_check_reports_an_encoder_in_the_wrong_key(paths):
    comfy = paths["comfy"]
    swapped = dict(comfy, text_encoder1=comfy["text_encoder2"], text_encoder2=comfy["text_encoder1"])
    problems = _problems(swapped)
    assert "the CLIP-L text model, which belongs in model.text_encoder2" in problems["model.text_encoder1"]
    assert "language model, which belongs in model.text_encoder1" in problems["model.text_encoder2"]
    folders = paths["official"]
    problems = _problems(dict(folders, text_encoder1=folders["text_encoder2"]))
    assert "holds the CLIP-L text model" in problems["model.text_encoder1"]


def test_check_reports_wrong_tokenizers_and_missing_paths(paths, tmp_path):
    comfy = paths["comfy"]
    problems = _problems(dict(comfy, text_encoder1_tokenizer=comfy["text_encoder2_tokenizer"],
                              text_encoder2=tmp_path / "missing.safetensors"))
    assert "holds a CLIPTokenizer" in problems["model.text_encoder1_tokenizer"]
    assert "does not exist" in problems["model.text_encoder2"]
    unknown = tmp_path / "llava_llama3_extra.safetensors"
    save_file({**load_file(comfy["text_encoder1"]), "model.extra.weight": torch.zeros(2)}, unknown)
    assert "'model.extra.weight'" in _problems(dict(comfy, text_encoder1=unknown))["model.text_encoder1"]
    scaled = tmp_path / "llava_llama3_fp8_scaled.safetensors"
    save_file({**load_file(comfy["text_encoder1"]), "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, scaled)
    assert "fp8_scaled" in _problems(dict(comfy, text_encoder1=scaled))["model.text_encoder1"]


def test_text_files_list_weights_and_tokenizers(paths, root):
    files = text.text_files(paths["comfy"])
    names = [f.relative_to(root).as_posix() for f in files]
    assert names[0] == "llava_llama3_tiny_fp16.safetensors" and "clip_l_tiny.safetensors" in names
    assert "llava-llama-3-tiny-tokenizer/tokenizer.json" in names and "clip-vit-tiny-tokenizer/tokenizer.json" in names
    official = [f.relative_to(root).as_posix() for f in text.text_files(paths["official"])]
    assert {"hunyuan-tiny-text_encoder/model.safetensors", "hunyuan-tiny-text_encoder/tokenizer.json",
            "hunyuan-tiny-text_encoder_2/model.safetensors", "hunyuan-tiny-text_encoder_2/tokenizer.json"} <= set(official)
    assert len(official) == len(set(official))


# --- the tiny writer ----------------------------------------------------------------------------------


def test_tiny_files_are_deterministic_and_not_rewritten(paths, root, tmp_path):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    for layout in ("comfy", "official"):
        write_tiny_text_encoders(root, layout)
        write_tiny_text_encoders(tmp_path, layout)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    for p in files:
        assert (tmp_path / p.relative_to(root)).read_bytes() == p.read_bytes(), p
    assert load_file(paths["comfy"]["text_encoder1"])["model.norm.weight"].dtype == torch.float16


def test_text_module_imports_without_torch():
    code = "import sys, musubi_pipe.models.hunyuan_video.text; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
