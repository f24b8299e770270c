"""Prompt files in musubi-tuner's syntax: one prompt per line, with inline options.

    a cat walking on grass --w 832 --h 480 --f 81 --d 42 --s 30 --g 5.0 --fs 5 --n blurry, low quality
    # a comment line; blank lines are skipped
    a red car --i /data/start.png --f 33

Options (musubi-tuner's `--from_file` for Wan): `--w` width, `--h` height, `--f` frames, `--d` seed,
`--s` steps, `--g` or `--l` guidance scale, `--gh` the high-noise expert's guidance scale (Wan2.2
A14B; ours), `--fs` flow shift, `--n` negative prompt (the rest up to the next option), `--i` start
image. An unknown option is an error naming the line (musubi-tuner ignores it). Each line becomes a
`sampling.prompts` entry: keys it does not set take the `sampling.*` values and then the task's
defaults, as for prompts written in the config.
"""

from __future__ import annotations

import re
from pathlib import Path

from musubi_pipe.errors import ConfigError

# option -> (prompt key, type)
OPTIONS = {
    "w": ("width", int),
    "h": ("height", int),
    "f": ("frames", int),
    "d": ("seed", int),
    "s": ("steps", int),
    "g": ("guidance_scale", float),
    "l": ("guidance_scale", float),
    "gh": ("guidance_scale_high", float),
    "fs": ("shift", float),
    "n": ("negative_prompt", str),
    "i": ("image", str),
}
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")


def parse_prompt_line(line: str, where: str) -> dict:
    """One prompt dict from a line; raises ConfigError naming `where` for a bad option or value."""
    matches = list(_OPTION.finditer(line))
    prompt = line[: matches[0].start()].strip() if matches else line.strip()
    if not prompt:
        raise ConfigError([(where, "has options but no prompt text before them")])
    entry: dict = {"prompt": prompt}
    problems = []
    for i, match in enumerate(matches):
        name = match.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        value = line[match.end() : end].strip()
        if name not in OPTIONS:
            problems.append((where, f"unknown option --{name}; known: {', '.join('--' + o for o in OPTIONS)}"))
            continue
        key, kind = OPTIONS[name]
        try:
            entry[key] = kind(value) if kind is not str else value
        except ValueError:
            problems.append((where, f"--{name} needs a {kind.__name__}, got {value!r}"))
    if problems:
        raise ConfigError(problems)
    return entry


def read_prompt_file(path: str | Path) -> list[dict]:
    """The prompts of a prompt file; raises ConfigError naming each bad line (file:line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([("sampling.prompt_file", f"{path} does not exist; fix the path")]) from None
    entries, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(parse_prompt_line(line, f"{path}:{number}"))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    if not entries:
        raise ConfigError([("sampling.prompt_file", f"{path} holds no prompts")])
    return entries
