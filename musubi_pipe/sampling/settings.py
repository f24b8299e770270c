"""Sampling settings: each prompt's resolved settings and their checks (torch-free; validation runs them).

A prompt may override width, height, frames, seed, steps, guidance_scale, guidance_scale_high, shift,
negative_prompt, image, embedded_guidance_scale, video and strength; settings left null take the
`sampling.*` value and then the task's defaults (Family.sampling_defaults).
"""

from __future__ import annotations

import os

SETTINGS = ("width", "height", "frames", "seed", "steps", "guidance_scale", "guidance_scale_high", "shift",
            "negative_prompt", "image", "embedded_guidance_scale", "video", "strength")
OUTPUT_TYPES = ("video", "images", "latent", "both")  # sampling.output_type (generate stage)
EXPERT_CHOICES = ("both", "high", "low")  # sampling.loras[i].expert


def prompt_settings(sampling: dict, defaults: dict | None = None) -> list[dict]:
    """Return each prompt with every setting filled: the prompt's value, else sampling.*, else the task default."""
    defaults = defaults or {}
    resolved = []
    for prompt in sampling.get("prompts") or []:
        settings = {}
        for key in SETTINGS:
            value = prompt.get(key)
            if value is None:
                value = sampling.get(key)
            if value is None:
                value = defaults.get(key)
            settings[key] = value
        resolved.append(dict(settings, prompt=prompt["prompt"]))
    return resolved


def check_prompts(sampling: dict, geometry, image_mode: str = "none") -> list[tuple[str, str]]:
    """Return (key, message) problems: sizes on the latent grid, frames 4n+1, conditioning images."""
    problems = []
    multiple, stride = geometry.pixel_multiple, geometry.vae_stride[0]
    for i, p in enumerate(prompt_settings(sampling)):
        for side in ("width", "height"):
            if p[side] % multiple:
                problems.append((f"sampling.prompts[{i}].{side}", f"is {p[side]}; use a multiple of {multiple}"))
        if (p["frames"] - 1) % stride:
            problems.append((f"sampling.prompts[{i}].frames", f"is {p['frames']}; use {stride}n+1 (1, 5, 9, ...)"))
        problems += _check_video(p, i)
        image = p["image"]
        if image_mode == "required" and not image:
            problems.append((f"sampling.prompts[{i}].image", "is not set; this image-to-video task needs a start "
                             "image: set sampling.image=<path> or the prompt's image"))
        elif image and image_mode == "none":
            problems.append((f"sampling.prompts[{i}].image", "is set but this task takes no image; remove it"))
        elif image and not os.path.isfile(image):
            problems.append((f"sampling.prompts[{i}].image", f"{image} does not exist; point it at an image file"))
    return problems


def _check_video(p: dict, i: int) -> list[tuple[str, str]]:
    video, strength = p.get("video"), p.get("strength")
    problems = []
    if video and not os.path.exists(video):
        problems.append((f"sampling.prompts[{i}].video", f"{video} does not exist; point it at a video file or a "
                         "folder of frames"))
    if strength is not None and not 0 <= strength <= 1:
        problems.append((f"sampling.prompts[{i}].strength", f"is {strength}; use a value in [0, 1]"))
    if strength is not None and not video:
        problems.append((f"sampling.prompts[{i}].strength", "is set without a video (sampling.video or the "
                         "prompt's video); set one or remove strength"))
    return problems


def check_embedded_guidance(sampling: dict, defaults: dict) -> list[tuple[str, str]]:
    """embedded_guidance_scale is an error on a model without embedded guidance (its default is absent)."""
    if "embedded_guidance_scale" in defaults:
        return []
    keys = [("sampling.embedded_guidance_scale", sampling.get("embedded_guidance_scale"))]
    keys += [(f"sampling.prompts[{i}].embedded_guidance_scale", p.get("embedded_guidance_scale"))
             for i, p in enumerate(sampling.get("prompts") or [])]
    return [(key, "is set but this model has no embedded guidance; use guidance_scale") for key, v in keys
            if v is not None]


def check_generate(sampling: dict) -> list[tuple[str, str]]:
    """Problems of the generate settings, before anything loads."""
    from musubi_pipe.network.settings import pattern_problems

    problems = []
    if sampling.get("output_type", "video") not in OUTPUT_TYPES:
        problems.append(("sampling.output_type", f"is {sampling.get('output_type')!r}; choose one of {list(OUTPUT_TYPES)}"))
    for i, entry in enumerate(sampling.get("loras") or []):
        key = f"sampling.loras[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append((key, "must be {path: <LoRA file>, multiplier: <number>} (multiplier optional)"))
            continue
        unknown = set(entry) - {"path", "multiplier", "expert", "include_patterns", "exclude_patterns"}
        if unknown:
            problems.append((key, f"unknown keys {sorted(unknown)}; allowed: path, multiplier, expert, "
                             "include_patterns, exclude_patterns"))
        if not os.path.isfile(entry["path"]):
            problems.append((f"{key}.path", f"{entry['path']} does not exist; fix the path"))
        if entry.get("expert", "both") not in EXPERT_CHOICES:
            problems.append((f"{key}.expert", f"is {entry.get('expert')!r}; choose one of {list(EXPERT_CHOICES)}"))
        for patterns in ("include_patterns", "exclude_patterns"):
            problems += pattern_problems(entry.get(patterns), f"{key}.{patterns}")
    for i, path in enumerate(sampling.get("latents") or []):
        if not os.path.isfile(path):
            problems.append((f"sampling.latents[{i}]", f"{path} does not exist; point it at a saved latent file"))
    return problems
