"""Z-Image on its tiny model, against diffusers' own code: files, text encoding, sampling, LoRA layouts, errors.

The conformance test (test_conformance.py) runs it through cache -> train -> sample -> merge; this file checks what
is particular to it. What ComfyUI and musubi-tuner load was measured with their own code (docs/zimage.md).
"""

from __future__ import annotations

import copy

import diffusers
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import capture_diffusers_messages
from musubi_pipe.errors import ConfigError
from musubi_pipe.models import get_family
from musubi_pipe.models.base import SampleRequest
from musubi_pipe.models.zimage import loading, text, tiny
from musubi_pipe.models.zimage.locate import check_dit, check_vae, dit_signature
from musubi_pipe.network.factory import build_network
from musubi_pipe.network.formats import in_format
from musubi_pipe.network.lora_file import save_lora_file

FAMILY = get_family("zimage")
BAD_MESSAGES = ("unexpected keys", "missing keys", "No LoRA keys associated", "inconsistency")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return FAMILY.build_tiny(tmp_path_factory.mktemp("zimage"), "tiny")


@pytest.fixture(scope="module")
def dit(files):
    return FAMILY.load_dit({"task": "tiny", **files}, "cpu", torch.float32)


@pytest.fixture(scope="module")
def encoder(files):
    return FAMILY.load_text_encoder(files, "cpu", torch.float32)


def test_tiny_files_load_as_written_and_diffusers_converters_read_them(files, dit):
    """The official DiT file (fused qkv) and ae.safetensors go through diffusers' own single-file converters."""
    expected = {k: v.to(torch.bfloat16).float() for k, v in tiny.dit().state_dict().items()}
    assert dit.state_dict().keys() == expected.keys()
    assert all(torch.equal(dit.state_dict()[k], expected[k]) for k in expected)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert loading.dit_config(dit_signature(shapes)) == tiny.TINY_DIT_CONFIG
    assert FAMILY.num_blocks({"task": "tiny"}) == len(dit.layers) == tiny.TINY_DIT_CONFIG["n_layers"]
    official = load_file(files["dit"])
    assert "layers.0.attention.qkv.weight" in official and "layers.0.attention.to_q.weight" not in official
    assert "norm_final.weight" in official and "x_embedder.weight" in official
    vae = FAMILY.load_vae(files, "cpu", torch.float32).vae
    reference = tiny.vae().state_dict()
    assert all(torch.equal(vae.state_dict()[k], reference[k]) for k in reference)
    assert "encoder.down.0.block.0.conv1.weight" in load_file(files["vae"])  # FLUX's original names
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)


def test_text_encoding_is_diffusers_pipelines(files, encoder, dit):
    """Chat template, hidden state -2, real tokens only: what ZImagePipeline.encode_prompt gives."""
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=encoder.model, tokenizer=encoder.tokenizer, transformer=dit)
    prompts = ["a red circle on a white background", "a cat"]
    theirs, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)  # it edits the list
    ours = encoder.encode(prompts)
    assert [o["embedding"].shape[0] for o in ours] == [t.shape[0] for t in theirs] == [15, 10]
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o["embedding"], t, rtol=0, atol=1e-6)
    assert encoder.templated("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_sampling_is_diffusers_pipelines(files, encoder, dit, guidance):
    """Our loop with Z-Image's guidance (v_pos + g (v_pos - v_neg)) and musubi-tuner's step spacing gives
    ZImagePipeline's latents for the same noise and steps: Turbo's guidance 0 (no negative pass) and Base's 4.0."""
    steps, shift, seed = 3, 3.0, 7
    prompt = {"width": 32, "height": 32, "frames": 1, "steps": steps, "shift": shift, "seed": seed,
              "guidance_scale": guidance, "guidance_scale_high": guidance, "strength": None}
    request = SampleRequest(prompt=prompt, cond={}, positive=encoder.encode(["a red circle"]),
                            negative=encoder.encode(["blurry"]), experts=FAMILY.experts({}), dits={"": dit},
                            device="cpu", progress=False)
    ours = FAMILY.sample({"task": "tiny"}, request)
    assert ours.shape == (1, 16, 1, 4, 4)

    # musubi-tuner's spacing (zimage_utils.get_timesteps_sigmas), within 0.001 of the pipeline's default 1 - i / steps;
    # the pipeline's scheduler shifts the sigmas it is given, as ours does
    unshifted = FAMILY.sampling_sigmas({"task": "tiny"}, prompt)
    musubi = (torch.linspace(1000, 1, steps + 1)[:-1] / 1000).tolist()
    assert max(abs(a - b) for a, b in zip(unshifted, musubi)) < 1e-6
    assert max(abs(a - (1 - i / steps)) for i, a in enumerate(unshifted)) <= 1e-3
    noise = torch.randn((1, 16, 1, 4, 4), generator=torch.Generator().manual_seed(seed))[:, :, 0]
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), vae=None,
                                    text_encoder=encoder.model, tokenizer=encoder.tokenizer, transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=steps,
                  sigmas=unshifted, guidance_scale=guidance, latents=noise.clone(), output_type="latent",
                  cfg_normalization=False).images
    torch.testing.assert_close(ours[:, :, 0], theirs, rtol=0, atol=1e-5)


