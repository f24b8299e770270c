"""HunyuanVideo DiT and VAE: key maps, locating and checking files, loading every file format to the same model."""

import os

import pytest
import torch
from safetensors.torch import save_file

from musubi_pipe.errors import ConfigError
from musubi_pipe.models.hunyuan_video import keymap, loading, locate, tiny


class NotATensor:
    """Pickled into a .pt to make a file that is not a plain state dict."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    for variant in ("official", "fp8", "skyreels_i2v", "diffusers"):
        tiny.write_tiny_dit(root, variant)
    for variant in ("official", "diffusers"):
        tiny.write_tiny_vae(root, variant)
    return root


@pytest.fixture(scope="module")
def dit_inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[0, 4] = 0
    return {
        "hidden_states": torch.randn(1, 16, 3, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, tiny.TINY_TEXT_DIM, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, tiny.TINY_POOLED_DIM, generator=g),
        "guidance": torch.tensor([6000.0]),
    }


def _run(dit, inputs, **changes):
    with torch.no_grad():
        return dit(**{**inputs, **changes}, return_dict=False)[0]


def _problem(excinfo) -> tuple[str, str]:
    (problem,) = excinfo.value.problems
    return problem


# --- key maps -------------------------------------------------------------------------------------


def test_dit_keymap_round_trip_and_fused_layout():
    state = tiny.tiny_dit().state_dict()
    official = keymap.dit_to_official(state, 64)
    assert official["double_blocks.0.img_attn_qkv.weight"].shape == (3 * 64, 64)
    assert official["single_blocks.1.linear1.weight"].shape == (3 * 64 + 256, 64)  # q, k, v, MLP in
    assert "final_layer.adaLN_modulation.1.weight" in official and "norm_out.linear.weight" not in official
    # diffusers' norm_out emits (scale, shift), the official final layer (shift, scale)
    assert torch.equal(official["final_layer.adaLN_modulation.1.bias"][:64], state["norm_out.linear.bias"][64:])
    back = keymap.dit_to_diffusers(official, 64)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    again = keymap.dit_to_official(back, 64)
    assert all(torch.equal(again[k], official[k]) for k in official)
    with pytest.raises(ValueError, match="unknown.weight"):
        keymap.dit_to_diffusers({**official, "unknown.weight": torch.zeros(1)}, 64)
    with pytest.raises(ValueError, match="hidden size 32"):
        keymap.dit_to_diffusers(official, 32)


def test_dit_keymap_agrees_with_diffusers_converter_at_full_size():
    """diffusers' converter hard-codes hidden size 3072: at that size both must give the same names and shapes."""
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(num_layers=1, num_single_layers=1, num_refiner_layers=1)
    official = keymap.dit_to_official(model.state_dict(), 3072)
    ours = keymap.dit_to_diffusers(official, 3072)
    theirs = convert_hunyuan_video_transformer_to_diffusers(dict(official))
    assert ours.keys() == theirs.keys() == model.state_dict().keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_wrappers_and_prefixes_are_stripped():
    t = torch.zeros(1)
    assert keymap.strip_dit_wrappers({"module": {"img_in.proj.weight": t}}) == {"img_in.proj.weight": t}
    comfy = {"model.diffusion_model.img_in.proj.weight": t, "diffusion_model.txt_in.input_embedder.bias": t}
    assert keymap.strip_dit_wrappers(comfy).keys() == {"img_in.proj.weight", "txt_in.input_embedder.bias"}
    wrapped_vae = {"state_dict": {"vae.encoder.conv_in.conv.weight": t, "loss.logvar": t}}
    assert keymap.vae_to_diffusers(wrapped_vae) == {"encoder.conv_in.conv.weight": t}
    assert keymap.vae_to_official({"encoder.conv_in.conv.weight": t}) == {"encoder.conv_in.conv.weight": t}


# --- the DiT --------------------------------------------------------------------------------------


def test_dit_signature_from_headers_and_config(root):
    from musubi_pipe.models.files import safetensors_shapes

    shapes = {k: s for k, (_, s) in safetensors_shapes([root / "skyreels_hunyuan_i2v_tiny_bf16.safetensors"]).items()}
    sig = locate.dit_signature(shapes)
    assert sig == {"hidden_size": 64, "heads": 2, "head_dim": 32, "num_layers": 2, "num_single_layers": 2,
                   "num_refiner_layers": 1, "in_channels": 32, "out_channels": 16, "patch_size": 2, "patch_size_t": 1,
                   "text_embed_dim": 32, "pooled_projection_dim": 24, "mlp_ratio": 4.0, "guidance_embeds": True}
    diffusers_shapes = {k: tuple(v.shape) for k, v in tiny.tiny_dit().state_dict().items()}
    assert locate.dit_signature(diffusers_shapes) == {**sig, "in_channels": 16}
    config = loading.dit_config(sig)
    assert config["rope_axes_dim"] == (4, 14, 14) and config["in_channels"] == 32
    assert loading.rope_axes_dim(128) == (16, 56, 56)


