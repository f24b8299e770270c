"""Z-Image tasks: which sampling settings a DiT gets (Z-Image is text-to-image only).

`turbo` is the distilled Z-Image-Turbo: sampled without classifier-free guidance (musubi-tuner's
`--guidance_scale 0.0`). `base` is Z-Image (the base model released January 2026) and ostris' De-Turbo,
sampled with guidance 4.0 and a negative prompt (musubi-tuner's docs: "4.0 is the official default for
Base", and `--l 4` for De-Turbo samples). Both: 25 steps, flow shift 3.0 (musubi-tuner's
zimage_generate_image.py defaults). The "tiny-*" tasks are the same on the tiny models of tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from musubi_pipe.errors import ConfigError


@dataclass(frozen=True)
class ZImageTask:
    name: str
    guidance_scale: float  # musubi-tuner's meaning: v = v_pos + g (v_pos - v_neg), none when g <= 1
    sample_steps: int = 25
    shift: float = 3.0
    tiny: bool = False


TASKS = {
    "turbo": ZImageTask("turbo", 0.0),
    "base": ZImageTask("base", 4.0),
    "tiny": ZImageTask("tiny", 4.0, sample_steps=4, tiny=True),
    "tiny-turbo": ZImageTask("tiny-turbo", 0.0, sample_steps=4, tiny=True),
}


def get_task(name) -> ZImageTask:
    if name not in TASKS:
        raise ConfigError([("model.task", f"unknown Z-Image task {name!r}; choose one of {sorted(TASKS)}")])
    return TASKS[name]
