"""Optimizers from the `optimizer` config group, built through an allow-list.

Used by the training loop (`build_optimizer`), the config validator (`check_optimizer_config`,
which checks without building anything) and the LoRA metadata writer (`describe_optimizer`, the
`ss_optimizer` string musubi-tuner stores).

Config keys (the `optimizer` group; other keys of the group, e.g. the scheduler's, are ignored here):

- `optimizer_type` (default "adamw"): one of OPTIMIZER_TYPES, case-insensitive, so musubi-tuner's
  spellings `AdamW`, `AdamW8bit`, `AdaFactor`, `Prodigy`, `SGD` work, as do the class paths musubi
  users write (`bitsandbytes.optim.AdamW8bit`, `prodigyopt.Prodigy`, ...). Only these names are
  accepted: nothing named in a config is ever imported.
- `lr` (required): the base learning rate. Param groups that carry their own "lr" (LoRA+) keep it.
- `weight_decay` (default 0.01): passed to every optimizer; `optimizer_args.weight_decay` wins.
- `optimizer_args` (default {}): extra keyword arguments for the optimizer class, as a mapping
  (`{betas: [0.9, 0.99]}`; lists become tuples, strings such as "1e-8" or "(0.9, 0.99)" are read as
  Python literals when they are one) or as musubi-tuner's list of "key=value" strings
  (`["betas=(0.9,0.99)", "weight_decay=0.05"]`, values read with ast.literal_eval). Keys are checked
  against the class's __init__ signature; `lr` and `params` are not allowed there (use `optimizer.lr`).

The types:

- adamw: torch.optim.AdamW.
- adamw8bit: bitsandbytes.optim.AdamW8bit (8-bit Adam states for tensors of >= 4096 elements). Its
  import and one probe step on the parameters' device are checked when building, so a bitsandbytes
  that cannot run there is reported up front (bitsandbytes >= 0.48 also runs on CPU tensors).
- adafactor: transformers.optimization.Adafactor. Unlike transformers (relative_step=True, which
  ignores lr), the defaults here are `relative_step=False, scale_parameter=False, warmup_init=False`
  so `optimizer.lr` is the learning rate actually used, as with the other optimizers. Setting
  `optimizer_args.relative_step=True` gives transformers' time-dependent step size: lr is then passed
  to Adafactor as None (transformers refuses both) and the scheduler becomes transformers'
  AdafactorSchedule, which only reports the step size (musubi's `adafactor:<lr>` scheduler).
  `warmup_init=True` needs relative_step and turns it on when relative_step is not given.
- prodigy: prodigyopt.Prodigy, an optional extra (`pip install "musubi_pipe[prodigy]"` or
  `pip install prodigyopt`). Prodigy estimates the step size itself: use lr=1.0 (its default);
  the lr then scales the estimate, and LoRA+ group lrs scale it per group.
- sgd: torch.optim.SGD; momentum, nesterov and dampening through optimizer_args.
"""

from __future__ import annotations

import ast
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from musubi_pipe.errors import ConfigError, UserError

log = logging.getLogger("musubi_pipe")

OPTIMIZER_TYPES = ("adamw", "adamw8bit", "adafactor", "prodigy", "sgd")

# musubi-tuner configs often name the class path; these are names, never imported from the config
_ALIASES = {
    "torch.optim.adamw": "adamw",
    "bitsandbytes.optim.adamw8bit": "adamw8bit",
    "bnb.optim.adamw8bit": "adamw8bit",
    "transformers.optimization.adafactor": "adafactor",
    "prodigyopt.prodigy": "prodigy",
    "torch.optim.sgd": "sgd",
}

_RESERVED_ARGS = ("params", "lr")
_DEFAULT_WEIGHT_DECAY = 0.01
_ATTR_ARGS = "_musubi_pipe_optimizer_args"  # the kwargs build_optimizer used, for describe_optimizer


