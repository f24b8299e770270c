"""The `network` config keys, their defaults and checks (no torch: used by config validation too).

`network.factory` builds networks from these settings; `network_problems` reports every bad value
before any model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

NETWORK_MODULES = ("lora", "loha", "lokr")
# The `network` config keys build_network reads, with their defaults.
NETWORK_DEFAULTS: dict[str, Any] = {
    "network_module": "lora",
    "network_dim": 4,
    "network_alpha": 1.0,
    "network_dropout": None,
    "rank_dropout": None,
    "module_dropout": None,
    "include_patterns": [],
    "exclude_patterns": [],
    "loraplus_lr_ratio": None,
    "lokr_factor": -1,
}
def with_defaults(net_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `network` values build_network reads, with NETWORK_DEFAULTS for missing or null ones."""
    return {**NETWORK_DEFAULTS, **{k: v for k, v in net_cfg.items() if v is not None or k not in NETWORK_DEFAULTS}}


def check_probability(value: float | None, key: str, *, allow_one: bool = False) -> float | None:
    """Return a dropout probability (None or 0 = off) after checking it lies in [0, 1) ([0, 1] with `allow_one`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a probability (a number), got {value!r}")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0
    if not ok:
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{key} must be a probability in {bound}, got {value} (set it to null to disable it)")
    return value or None


def pattern_problems(patterns, key: str) -> list[tuple[str, str]]:
    """(key[i], message) for every include/exclude pattern that is not a valid regular expression string."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [(key, f"must be a list of regular expressions, got the string {patterns!r} (write [{patterns!r}])")]
    problems = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            problems.append((f"{key}[{i}]", f"must be a regular expression string, got {type(pattern).__name__} "
                             f"{pattern!r}"))
            continue
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append((f"{key}[{i}]", f"{pattern!r} is not a valid regular expression ({e}); fix or quote it"))
    return problems


def network_problems(net_cfg: Mapping[str, Any], where: str = "network") -> list[tuple[str, str]]:
    """Every bad value among the keys build_network reads, as (key, message) pairs; missing keys take defaults.

    Checks what can be checked without the model: types, ranges and that patterns are valid regexes
    (whether they match a module is checked when the network is built).
    """
    cfg = with_defaults(net_cfg)
    problems: list[tuple[str, str]] = []
    if cfg["network_module"] not in NETWORK_MODULES:
        choices = ", ".join(NETWORK_MODULES)
        problems.append((f"{where}.network_module", f"must be one of {choices}, got {cfg['network_module']!r}"))
    dim = cfg["network_dim"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        problems.append((f"{where}.network_dim", f"must be a positive integer (the rank), got {dim!r}"))
    alpha = cfg["network_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        problems.append((
            f"{where}.network_alpha", f"must be a number >= 0 (scale = alpha / dim; 0 means alpha = dim), got {alpha!r}"
        ))  # fmt: skip
    for key, allow_one in (("network_dropout", False), ("rank_dropout", False), ("module_dropout", True)):
        try:
            check_probability(cfg[key], f"{where}.{key}", allow_one=allow_one)
        except (TypeError, ValueError) as e:
            problems.append((f"{where}.{key}", str(e).removeprefix(f"{where}.{key} ")))
    ratio = cfg["loraplus_lr_ratio"]
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
        problems.append((f"{where}.loraplus_lr_ratio", f"must be a positive number (e.g. 4 or 16) or null, got {ratio!r}"))
    factor = cfg["lokr_factor"]
    if isinstance(factor, bool) or not isinstance(factor, int) or factor == 0 or factor < -1:
        problems.append((
            f"{where}.lokr_factor", f"must be -1 (balanced factorization) or a positive integer, got {factor!r}"
        ))  # fmt: skip
    for key in ("include_patterns", "exclude_patterns"):
        problems += pattern_problems(cfg[key], f"{where}.{key}")
    return problems