def test_every_dit_format_loads_to_the_same_model(root, dit_inputs):
    official = loading.load_dit(root / tiny.OFFICIAL_ROOT / "transformers" / "mp_rank_00_model_states.pt", "cpu",
                                torch.float32, in_channels=16)
    assert not official.training and not any(p.requires_grad for p in official.parameters())
    expected = _run(official, dit_inputs)
    assert expected.shape == (1, 16, 3, 8, 8) and expected.std() > 0.1
    # the untrained tiny model already depends on each input
    for name, value in (("hidden_states", dit_inputs["hidden_states"].flip(-1)), ("timestep", torch.tensor([100.0])),
                        ("encoder_hidden_states", dit_inputs["encoder_hidden_states"] * 2)):
        assert not torch.allclose(_run(official, dit_inputs, **{name: value}), expected, atol=1e-3), name
    for path in (root / tiny.OFFICIAL_ROOT, root / tiny.DIFFUSERS_ROOT / "transformer", root / tiny.DIFFUSERS_ROOT):
        assert torch.equal(_run(loading.load_dit(path, "cpu", torch.float32), dit_inputs), expected), path
    fp8 = loading.load_dit(root / "mp_rank_00_model_states_fp8_tiny.safetensors", "cpu", torch.float32)
    assert fp8.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32  # upcast
    got = _run(fp8, dit_inputs)
    assert not torch.equal(got, expected)
    assert (got - expected).norm() / expected.norm() < 0.05


def test_single_files_with_diffusers_or_comfyui_names(root, dit_inputs, tmp_path):
    expected = _run(loading.load_dit(root / tiny.OFFICIAL_ROOT, "cpu", torch.float32), dit_inputs)
    state = tiny.tiny_dit().state_dict()
    save_file(state, tmp_path / "diffusers_names.safetensors")
    official = keymap.dit_to_official(state, 64)
    save_file({"model.diffusion_model." + k: v for k, v in official.items()}, tmp_path / "comfyui.safetensors")
    for name in ("diffusers_names.safetensors", "comfyui.safetensors"):
        assert torch.equal(_run(loading.load_dit(tmp_path / name, "cpu", torch.float32), dit_inputs), expected), name


def test_skyreels_i2v_dit_takes_32_channels(root, dit_inputs):
    path = root / "skyreels_hunyuan_i2v_tiny_bf16.safetensors"
    dit = loading.load_dit(path, "cpu", torch.float32, in_channels=32)
    assert dit.config.in_channels == 32 and dit.config.out_channels == 16
    x = dit_inputs["hidden_states"]
    assert _run(dit, dit_inputs, hidden_states=torch.cat([x, torch.zeros_like(x)], dim=1)).shape == x.shape


def test_check_dit_rejects_wrong_in_channels(root):
    with pytest.raises(ConfigError) as e:
        locate.check_dit(root / "skyreels_hunyuan_i2v_tiny_bf16.safetensors", "model.dit", in_channels=16)
    key, message = _problem(e)
    assert key == "model.dit"
    assert "in_channels 32 (SkyReels V1 image-to-video)" in message and message.endswith("model.dit_in_channels=32")
    # a .pt has no header: check_dit accepts it, the loader checks the tensors
    pt = root / tiny.OFFICIAL_ROOT / "transformers" / "mp_rank_00_model_states.pt"
    assert locate.check_dit(pt, in_channels=32).path == pt
    with pytest.raises(ConfigError, match="model.dit_in_channels=32 .SkyReels V1 image-to-video."):
        loading.load_dit(pt, "cpu", torch.float32, in_channels=32)


def test_check_dit_rejects_other_models(root, tmp_path):
    wan = tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors"
    save_file({"head.modulation": torch.zeros(1, 2, 4), "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2),
               "blocks.0.ffn.0.weight": torch.zeros(8, 4)}, wan)
    with pytest.raises(ConfigError) as e:
        locate.check_dit(wan, "model.dit")
    key, message = _problem(e)
    assert key == "model.dit" and "not a HunyuanVideo DiT (it looks like a Wan DiT)" in message
    with pytest.raises(ConfigError, match="looks like a VAE"):
        locate.check_dit(root / tiny.DIFFUSERS_ROOT / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match="class AutoencoderKLHunyuanVideo and no mp_rank_00_model_states.pt"):
        locate.check_dit(root / tiny.DIFFUSERS_ROOT / "vae")


def test_pt_files_that_are_not_state_dicts(tmp_path):
    objects = tmp_path / "objects.pt"
    torch.save({"module": NotATensor()}, objects)
    with pytest.raises(ConfigError, match="cannot be read as a plain state dict"):
        loading.load_dit(objects, "cpu", torch.float32)
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(ConfigError, match="not a HunyuanVideo DiT"):
        loading.load_dit(no_tensors, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="not a HunyuanVideo VAE"):
        loading.load_vae(no_tensors, "cpu", torch.float32)