# -- the allow-list: type -> loader returning the class (UserError when it cannot be loaded) ---------
def _load_adamw() -> type:
    import torch

    return torch.optim.AdamW


def _load_sgd() -> type:
    import torch

    return torch.optim.SGD


def _load_adafactor() -> type:
    from transformers.optimization import Adafactor

    return Adafactor


def _load_adamw8bit() -> type:
    try:
        from bitsandbytes.optim import AdamW8bit
    except Exception as exc:  # ImportError, or a broken CUDA setup raising at import
        raise UserError(
            f"optimizer.optimizer_type=adamw8bit needs bitsandbytes, which could not be loaded ({exc}). "
            "Install a build matching your PyTorch/CUDA with `pip install -U bitsandbytes`, "
            "or set optimizer.optimizer_type=adamw."
        ) from exc
    return AdamW8bit


def _load_prodigy() -> type:
    try:
        from prodigyopt import Prodigy
    except ImportError as exc:
        raise UserError(
            "optimizer.optimizer_type=prodigy needs the prodigyopt package, which is not installed. "
            'Install it with `pip install "musubi_pipe[prodigy]"` (or `pip install prodigyopt`), '
            "or set optimizer.optimizer_type=adamw."
        ) from exc
    return Prodigy


_LOADERS: dict[str, Callable[[], type]] = {
    "adamw": _load_adamw,
    "adamw8bit": _load_adamw8bit,
    "adafactor": _load_adafactor,
    "prodigy": _load_prodigy,
    "sgd": _load_sgd,
}

# keyword arguments set unless optimizer_args sets them
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "adafactor": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
}


# -- reading the config --------------------------------------------------------------------------
class OptimizerConfigError(UserError):
    """One bad optimizer key: `key` names it, `message` says what is wrong and how to fix it."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def normalize_optimizer_type(value: Any) -> str:
    """Return the allow-listed name for `value` ("AdamW8bit" -> "adamw8bit"); UserError if unknown."""
    name = str(value if value is not None else "adamw").strip().lower()
    name = _ALIASES.get(name, name)
    if name not in _LOADERS:
        raise OptimizerConfigError("optimizer.optimizer_type", f"unknown optimizer {value!r}; choose one of {', '.join(OPTIMIZER_TYPES)}")
    return name


def _literal(text: str) -> Any:
    """A Python literal read from `text`, or the text itself when it is not one."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text


def _plain(value: Any) -> Any:
    """Config containers as plain Python: mappings -> dict, lists -> tuples, literal strings read."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return _literal(value)
    if isinstance(value, Sequence):
        return tuple(_plain(v) for v in value)
    return value


def _parse_pair(text: str) -> tuple[str, Any]:
    """"key=value" -> (key, literal value), as musubi-tuner reads --optimizer_args."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise OptimizerConfigError("optimizer.optimizer_args", f"{text!r} is not a \"key=value\" string; write e.g. \"betas=(0.9,0.99)\"")
    try:
        return key, ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError) as exc:
        raise OptimizerConfigError(
            f"optimizer.optimizer_args.{key}",
            f"cannot read the value of {text!r} as a Python literal ({exc.__class__.__name__}); "
            "quote strings (key='text') and write tuples as (a,b)",
        ) from exc


