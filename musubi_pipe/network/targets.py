"""Which modules a network trains (`network.include_patterns` / `network.exclude_patterns`), and which LoRA modules
a sampling entry keeps (`sampling.loras[i].include_patterns` / `exclude_patterns`).

Candidates are an architecture's LoRA targets (`Family.lora_targets`: every Linear of its transformer blocks, the
modules musubi-tuner's network module wraps), named by their official dotted module paths relative to the DiT root
(`blocks.0.self_attn.q`, `double_blocks.0.img_mod.linear`). Patterns are Python regular expressions matched against
the WHOLE path (re.fullmatch), as in musubi-tuner.

Training, `select_targets` (musubi-tuner's rule, networks/lora.py):

    A candidate is left out iff it fully matches some exclude pattern and no include pattern.
    Exclude patterns are the user's plus the family's defaults (`Family.lora_default_excludes`, always appended,
    e.g. HunyuanVideo's `.*(img_mod|txt_mod|modulation).*`). include_patterns only re-admit excluded candidates.

So `include_patterns: ['.*img_mod.*']` brings HunyuanVideo's image modulation back, and training blocks 0 and 1
only is `exclude_patterns: ['.*']` with `include_patterns: ['blocks\\.(0|1)\\..*']`.

Sampling, `filter_targets` (musubi-tuner's inference filter): include narrows the modules (a whitelist), then
exclude removes from them.

Escape literal dots: `blocks.1.*` also matches `blocks.10.ffn.0` (`.` is any character), `blocks\\.1\\..*` does not.

Errors (ConfigError naming the key, e.g. `network.include_patterns[1]`): a pattern that is not a valid regular
expression; a pattern that matches no candidate (probably a typo; the message lists example candidates); an include
pattern that re-admits nothing because nothing it matches was excluded (include does not narrow in training: the
message gives the exclude pattern that does); a selection that ends up empty.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from musubi_pipe.errors import ConfigError

log = logging.getLogger("musubi_pipe")

M = TypeVar("M")


def select_targets(
    candidates: Mapping[str, M],
    include_patterns: Sequence[str] | None,
    exclude_patterns: Sequence[str] | None,
    where: str = "network",
    default_excludes: Sequence[str] = (),
) -> dict[str, M]:
    """The candidates (in their order) a network trains under musubi-tuner's rule; `where` prefixes config keys.

    `default_excludes` are the family's own exclude patterns (appended to the user's, never an error when they
    match nothing)."""
    names = list(candidates)
    problems: list[tuple[str, str]] = []
    include = _compile_all(include_patterns, f"{where}.include_patterns", names, problems)
    exclude = [p for _, p in _compile_all(exclude_patterns, f"{where}.exclude_patterns", names, problems)]
    defaults = [re.compile(p) for p in default_excludes]
    excluded = {n for n in names if any(p.fullmatch(n) for p in [*exclude, *defaults])}
    for i, pattern in include:
        if not any(pattern.fullmatch(n) for n in excluded):
            problems.append((f"{where}.include_patterns[{i}]", (
                f"{pattern.pattern!r} re-admits nothing: include_patterns only brings back modules an exclude pattern "
                f"left out (musubi-tuner's rule), and none of the modules it matches were excluded. To train only "
                f"these modules, also set {where}.exclude_patterns: ['.*']"
            )))  # fmt: skip
    if problems:
        raise ConfigError(problems)
    selected = [n for n in names if n not in excluded or any(p.fullmatch(n) for _, p in include)]
    if not selected:
        raise ConfigError([(
            f"{where}.include_patterns / {where}.exclude_patterns",
            f"together they leave none of the {len(names)} candidate modules to train (candidates look like "
            f"{_examples(names)}); drop an exclude pattern or re-admit modules with include_patterns",
        )])  # fmt: skip
    by_default = sum(1 for n in names if n not in selected and not any(p.fullmatch(n) for p in exclude))
    if len(selected) < len(names):
        log.info("%s: training %d of %d candidate modules (%d left out by the model's default exclude %s)", where,
                 len(selected), len(names), by_default, " ".join(default_excludes) or "-")
    return {n: candidates[n] for n in selected}


def filter_targets(
    candidates: Mapping[str, M],
    include_patterns: Sequence[str] | None,
    exclude_patterns: Sequence[str] | None,
    where: str,
) -> dict[str, M]:
    """The candidates kept by the inference filter: those matching an include pattern (all without one), less those
    matching an exclude pattern. Used for the modules of a LoRA file applied in sampling."""
    names = list(candidates)
    problems: list[tuple[str, str]] = []
    include = [p for _, p in _compile_all(include_patterns, f"{where}.include_patterns", names, problems)]
    exclude = [p for _, p in _compile_all(exclude_patterns, f"{where}.exclude_patterns", names, problems)]
    if problems:
        raise ConfigError(problems)
    kept = [n for n in names if (not include or any(p.fullmatch(n) for p in include))
            and not any(p.fullmatch(n) for p in exclude)]
    if not kept:
        raise ConfigError([(f"{where}.include_patterns / {where}.exclude_patterns",
                            f"together they keep none of the {len(names)} modules (they look like {_examples(names)})")])
    return {n: candidates[n] for n in kept}


def _compile_all(
    patterns: Sequence[str] | None, key: str, names: list[str], problems: list[tuple[str, str]]
) -> list[tuple[int, re.Pattern]]:
    """(index, compiled) of `patterns`; record (key[i], message) in `problems` for a non-string, invalid or
    never-matching one."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        problems.append((key, f"must be a list of regular expressions, got the string {patterns!r} (write [{patterns!r}])"))
        return []
    compiled = []
    for i, pattern in enumerate(patterns):
        item = f"{key}[{i}]"
        if not isinstance(pattern, str):
            problems.append((item, f"must be a regular expression string, got {type(pattern).__name__} {pattern!r}"))
            continue
        try:
            regex = re.compile(pattern)
        except re.error as e:
            problems.append((item, f"{pattern!r} is not a valid regular expression ({e}); fix or quote it"))
            continue
        if not any(regex.fullmatch(n) for n in names):
            problems.append((item, (
                f"{pattern!r} matches none of the {len(names)} candidate modules (a typo?). Patterns must match the "
                f"whole module path (re.fullmatch), e.g. {_examples(names)}; add '.*' to match a prefix"
            )))  # fmt: skip
            continue
        compiled.append((i, regex))
    return compiled


def _examples(names: list[str], count: int = 3) -> str:
    """Up to `count` candidate names spread over the list (first, middle, last), quoted."""
    if not names:
        return "<none: the model has no LoRA targets>"
    picks = sorted({0, len(names) // 2, len(names) - 1})[:count]
    return ", ".join(repr(names[i]) for i in picks)


def covering_pattern(names: Sequence[str], others: Sequence[str]) -> str:
    """A full-match regex that matches every one of `names` and none of `others`, for error messages.

    Block indices are generalised (`blocks.3.ffn.0` -> `blocks\\.\\d+\\.ffn\\.0`) when that keeps `others` out;
    otherwise the names are listed literally.
    """
    general = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    pattern = general[0] if len(general) == 1 else f"({'|'.join(general)})"
    if not any(re.fullmatch(pattern, o) for o in others):
        return pattern
    literal = sorted(re.escape(n) for n in names)
    return literal[0] if len(literal) == 1 else f"({'|'.join(literal)})"
