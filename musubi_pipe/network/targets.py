"""Which of an architecture's LoRA targets a network trains: `network.include_patterns` / `network.exclude_patterns`.

The rule (one rule for LoRA, LoHa and LoKr):

    Candidates are the architecture's LoRA targets, named by their official dotted module paths relative to the DiT
    root (e.g. `blocks.0.self_attn.q`, `blocks.0.ffn.0`). Patterns are Python regular expressions matched against
    the WHOLE path (re.fullmatch). If include_patterns is non-empty, only candidates that fully match at least one
    include pattern are kept (a whitelist); then every candidate that fully matches any exclude pattern is removed.
    An empty include list keeps every candidate. Exclude always wins over include.

Unlike musubi-tuner, where include_patterns only re-admits modules an exclude pattern removed, include narrows the
selection: `include_patterns: ['blocks\\.(0|1)\\..*']` trains blocks 0 and 1 only.

Escape literal dots: `blocks.1.*` also matches `blocks.10.ffn.0` (`.` is any character), `blocks\\.1\\..*` does not.

Errors (ConfigError naming the key, e.g. `network.include_patterns[1]`): a pattern that is not a valid regular
expression; a pattern that matches no candidate at all (probably a typo; the message lists example candidates); a
selection that ends up empty. Used by `network.factory.build_network`.
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
) -> dict[str, M]:
    """Return the candidates (in their order) selected by the module rule; `where` prefixes the config keys in errors."""
    names = list(candidates)
    problems: list[tuple[str, str]] = []
    include = _compile_all(include_patterns, f"{where}.include_patterns", names, problems)
    exclude = _compile_all(exclude_patterns, f"{where}.exclude_patterns", names, problems)
    if problems:
        raise ConfigError(problems)
    selected = [n for n in names if not include or any(p.fullmatch(n) for p in include)]
    selected = [n for n in selected if not any(p.fullmatch(n) for p in exclude)]
    if not selected:
        raise ConfigError([(
            f"{where}.include_patterns / {where}.exclude_patterns",
            f"together they leave none of the {len(names)} candidate modules to train (candidates look like "
            f"{_examples(names)}); widen include_patterns or drop an exclude pattern",
        )])  # fmt: skip
    if len(selected) < len(names):
        log.info("%s: training %d of %d candidate modules (include/exclude patterns)", where, len(selected), len(names))
    return {n: candidates[n] for n in selected}


def _compile_all(
    patterns: Sequence[str] | None, key: str, names: list[str], problems: list[tuple[str, str]]
) -> list[re.Pattern]:
    """Compile `patterns`; record (key[i], message) in `problems` for a non-string, invalid or never-matching one."""
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
        compiled.append(regex)
    return compiled


def _examples(names: list[str], count: int = 3) -> str:
    """Up to `count` candidate names spread over the list (first, middle, last), quoted."""
    if not names:
        return "<none: the model has no LoRA targets>"
    picks = sorted({0, len(names) // 2, len(names) - 1})[:count]
    return ", ".join(repr(names[i]) for i in picks)