def parse_optimizer_args(value: Any) -> dict[str, Any]:
    """optimizer_args as a dict, from a mapping, a list of "key=value" strings, one such string or None."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        value = [value] if value.strip() else []
    if not isinstance(value, Sequence):
        raise OptimizerConfigError("optimizer.optimizer_args", f"expected a mapping or a list of \"key=value\" strings, got {type(value).__name__}")
    args: dict[str, Any] = {}
    for item in value:
        if not isinstance(item, str):
            raise OptimizerConfigError("optimizer.optimizer_args", f"list items must be \"key=value\" strings, got {item!r}")
        key, parsed = _parse_pair(item)
        if key in args:
            raise OptimizerConfigError(f"optimizer.optimizer_args.{key}", "given twice; keep one")
        args[key] = parsed
    return args


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(opt_cfg: Mapping) -> list[tuple[str, str]]:
    problems = []
    lr = opt_cfg.get("lr")
    if lr is None:
        problems.append(("optimizer.lr", "required: set the learning rate, e.g. optimizer.lr=2e-4 (1.0 for prodigy)"))
    elif not _is_number(lr) or lr <= 0:
        problems.append(("optimizer.lr", f"must be a number > 0, got {lr!r}"))
    wd = opt_cfg.get("weight_decay", _DEFAULT_WEIGHT_DECAY)
    if not _is_number(wd) or wd < 0:
        problems.append(("optimizer.weight_decay", f"must be a number >= 0, got {wd!r}"))
    return problems


def _accepted_args(cls: type) -> set[str] | None:
    """Keyword arguments cls.__init__ takes (None when it takes **kwargs, so anything goes)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds} - {"self", "params"}


def _check_arg_names(name: str, cls: type, args: Mapping) -> list[tuple[str, str]]:
    accepted = _accepted_args(cls)
    problems = []
    for key in args:
        if key in _RESERVED_ARGS:
            problems.append((f"optimizer.optimizer_args.{key}", "set by the pipeline; use optimizer.lr and the network's param groups"))
        elif accepted is not None and key not in accepted:
            valid = ", ".join(sorted(accepted - set(_RESERVED_ARGS)))
            problems.append((f"optimizer.optimizer_args.{key}", f"{name} ({cls.__module__}.{cls.__name__}) takes no such argument; valid: {valid}"))
    return problems


def _check_adafactor(args: Mapping) -> list[tuple[str, str]]:
    if args.get("warmup_init") and args.get("relative_step") is False:
        return [("optimizer.optimizer_args.warmup_init", "warmup_init=True needs relative_step=True (transformers' Adafactor); drop one of them")]
    return []


def check_optimizer_config(opt_cfg: Mapping) -> list[tuple[str, str]]:
    """Every problem of the optimizer keys as (key, message) pairs, without building an optimizer.

    Importing torch is left to the signature check of optimizer_args (only when there are args), so
    a config with a bad type or lr is reported without loading anything heavy.
    """
    problems: list[tuple[str, str]] = []
    try:
        name = normalize_optimizer_type(opt_cfg.get("optimizer_type", "adamw"))
    except OptimizerConfigError as exc:
        return [(exc.key, exc.message)] + _check_numbers(opt_cfg)
    problems += _check_numbers(opt_cfg)
    try:
        args = parse_optimizer_args(opt_cfg.get("optimizer_args"))
    except OptimizerConfigError as exc:
        return problems + [(exc.key, exc.message)]
    if name in ("adamw8bit", "prodigy") or args:
        try:
            cls = _LOADERS[name]()
        except UserError as exc:  # the package is missing or broken
            return problems + [("optimizer.optimizer_type", str(exc))]
        problems += _check_arg_names(name, cls, args)
    if name == "adafactor":
        problems += _check_adafactor(args)
    return problems


# -- building ------------------------------------------------------------------------------------
def _optimizer_kwargs(name: str, opt_cfg: Mapping, args: Mapping) -> tuple[Any, dict[str, Any]]:
    """(lr, keyword arguments) for the optimizer class: weight_decay, type defaults, then optimizer_args."""
    kwargs = {"weight_decay": opt_cfg.get("weight_decay", _DEFAULT_WEIGHT_DECAY), **_TYPE_DEFAULTS.get(name, {}), **args}
    lr = opt_cfg["lr"]
    if name == "adafactor":
        if kwargs.get("warmup_init") and "relative_step" not in args:
            kwargs["relative_step"] = True  # musubi-tuner: warmup_init forces relative_step
        if kwargs.get("relative_step"):
            lr = None  # transformers: a manual lr and relative_step=True cannot be combined
    return lr, kwargs