def test_training_target_and_prediction_are_musubi_tuners(dit):
    """predict is the DiT's output negated at t_in = (1000 - timestep) / 1000, the target noise - x0: the loss is
    musubi-tuner's (raw output against x0 - noise)."""
    latents, noise = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 16, 1, 4, 4)
    t = torch.tensor([0.25])
    inputs = FAMILY.training_inputs({"task": "tiny"}, latents, noise, t, t * 1000 + 1, {}, None)
    torch.testing.assert_close(inputs.target, noise - latents)
    torch.testing.assert_close(inputs.noisy, 0.75 * latents + 0.25 * noise)
    caption = torch.randn(7, tiny.TINY_TEXT_DIM)
    v = FAMILY.predict(dit, inputs.noisy, inputs.timesteps, [{"embedding": caption}])
    with torch.no_grad():
        raw = dit([inputs.noisy[0]], (1000 - inputs.timesteps) / 1000, [caption], return_dict=False)[0][0]
    torch.testing.assert_close(v[0], -raw)


def _network(dit, include=()):
    network = build_network(FAMILY.lora_targets(dit), {"network_dim": 4, "network_alpha": 2.0,
                                                       "include_patterns": list(include)},
                            default_excludes=FAMILY.lora_default_excludes)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return network


def test_default_targets_are_musubi_tuners(dit):
    """Attention q/k/v/out and feed-forward w1/w2/w3 of the main blocks; no modulation, no refiners (210 modules
    at Z-Image's 30 blocks)."""
    targets = FAMILY.lora_targets(dit)
    assert len(targets) == 2 * 8 + 8 + 7  # layers and noise refiner with adaLN_modulation, context refiner without
    names = _network(dit).official_names
    assert sorted(names) == sorted(f"layers.{b}.{p}" for b in range(2) for p in (
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
        "feed_forward.w2", "feed_forward.w3"))
    assert list(FAMILY.loraid_layout({"task": "base"}).candidates[:7]) == sorted(names, key=names.index)[:7]
    assert len(FAMILY.loraid_layout({"task": "base"}).candidates) == 210


