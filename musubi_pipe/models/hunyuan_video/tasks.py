"""HunyuanVideo tasks: the official T2V model, and SkyReels V1 T2V/I2V (fine-tunes of it, inference only).

musubi-tuner has no task names for HunyuanVideo; these name what its flags select: SkyReels V1 T2V is the
official architecture sampled with classifier-free guidance (negative prompt, guidance 6.0, embedded
guidance 1.0), SkyReels V1 I2V also takes the start image's latents as 16 extra input channels
(`--dit_in_channels 32`). The "tiny-*" tasks are the same on the tiny models of tests and demos.
"""

from __future__ import annotations

from dataclasses import dataclass

from musubi_pipe.errors import ConfigError

# SkyReels V1's negative prompt, from its official repository (as musubi-tuner's docs give it)
SKYREELS_NEGATIVE = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
                     "bad teeth, bad eyes, bad limbs, distortion")


@dataclass(frozen=True)
class HunyuanTask:
    name: str
    in_channels: int  # the DiT's input channels: 16 latents, 32 with SkyReels I2V's image latents
    trainable: bool
    conditioning: str  # "none" | "image" (the image latents, zero-padded over frames, are concatenated)
    guidance_scale: float  # classifier-free guidance (1.0: none)
    embedded_guidance_scale: float
    negative_prompt: str
    sample_steps: int = 50
    shift: float = 7.0  # HunyuanVideo's paper: 7.0 for 50 steps (17.0 for fewer than 20)
    fps: int = 24
    tiny: bool = False


_T2V = dict(in_channels=16, trainable=True, conditioning="none", guidance_scale=1.0, embedded_guidance_scale=6.0,
            negative_prompt="")
_SKY_T2V = dict(in_channels=16, trainable=False, conditioning="none", guidance_scale=6.0,
                embedded_guidance_scale=1.0, negative_prompt=SKYREELS_NEGATIVE)
_SKY_I2V = dict(_SKY_T2V, in_channels=32, conditioning="image")

TASKS = {
    "t2v": HunyuanTask("t2v", **_T2V),
    "skyreels-t2v": HunyuanTask("skyreels-t2v", **_SKY_T2V),
    "skyreels-i2v": HunyuanTask("skyreels-i2v", **_SKY_I2V),
    "tiny-t2v": HunyuanTask("tiny-t2v", **_T2V, sample_steps=4, tiny=True),
    "tiny-skyreels-i2v": HunyuanTask("tiny-skyreels-i2v", **_SKY_I2V, sample_steps=4, tiny=True),
}


def get_task(name) -> HunyuanTask:
    if name not in TASKS:
        raise ConfigError([("model.task", f"unknown HunyuanVideo task {name!r}; choose one of {sorted(TASKS)}")])
    return TASKS[name]