def _as_groups(param_groups) -> list[dict]:
    """Copies of the param group dicts; a bare iterable of tensors becomes one group."""
    groups = list(param_groups)
    if groups and not isinstance(groups[0], Mapping):
        return [{"params": groups}]
    return [dict(g) for g in groups]


def _first_device(groups: list[dict]):
    for group in groups:
        for p in group["params"]:
            return p.device
    return None


@lru_cache(maxsize=None)
def _bnb_probe_error(device: str) -> str | None:
    """None when bitsandbytes' AdamW8bit can step on `device` (8-bit states), else the error text."""
    import torch
    from bitsandbytes.optim import AdamW8bit

    try:
        p = torch.nn.Parameter(torch.zeros(4096, device=device))  # >= min_8bit_size: the 8-bit path
        p.grad = torch.ones_like(p)
        AdamW8bit([p], lr=1e-3).step()
    except Exception as exc:  # bitsandbytes raises assorted errors when no kernel fits
        return f"{exc.__class__.__name__}: {exc}"
    return None


def _check_bnb_device(groups: list[dict]) -> None:
    device = _first_device(groups)
    if device is None or device.type == "meta":
        return
    error = _bnb_probe_error(str(device))
    if error:
        raise UserError(
            f"optimizer.optimizer_type=adamw8bit: this bitsandbytes cannot run 8-bit AdamW on {device} ({error}). "
            "Train on a CUDA GPU with a bitsandbytes build matching your PyTorch/CUDA (`pip install -U bitsandbytes`), "
            "or set optimizer.optimizer_type=adamw."
        )


def _warn_ignored_group_lrs(name: str, lr: Any, groups: list[dict]) -> None:
    if name == "adafactor" and lr is None and any("lr" in g for g in groups):
        log.warning("optimizer: adafactor with relative_step=True ignores the param groups' own lr (LoRA+)")


def build_optimizer(param_groups: list[dict], opt_cfg: Mapping):
    """The optimizer `opt_cfg` names, over `param_groups` (each may carry its own "lr", e.g. LoRA+).

    Raises ConfigError (a UserError) listing every config problem, or UserError when the optimizer's
    package is missing or cannot run on the parameters' device. For prodigy use lr=1.0.
    """
    problems = check_optimizer_config(opt_cfg)
    if problems:
        raise ConfigError(problems)
    name = normalize_optimizer_type(opt_cfg.get("optimizer_type", "adamw"))
    cls = _LOADERS[name]()
    groups = _as_groups(param_groups)
    if name == "adamw8bit":
        _check_bnb_device(groups)
    lr, kwargs = _optimizer_kwargs(name, opt_cfg, parse_optimizer_args(opt_cfg.get("optimizer_args")))
    _warn_ignored_group_lrs(name, lr, groups)
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (ValueError, TypeError) as exc:  # e.g. betas out of range
        raise UserError(f"optimizer.optimizer_args: {cls.__name__} refused {kwargs}: {exc}") from exc
    setattr(optimizer, _ATTR_ARGS, dict(kwargs))
    return optimizer


def _defaults_that_differ(optimizer) -> dict[str, Any]:
    """For optimizers not built here: the defaults that differ from the class's signature."""
    signature = inspect.signature(type(optimizer).__init__).parameters
    return {
        k: v for k, v in optimizer.defaults.items()
        if k != "lr" and k in signature and signature[k].default is not inspect.Parameter.empty and signature[k].default != v
    }


def describe_optimizer(optimizer) -> str:
    """musubi-tuner's `ss_optimizer` string: "module.Class(key=value,...)", lr left out.

    e.g. "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))".
    """
    cls = type(optimizer)
    args = getattr(optimizer, _ATTR_ARGS, None)
    if args is None:
        args = _defaults_that_differ(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    text = ",".join(f"{k}={v}" for k, v in args.items())
    return f"{name}({text})" if text else name