@pytest.mark.parametrize("fmt", ["official", "comfy", "musubi", "diffusers"])
def test_every_layout_loads_in_diffusers_with_zero_unmatched_keys_and_same_output(dit, tmp_path, fmt):
    network = _network(copy.deepcopy(dit), include=(".*",))  # all 31 block linears, refiners and modulation too
    path = tmp_path / f"{fmt}.safetensors"
    tensors, metadata = in_format(network.lora_state_dict(), fmt)
    save_lora_file(path, tensors, metadata)
    ours = copy.deepcopy(dit)
    rebuilt = _network(ours, include=(".*",))
    rebuilt.apply_to()
    theirs = copy.deepcopy(dit)
    pipe = diffusers.ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=theirs)
    converted = diffusers.ZImagePipeline.lora_state_dict(str(path))
    messages = capture_diffusers_messages(lambda: pipe.load_lora_weights(str(path), adapter_name="t"))
    for bad in BAD_MESSAGES:
        assert not [m for m in messages if bad in m], messages
    loaded = peft.utils.get_peft_model_state_dict(theirs, adapter_name="t")
    assert len(loaded) == len([k for k in converted if "lora_" in k]) == 2 * 31
    x = [torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))]
    caption = [torch.randn(9, tiny.TINY_TEXT_DIM, generator=torch.Generator().manual_seed(1))]
    t = torch.tensor([0.6])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, caption, return_dict=False)[0][0], ours(x, t, caption,
                                   return_dict=False)[0][0], rtol=0, atol=1e-5)


def test_default_layout_is_the_one_comfyui_loads(dit):
    """ComfyUI maps `diffusion_model.<musubi-tuner name>` onto its fused qkv (measured: every module patched
    exactly); musubi-tuner's own lora_unet_ names lose the attention modules there, as its users report."""
    names = _network(dit).official_names
    assert FAMILY.lora_naming.default_save_format == "official"
    assert FAMILY.lora_naming.ignored_by("official", names) == {"musubi-tuner": (sorted(names), "musubi")}
    lost, fix = FAMILY.lora_naming.ignored_by("musubi", names)["ComfyUI"]
    assert fix == "official" and len(lost) == 8 and all(".attention." in m for m in lost)
    tensors, _ = in_format(_network(dit).lora_state_dict(), "official")
    assert "diffusion_model.layers.0.attention.to_q.lora_down.weight" in tensors
    assert "diffusion_model.layers.1.attention.to_out.0.alpha" in tensors
    musubi = _network(dit).lora_state_dict()
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in musubi


def test_wrong_files_are_named(files, tmp_path):
    with pytest.raises(ConfigError, match="is a VAE, which belongs in model.vae, not a Z-Image DiT"):
        check_dit(files["vae"])
    with pytest.raises(ConfigError, match="a language model .Qwen3 belongs in model.text_encoder."):
        check_dit(files["text_encoder"])
    with pytest.raises(ConfigError, match="a Z-Image DiT, which belongs in model.dit"):
        check_vae(files["dit"])
    flux2 = {k: v for k, v in load_file(files["vae"]).items()}
    flux2["encoder.conv_out.weight"] = torch.zeros(64, 32, 3, 3)
    save_file(flux2, str(tmp_path / "flux2_vae.safetensors"))
    with pytest.raises(ConfigError, match=r"the FLUX.2 VAE \(32 latent channels\); Z-Image uses FLUX.1's"):
        check_vae(tmp_path / "flux2_vae.safetensors")
    problems = text.check_text_encoder({"text_encoder": files["dit"], "text_encoder_tokenizer": None})
    assert problems and "a Z-Image DiT, which belongs in model.dit" in problems[0][1]
    problems = text.check_text_encoder({"text_encoder": files["text_encoder"], "text_encoder_tokenizer": None})
    assert problems[0][0] == "model.text_encoder_tokenizer" and "Tongyi-MAI/Z-Image-Turbo's tokenizer/" in problems[0][1]


