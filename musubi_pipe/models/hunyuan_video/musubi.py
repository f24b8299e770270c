"""musubi-tuner's HunyuanVideo scripts and flags (tools from-musubi; config/musubi_flags.py has the shared ones)."""

from __future__ import annotations

from musubi_pipe.config.musubi_flags import dtype, switch, to

SCRIPTS = ("hv_train_network.py", "cache_latents.py", "cache_text_encoder_outputs.py")

FLAGS = {
    "--dit_dtype": to("model.dit_dtype", dtype),
    "--dit_in_channels": to("model.dit_in_channels", int),
    "--fp8_llm": switch("memory.fp8_text_encoder"),
    "--text_encoder1": to("model.text_encoder1"),
    "--text_encoder2": to("model.text_encoder2"),
    "--text_encoder_dtype": to("model.text_encoder_dtype", dtype),
    "--vae_tiling": switch("model.vae_tiling"),
    "--vae_chunk_size": to("model.vae_chunk_size", int),
    "--vae_spatial_tile_sample_min_size": to("model.vae_spatial_tile_sample_min_size", int),
    "--guidance_scale": to("model.train_guidance_scale", float),
}

# cache_latents.py encodes without tiling or chunking unless asked (ours tile by default)
DEFAULTS = {
    "--vae_tiling": ("model.vae_tiling", False, "latents"),
    "--vae_chunk_size": ("model.vae_chunk_size", None, "latents"),
}

HINTS = {
    "model.vae": "the --vae of cache_latents.py (hunyuan-video-t2v-720p/vae/pytorch_model.pt)",
    "model.text_encoder1": "the --text_encoder1 of cache_text_encoder_outputs.py (llava_llama3 file or folder)",
    "model.text_encoder2": "the --text_encoder2 of cache_text_encoder_outputs.py (clip_l file or folder)",
    "model.text_encoder1_tokenizer": "with a single-file LLM (musubi-tuner downloads the tokenizer itself): the "
                                     "xtuner/llava-llama-3-8b-v1_1-transformers folder; null for a folder that has one",
    "model.text_encoder2_tokenizer": "with a single-file CLIP: the openai/clip-vit-large-patch14 folder; null for a "
                                     "folder that has one",
}


def model_option(flags: dict) -> str:
    return "hunyuan_video/t2v"