def test_tencent_scaled_fp8_pt_is_refused(tmp_path):
    pt = tmp_path / "mp_rank_00_model_states_fp8.pt"
    pt.write_bytes(b"")
    (tmp_path / "mp_rank_00_model_states_fp8_map.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="scaled fp8 .* mp_rank_00_model_states_fp8_map.pt"):
        locate.locate_dit(pt)


def test_tiny_files_are_rewritten_only_when_they_change(root):
    path = tiny.write_tiny_dit(root, "official")
    before = os.stat(path).st_mtime_ns
    assert tiny.write_tiny_dit(root, "official") == path and os.stat(path).st_mtime_ns == before


# --- the VAE --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(root):
    return loading.load_vae(root / tiny.OFFICIAL_ROOT / "vae" / "pytorch_model.pt", "cpu", torch.float32)


@pytest.fixture(scope="module")
def video():
    return torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_vae_formats_give_the_same_latents(root, vae, video):
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 3, 8, 8) and vae.scaling_factor == pytest.approx(0.476986)
    for path in (root / tiny.OFFICIAL_ROOT, root / tiny.DIFFUSERS_ROOT, root / tiny.DIFFUSERS_ROOT / "vae"):
        assert torch.equal(loading.load_vae(path, "cpu", torch.float32).encode(video), latents), path
    posterior = vae.vae.encode(video).latent_dist.mode()
    assert torch.allclose(latents, posterior * 0.476986)
    assert vae.encode_item(video)["latents"].dtype == torch.float32


def test_vae_decode(vae, video):
    pixels = vae.decode(vae.encode(video))
    assert pixels.shape == video.shape and pixels.min() >= -1 and pixels.max() <= 1
    assert vae.dtype == torch.float32 and vae.device == torch.device("cpu")


def test_vae_memory_options(root, vae):
    cos = torch.nn.functional.cosine_similarity
    video = torch.rand(1, 3, 9, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents, pixels = vae.encode(video), vae.decode(vae.encode(video))
    # --vae_chunk_size: the same convolutions, computed in slices
    chunked = loading.load_vae(root / tiny.DIFFUSERS_ROOT, "cpu", torch.float32, chunk_size=16)
    assert torch.allclose(chunked.encode(video), latents, atol=1e-5)
    assert torch.allclose(chunked.decode(latents), pixels, atol=1e-5)
    # --vae_spatial_tile_sample_min_size: 2 x 2 tiles of 64 px; a random tiny VAE is far from local, so tiles
    # are only close to the whole (a bookkeeping error would make them as unlike as another video's)
    tiled = loading.load_vae(root / tiny.DIFFUSERS_ROOT, "cpu", torch.float32, tiling=True, tile_sample_min_size=64)
    assert tiled.vae.use_tiling and tiled.vae.tile_sample_stride_height == 48
    tiled_latents, tiled_pixels = tiled.encode(video), tiled.decode(latents)
    assert tiled_latents.shape == latents.shape and tiled_pixels.shape == pixels.shape
    assert not torch.equal(tiled_latents, latents)
    assert cos(tiled_latents.flatten(), latents.flatten(), dim=0) > 0.7
    other = vae.encode(torch.rand_like(video) * 2 - 1)
    assert cos(other.flatten(), latents.flatten(), dim=0) < 0.5
    assert cos(tiled_pixels.flatten(), pixels.flatten(), dim=0) > 0.3
    assert cos(vae.decode(other).flatten(), pixels.flatten(), dim=0) < 0.15
    # musubi-tuner's default tile size, and no temporal tiling (diffusers' framewise default is off)
    default = loading.load_vae(root / tiny.DIFFUSERS_ROOT, "cpu", torch.float32, tiling=True)
    assert default.vae.tile_sample_min_width == 256 and default.vae.tile_sample_stride_width == 192
    assert not default.vae.use_framewise_encoding and not default.vae.use_framewise_decoding


def test_encode_condition_is_the_padded_image_latent_sample(vae, video):
    image = video[:, :, :1]
    cond = vae.encode_condition(image, 17, torch.Generator().manual_seed(3))["latents_image"]
    assert cond.shape == (1, 16, 5, 8, 8) and cond.dtype == torch.float32
    assert torch.count_nonzero(cond[:, :, 1:]) == 0
    sample = vae.vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(3)) * 0.476986
    assert torch.allclose(cond[:, :, :1], sample)


def test_check_vae_rejects_other_models(root, tmp_path):
    wan_vae = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "conv2.weight": torch.zeros(16, 16, 1, 1, 1)},
              wan_vae)
    with pytest.raises(ConfigError) as e:
        locate.check_vae(wan_vae, "model.vae")
    key, message = _problem(e)
    assert key == "model.vae" and "not a HunyuanVideo VAE (it looks like a Wan VAE)" in message
    with pytest.raises(ConfigError, match="not a HunyuanVideo VAE .it looks like a HunyuanVideo DiT."):
        locate.check_vae(root / "skyreels_hunyuan_i2v_tiny_bf16.safetensors")
    with pytest.raises(ConfigError, match="class HunyuanVideoTransformer3DModel and no pytorch_model.pt"):
        locate.check_vae(root / tiny.DIFFUSERS_ROOT / "transformer")