def test_diffusers_folders_load_like_the_single_files(files, dit, tmp_path):
    """Tongyi-MAI's layout: transformer/ (sharded diffusers names), vae/, text_encoder/ and tokenizer/ folders."""
    root = tmp_path / "Z-Image-Turbo"
    dit.save_pretrained(root / "transformer", max_shard_size="300KB")
    FAMILY.load_vae(files, "cpu", torch.float32).vae.save_pretrained(root / "vae")
    encoder = text.load_text_encoder(files, "cpu", torch.float32)
    encoder.model.save_pretrained(root / "text_encoder")
    encoder.tokenizer.save_pretrained(root / "tokenizer")
    shard = sorted((root / "transformer").glob("*-00001-of-*.safetensors"))[0]
    for value in (root, shard):
        other = FAMILY.load_dit({"task": "tiny", "dit": str(value)}, "cpu", torch.float32)
        assert all(torch.equal(other.state_dict()[k], v) for k, v in dit.state_dict().items())
    cfg = {"task": "tiny", "dit": str(root), "vae": str(root), "text_encoder": str(root), "text_encoder_tokenizer": None}
    assert FAMILY.check_config(cfg) == []
    again = FAMILY.load_text_encoder(cfg, "cpu", torch.float32).encode(["a cat"])[0]["embedding"]
    torch.testing.assert_close(again, encoder.encode(["a cat"])[0]["embedding"], rtol=0, atol=0)


def test_image_only_and_fp8_llm_alias(demo):
    from musubi_pipe.config import compose
    from musubi_pipe.config.validate import validate
    from musubi_pipe.runner import resolve

    cfg = resolve(compose(["+recipe=zimage_tiny", f"paths.root={demo.root}", "dataset.datasets=[{video_directory: x}]"]))
    with pytest.raises(ConfigError, match="dataset.datasets"):
        validate(cfg)
    from musubi_pipe.memory.settings import text_encoder_fp8

    cfg = resolve(compose(["+recipe=zimage_tiny", f"paths.root={demo.root}", "memory.fp8_llm=true"]))
    validate(cfg)  # --fp8_llm is Z-Image's name (musubi-tuner's), not another model's
    assert text_encoder_fp8(cfg["memory"], FAMILY) and not text_encoder_fp8({"fp8_t5": True}, FAMILY)


def test_from_musubi_converts_the_zimage_docs_command(tmp_path):
    from musubi_pipe.tools.from_musubi import translate

    t = translate("""accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/zimage_train_network.py \\
    --dit path/to/dit_model --vae path/to/vae_model --text_encoder path/to/text_encoder \\
    --dataset_config path/to/toml --sdpa --mixed_precision bf16 \\
    --timestep_sampling shift --weighting_scheme none --discrete_flow_shift 2.0 \\
    --optimizer_type adamw8bit --learning_rate 1e-4 --gradient_checkpointing \\
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
    --network_module networks.lora_zimage --network_dim 32 \\
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
    --output_dir path/to/output_dir --output_name name-of-lora""")
    assert t.arch == "zimage" and t.model == "zimage/base"
    assert t.keys["model.text_encoder"] == "path/to/text_encoder" and t.keys["training.discrete_flow_shift"] == 2.0
    assert t.keys["network.network_module"] == "lora" and not t.flags("unknown") and not t.flags("unsupported")


def test_merge_writes_the_official_layout_comfyui_loads(files, dit, tmp_path):
    """tools merge into the official file: q/k/v LoRAs land in their rows of the fused qkv, to_out.0 in
    attention.out; reloaded, the merged DiT computes what the hooked LoRA computes."""
    from musubi_pipe.network.merge import merge_loras

    network = _network(copy.deepcopy(dit))
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, *in_format(network.lora_state_dict(), "musubi"))
    merged = tmp_path / "merged.safetensors"
    report = merge_loras(files["dit"], [(str(path), 1.0)], merged, dtype="float32")
    assert report["changed"] == 14
    written = load_file(str(merged))
    assert "layers.0.attention.qkv.weight" in written and "layers.0.attention.to_q.weight" not in written
    reloaded = FAMILY.load_dit({"task": "tiny", "dit": str(merged)}, "cpu", torch.float32)
    hooked = copy.deepcopy(dit)
    _network(hooked).apply_to()
    x = [torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))]
    caption = [torch.randn(9, tiny.TINY_TEXT_DIM, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, torch.tensor([0.3]), caption, return_dict=False)[0][0],
                                   hooked(x, torch.tensor([0.3]), caption, return_dict=False)[0][0], rtol=0, atol=2e-3)
