"""musubi-tuner's Wan scripts and flags (tools from-musubi; config/musubi_flags.py has the shared ones)."""

from __future__ import annotations

from musubi_pipe.config.musubi_flags import model_choice, not_needed, switch, to, unsupported
from musubi_pipe.errors import UserError

SCRIPTS = ("wan_train_network.py", "wan_cache_latents.py", "wan_cache_text_encoder_outputs.py")

# musubi-tuner --task -> model group option
TASKS = {
    "t2v-1.3B": "wan/t2v_1_3b", "t2v-14B": "wan/t2v_14b", "i2v-14B": "wan/i2v_14b",
    "t2v-A14B": "wan/t2v_a14b", "i2v-A14B": "wan/i2v_a14b", "ti2v-5B": "wan/ti2v_5b",
}
NOT_YET = {"t2v-1.3B-FC": "Fun Control", "t2v-14B-FC": "Fun Control", "i2v-14B-FC": "Fun Control",
           "t2i-14B": "text-to-image", "flf2v-14B": "first-last-frame-to-video"}

FLAGS = {
    "--task": model_choice("chooses the model group: " + ", ".join(f"`{t}` → `{o}`" for t, o in TASKS.items())
                           + " (absent: `t2v-14B`, musubi-tuner's default); not built yet: "
                           + ", ".join(f"`{t}`" for t in NOT_YET)),
    "--t5": to("model.t5"),
    "--fp8_t5": switch("memory.fp8_text_encoder"),
    "--clip": to("model.clip"),
    "--dit_high_noise": to("model.dit_high_noise"),
    "--timestep_boundary": to("model.timestep_boundary", float, reason="values > 1 are timesteps, as there"),
    "--offload_inactive_dit": switch("memory.offload_inactive_dit"),
    "--vae_cache_cpu": unsupported("the VAE's feature cache stays on the GPU", takes=0),
    "--one_frame": unsupported("one-frame training is not built yet", takes=0),
    "--force_v2_1_time_embedding": unsupported("the time embedding follows the task", takes=0),
    "--i2v": not_needed("the task says whether the start image is encoded", takes=0),
    "--guidance_scale": not_needed("musubi-tuner's Wan trainer does not use it"),
}

HINTS = {
    "model.t5_tokenizer": "musubi-tuner fetches google/umt5-xxl's tokenizer from the Hub itself; give that folder "
                          "(the google/umt5-xxl/ folder of Wan-AI's model repos)",
    "model.vae": "the --vae of wan_cache_latents.py (Wan2.1_VAE.pth or wan_2.1_vae.safetensors)",
    "model.t5": "the --t5 of wan_cache_text_encoder_outputs.py (models_t5_umt5-xxl-enc-bf16.pth)",
    "model.dit_high_noise": "--dit_high_noise: the high-noise expert of Wan2.2 A14B",
    "model.clip": "the --clip of wan_cache_latents.py (Wan2.1 I2V's CLIP file)",
}


def model_option(flags: dict) -> str:
    """The model group option of a musubi-tuner Wan command's --task (its default t2v-14B)."""
    task = (flags.get("--task") or ["t2v-14B"])[0]
    if task in TASKS:
        return TASKS[task]
    if task in NOT_YET:
        raise UserError(f"--task {task}: Wan {NOT_YET[task]} is not built here yet")
    raise UserError(f"--task {task}: not a Wan task musubi-tuner knows ({', '.join([*TASKS, *NOT_YET])})")
