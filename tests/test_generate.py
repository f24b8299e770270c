"""The generate stage: sampling with LoRA files without training or a dataset, prompt files, output
types, merged vs hooked LoRAs, overlaps, and decoding saved latents."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from musubi_pipe.errors import ConfigError
from musubi_pipe.sampling.prompts import parse_prompt_line
from tests.conftest import stage

pytestmark = pytest.mark.pipeline

GENERATE = ["pipeline.stages=[generate]", "dataset.datasets=[]"]


def _latents(record, stage_name="generate", index=0):
    return load_file(str(Path(stage(record, stage_name)["artifact"]) / f"sample_{index:02d}.safetensors"))["latents"]


def test_prompt_line_syntax():
    entry = parse_prompt_line("a cat on grass --w 832 --h 480 --f 33 --d 7 --s 20 --l 4.5 --fs 3 --n blurry, dark",
                              "p.txt:1")
    assert entry == {"prompt": "a cat on grass", "width": 832, "height": 480, "frames": 33, "seed": 7, "steps": 20,
                     "guidance_scale": 4.5, "shift": 3.0, "negative_prompt": "blurry, dark"}
    with pytest.raises(ConfigError, match=r"p.txt:2.*unknown option --zz"):
        parse_prompt_line("x --zz 3", "p.txt:2")
    with pytest.raises(ConfigError, match="--w needs a int"):
        parse_prompt_line("x --w wide", "p.txt:3")


def test_generate_with_trained_lora_file_matches_the_sample_stage(demo, tmp_path, caplog):
    prompt = "a red circle on a white background"
    trained = demo(f"sampling.prompts=[{{prompt:'{prompt}',frames:1,seed:7}}]", "sampling.steps=3")
    lora = trained["lora"][0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# the demo's circle\n{prompt} --f 1 --d 7 --s 3\n\n{prompt} --f 5 --d 8 --s 2 --w 48 --h 32\n")
    base = [*GENERATE, "sampling.prompts=[]", f"sampling.prompt_file={prompts}", "sampling.output_type=both"]
    hooked = demo(*base, f"sampling.loras=[{{path:'{lora}'}}]")
    record = stage(hooked, "generate")
    assert [Path(p).name for p in hooked["samples"]] == ["sample_00.png", "sample_00.safetensors",
                                                         "sample_01.mp4", "sample_01.safetensors"]
    assert record["prompts"] == [prompt, prompt]
    # the same LoRA, prompt and seed as the sample stage after training: the same latents
    torch.testing.assert_close(_latents(hooked), _latents(trained, "sample"), rtol=1e-4, atol=1e-5)

    merged = demo(*base, f"sampling.loras=[{{path:'{lora}'}}]", "sampling.merge_loras=true")
    torch.testing.assert_close(_latents(merged), _latents(hooked), rtol=1e-4, atol=1e-5)

    off = demo(*base, f"sampling.loras=[{{path:'{lora}',multiplier:0.0}}]")
    plain = demo(*base)
    assert torch.equal(_latents(off), _latents(plain))  # multiplier 0 is exactly no LoRA
    assert not torch.allclose(_latents(plain), _latents(hooked))

    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        demo(*base, f"sampling.loras=[{{path:'{lora}',multiplier:0.5}},{{path:'{lora}',multiplier:0.5,"
                    r"include_patterns:['blocks\.0\..*']}]")
    assert "both change" in caplog.text and "blocks.0.self_attn.q" in caplog.text


def test_output_types_and_decode_only(demo, tmp_path):
    prompt = [r"sampling.prompts=[{prompt:'a blue ball',frames:1,seed:3,steps:2}]"]
    latent = demo(*GENERATE, *prompt, "sampling.output_type=latent")
    assert [Path(p).suffix for p in latent["samples"]] == [".safetensors"]
    video = demo(*GENERATE, *prompt)
    images = demo(*GENERATE, *prompt[:0], r"sampling.prompts=[{prompt:'a blue ball',frames:5,seed:3,steps:2}]",
                  "sampling.output_type=images")
    folder = Path(images["samples"][0])
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(5)]

    decoded = demo(*GENERATE, f"sampling.latents=['{latent['samples'][0]}']")
    a = np.asarray(Image.open(decoded["samples"][0]))
    b = np.asarray(Image.open(video["samples"][0]))
    assert np.array_equal(a, b)  # decoding the saved latent gives the sampled image
    from musubi_pipe.errors import UserError

    with pytest.raises(UserError, match="holds no 'latents' tensor"):
        demo(*GENERATE, f"sampling.latents=['{_a_lora(demo)}']")  # a LoRA file, not a latent


def _a_lora(demo) -> str:
    return demo("pipeline.stages=[cache_latents,cache_text,train]")["lora"][0]


def test_generate_settings_are_checked_before_loading(demo, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat --w 64\na dog --q 3\n")
    with pytest.raises(ConfigError) as err:
        demo(*GENERATE, f"sampling.prompt_file={bad}")
    assert err.value.problems[0][0] == f"{bad}:2"
    with pytest.raises(ConfigError) as err:
        demo(*GENERATE, f"sampling.loras=[{{path:'{tmp_path}/none.safetensors',expert:middle,scale:2}}]")
    assert {k for k, _ in err.value.problems} == {"sampling.loras[0]", "sampling.loras[0].path",
                                                   "sampling.loras[0].expert"}


def test_generate_reads_lora_files_in_other_layouts(demo, tmp_path):
    from musubi_pipe.network.formats import convert_file

    prompt = r"sampling.prompts=[{prompt:'a red circle',frames:1,seed:4,steps:2}]"
    lora = demo("pipeline.stages=[cache_latents,cache_text,train]")["lora"][0]
    comfy, diffusers = tmp_path / "comfy.safetensors", tmp_path / "diffusers.safetensors"
    convert_file(lora, comfy, "comfy")
    convert_file(lora, diffusers, "diffusers")
    results = [_latents(demo(*GENERATE, prompt, "sampling.output_type=latent", f"sampling.loras=[{{path:'{path}'}}]"))
               for path in (lora, comfy, diffusers)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"sampling.loras\[0\].include_patterns\[0\]"):
        demo(*GENERATE, prompt, f"sampling.loras=[{{path:'{lora}',include_patterns:['blocks\\.(']}}]")
