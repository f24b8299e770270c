"""Learning-rate schedules from the `optimizer` config group, built with diffusers' get_scheduler.

Used by the training loop (`build_scheduler`, one scheduler.step() per optimizer step, its
state_dict saved in every checkpoint) and by the config validator (`check_scheduler_config`).

Config keys (the `optimizer` group) and defaults, as musubi-tuner reads them:

- `lr_scheduler` (default "constant"): one of SCHEDULERS, case-insensitive. With warmup w and
  max_steps n, every schedule but `constant` rises linearly from 0 to lr over the first w steps; then
  `constant_with_warmup` stays at lr, `linear` falls to 0 at n, `cosine` follows half a cosine to 0
  at n, `cosine_with_restarts` runs `lr_scheduler_num_cycles` cosines that each restart at lr, and
  `polynomial` falls as lr * (1 - progress) ** `lr_scheduler_power` to 1e-7 (diffusers' lr_end).
- `lr_warmup_steps` (default 0): steps as an int, or a fraction of max_steps as a float < 1 (0.1 ->
  10% of the steps, rounded down) or a string "10%". `constant` refuses a warmup, as musubi-tuner does.
- `lr_scheduler_num_cycles` (default 1, cosine_with_restarts only), `lr_scheduler_power` (default
  1.0, polynomial only).

The scheduler is a torch LambdaLR: its state_dict (step count, base and last lrs) round-trips
through torch.load(weights_only=True), and a scheduler rebuilt from the same config that loads it
continues the exact lr sequence. Adafactor with relative_step=True computes its own step size: it
gets transformers' AdafactorSchedule (musubi's `adafactor:<lr>`), which only reports that size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from musubi_pipe.errors import ConfigError, UserError

log = logging.getLogger("musubi_pipe")

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_END_LR = 1e-7  # diffusers' lr_end for `polynomial`; lr must be above it

_WARMUP_KEY = "optimizer.lr_warmup_steps"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_warmup(value: Any) -> tuple[str, float]:
    """("steps", n) or ("fraction", f) from an lr_warmup_steps value; ValueError says what is wrong."""
    if value is None:
        return "steps", 0
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = -1.0
            if 0 <= percent < 100:
                return "fraction", percent / 100
        raise ValueError(f"{value!r} is not a step count, a fraction < 1 or a percentage like \"10%\"")
    if not _is_number(value) or value < 0:
        raise ValueError(f"must be a number >= 0 (steps, or a fraction < 1 of the steps), got {value!r}")
    if isinstance(value, float) and value < 1:
        return "fraction", value
    if value != int(value):
        raise ValueError(f"{value!r} steps is not a whole number; give steps as an int or a fraction < 1")
    return "steps", int(value)


def resolve_warmup(value: Any, max_steps: int) -> int:
    """Warmup steps for `value`: an int is steps, a float < 1 (or "10%") a fraction of max_steps, rounded down."""
    try:
        kind, amount = _parse_warmup(value)
    except ValueError as exc:
        raise UserError(f"{_WARMUP_KEY}: {exc}") from exc
    if kind == "steps":
        return int(amount)
    return math.floor(amount * max_steps + 1e-9)  # 0.29 * 100 is 28.999...: still 29 steps


def _scheduler_name(value: Any) -> str:
    return str(value if value is not None else "constant").strip().lower()


def _unknown_scheduler(value: Any) -> str:
    return f"unknown scheduler {value!r}; choose one of {', '.join(SCHEDULERS)}"


def normalize_scheduler(value: Any) -> str:
    """The lr_scheduler name in lower case; UserError naming optimizer.lr_scheduler when unknown."""
    name = _scheduler_name(value)
    if name not in SCHEDULERS:
        raise UserError(f"optimizer.lr_scheduler: {_unknown_scheduler(value)}")
    return name


def _check_warmup(name: str | None, value: Any, max_steps: int | None) -> list[tuple[str, str]]:
    try:
        kind, amount = _parse_warmup(value)
    except ValueError as exc:
        return [(_WARMUP_KEY, str(exc))]
    if name == "constant" and amount != 0:
        return [(_WARMUP_KEY, f"the constant scheduler takes no warmup (got {value!r}); set "
                              "optimizer.lr_scheduler=constant_with_warmup, or lr_warmup_steps=0")]
    if kind == "steps" and max_steps is not None and amount > max_steps:
        return [(_WARMUP_KEY, f"{int(amount)} warmup steps is more than the {max_steps} training steps; lower it")]
    return []


def _check_cycles_power(opt_cfg: Mapping) -> list[tuple[str, str]]:
    problems = []
    cycles = opt_cfg.get("lr_scheduler_num_cycles", 1)
    if not isinstance(cycles, int) or isinstance(cycles, bool) or cycles < 1:
        problems.append(("optimizer.lr_scheduler_num_cycles", f"must be an int >= 1, got {cycles!r}"))
    power = opt_cfg.get("lr_scheduler_power", 1.0)
    if not _is_number(power) or power <= 0:
        problems.append(("optimizer.lr_scheduler_power", f"must be a number > 0, got {power!r}"))
    return problems


def check_scheduler_config(opt_cfg: Mapping, max_steps: int | None = None) -> list[tuple[str, str]]:
    """Every problem of the scheduler keys as (key, message) pairs; torch-free.

    With `max_steps` the warmup is also checked against the run's length.
    """
    problems: list[tuple[str, str]] = []
    value = opt_cfg.get("lr_scheduler", "constant")
    name: str | None = _scheduler_name(value)
    if name not in SCHEDULERS:
        problems.append(("optimizer.lr_scheduler", _unknown_scheduler(value)))
        name = None
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        problems.append(("training.max_train_steps", f"the run needs at least 1 step, got {max_steps!r}"))
        max_steps = None
    problems += _check_warmup(name, opt_cfg.get("lr_warmup_steps", 0), max_steps)
    problems += _check_cycles_power(opt_cfg)
    lr = opt_cfg.get("lr")
    if name == "polynomial" and _is_number(lr) and lr <= POLYNOMIAL_END_LR:
        problems.append(("optimizer.lr", f"the polynomial scheduler decays to {POLYNOMIAL_END_LR}; lr must be larger, got {lr!r}"))
    return problems


def _relative_step_adafactor(optimizer) -> bool:
    """True for transformers' Adafactor computing its own step size (relative_step=True)."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _adafactor_schedule(optimizer, opt_cfg: Mapping):
    from transformers.optimization import AdafactorSchedule

    if _scheduler_name(opt_cfg.get("lr_scheduler")) != "constant" or opt_cfg.get("lr_warmup_steps", 0):
        log.warning("optimizer: adafactor with relative_step=True sets its own step size; "
                    "lr_scheduler and lr_warmup_steps are ignored")
    return AdafactorSchedule(optimizer, initial_lr=float(opt_cfg["lr"]))


def build_scheduler(optimizer, opt_cfg: Mapping, max_steps: int):
    """A LambdaLR over `max_steps` optimizer steps for `opt_cfg`; ConfigError listing every problem."""
    if _relative_step_adafactor(optimizer):
        return _adafactor_schedule(optimizer, opt_cfg)
    problems = check_scheduler_config(opt_cfg, max_steps)
    if problems:
        raise ConfigError(problems)
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        normalize_scheduler(opt_cfg.get("lr_scheduler", "constant")),
        optimizer=optimizer,
        num_warmup_steps=resolve_warmup(opt_cfg.get("lr_warmup_steps", 0), max_steps),
        num_training_steps=max_steps,
        num_cycles=opt_cfg.get("lr_scheduler_num_cycles", 1),
        power=float(opt_cfg.get("lr_scheduler_power", 1.0)),
    )
