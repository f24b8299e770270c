"""musubi-tuner's Z-Image scripts and flags (tools from-musubi; config/musubi_flags.py has the shared ones)."""

from __future__ import annotations

from musubi_pipe.config.musubi_flags import not_needed, switch, to, unsupported

SCRIPTS = ("zimage_train_network.py", "zimage_cache_latents.py", "zimage_cache_text_encoder_outputs.py")

FLAGS = {
    "--text_encoder": to("model.text_encoder"),
    "--fp8_llm": switch("memory.fp8_text_encoder"),
    "--use_32bit_attention": unsupported("attention runs in the DiT's dtype", takes=0),
    "--guidance_scale": not_needed("musubi-tuner's Z-Image trainer does not use it"),
}

HINTS = {
    "model.vae": "the --vae of zimage_cache_latents.py (ae.safetensors)",
    "model.text_encoder": "the --text_encoder of zimage_cache_text_encoder_outputs.py (qwen_3_4b.safetensors)",
    "model.text_encoder_tokenizer": "musubi-tuner fetches Qwen3's tokenizer itself; give the tokenizer/ folder of "
                                    "Tongyi-MAI/Z-Image-Turbo (or Qwen/Qwen3-4B)",
}


def model_option(flags: dict) -> str:
    """musubi-tuner trains Base, De-Turbo or Turbo with one script and no flag saying which: the spec trains on
    the given DiT with Base's sampling settings (CFG), as musubi-tuner's docs advise for De-Turbo samples."""
    return "zimage/base"
