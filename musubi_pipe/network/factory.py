"""Build the trained network from the `network` config group; recognise a file's network type; LoRA+ param groups.

`build_network(targets, net_cfg)` is what the trainer calls: it applies musubi-tuner's include/exclude rule
(`network.targets.select_targets`) to the architecture's LoRA candidates and builds a LoRA, LoHa or LoKr network
(`network.network_module`). `network_kind_of(tensors)` tells which of the three a file holds (for
`network.network_weights`, sampling and tools), `network_from_weights` rebuilds a network from a file alone,
`network_module_name` gives musubi-tuner's `ss_network_module` value, and `param_groups` the optimizer groups
(LoRA+: `lora_up` weights get lr × loraplus_lr_ratio).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.network.lora import KIND_TITLES, LoRANetwork, kinds_in_keys, lora_name
from musubi_pipe.network.lycoris import LoHaNetwork, LoKrNetwork, factorization
from musubi_pipe.network.settings import (
    NETWORK_MODULES,
    network_problems,
    with_defaults,
)
from musubi_pipe.network.targets import covering_pattern, select_targets

log = logging.getLogger("musubi_pipe")

NETWORK_CLASSES: dict[str, type[LoRANetwork]] = {"lora": LoRANetwork, "loha": LoHaNetwork, "lokr": LoKrNetwork}


def build_network(
    targets: Mapping[str, nn.Linear], net_cfg: Mapping[str, Any], *, multiplier: float = 1.0, where: str = "network",
    default_excludes: tuple[str, ...] = (),
) -> LoRANetwork:
    """Select the targets (musubi-tuner's include/exclude rule) and build the network that `net_cfg` describes.

    `targets` are the architecture's LoRA candidates by official module path and `default_excludes` its default
    exclude patterns (Family.lora_targets, Family.lora_default_excludes); `net_cfg` the `network` group (missing
    keys take settings.NETWORK_DEFAULTS); `where` prefixes config keys in error messages.
    """
    cfg = with_defaults(net_cfg)
    _validate(cfg, where)
    selected = select_targets(targets, cfg["include_patterns"] or [], cfg["exclude_patterns"] or [], where=where,
                              default_excludes=default_excludes)
    kind = cfg["network_module"]
    kwargs: dict[str, Any] = {"rank_dropout": cfg["rank_dropout"], "module_dropout": cfg["module_dropout"]}
    if kind == "lokr":
        kwargs["factor"] = int(cfg["lokr_factor"])
    network = NETWORK_CLASSES[kind](
        selected, int(cfg["network_dim"]), cfg["network_alpha"], multiplier, dropout=cfg["network_dropout"], **kwargs
    )
    if cfg["loraplus_lr_ratio"] is not None and kind != "lora":
        _warn_loraplus(kind)
    return network


def load_network_weights(
    network: LoRANetwork, tensors: Mapping[str, torch.Tensor], candidates: Iterable[str], source: str,
    where: str = "network",
) -> None:
    """Load a LoRA file (musubi-form tensors) into the network the config built (`network.network_weights`).

    Every key is used on both sides: the file must hold exactly the network's modules. When they differ, the
    UserError names the modules and the include/exclude pattern that makes the network match the file;
    `candidates` are the model's LoRA candidates (official names).
    """
    candidates = list(candidates)
    by_name = {lora_name(o): o for o in candidates}
    in_file = {key.split(".", 1)[0] for key in tensors}
    own = set(network.loras)
    same_kind = kinds_in_keys(tensors) in (set(), {network.kind})
    if in_file != own and same_kind:
        raise UserError(_module_mismatch(source, where, in_file, own, by_name))
    if same_kind and tensors and network.kind != "lokr" and _dim_of(network.kind, tensors) != network.network_dim:
        raise UserError(f"{source} has rank {_dim_of(network.kind, tensors)}, the network {network.network_dim}: set "
                        f"{where}.network_dim={_dim_of(network.kind, tensors)}")
    network.load_lora_state_dict(tensors, source=source)


def _module_mismatch(source: str, where: str, in_file: set[str], own: set[str], by_name: dict[str, str]) -> str:
    """Which modules a file and the configured network disagree on, and the pattern that fixes each side."""
    lines = [f"{source} holds other modules than the network {where}.* configures:"]
    foreign = sorted(in_file - set(by_name))
    if foreign:
        lines.append(f"  {len(foreign)} module(s) of the file are no LoRA target of this model, e.g. {foreign[0]!r}: "
                     "was it trained for another model or task? (model.task)")
    extra = sorted(by_name[n] for n in in_file - own if n in by_name)
    if extra:
        trained = [by_name[n] for n in own]
        pattern = covering_pattern(extra, trained)
        lines.append(f"  {len(extra)} module(s) of the file are left out by the network's exclude patterns (e.g. "
                     f"{extra[0]}); train them too with {where}.include_patterns: [{pattern!r}]")
    missing = sorted(by_name[n] for n in own - in_file)
    if missing:
        kept = [by_name[n] for n in own & in_file]
        pattern = covering_pattern(missing, kept)
        lines.append(f"  {len(missing)} module(s) of the network are not in the file (e.g. {missing[0]}); leave them "
                     f"out with {where}.exclude_patterns: [{pattern!r}]")
    return "\n".join(lines)


def _validate(cfg: Mapping[str, Any], where: str) -> None:
    """Raise one ConfigError listing every bad value among the keys build_network reads."""
    problems = network_problems(cfg, where)
    if problems:
        raise ConfigError(problems)


def _warn_loraplus(kind: str) -> None:
    log.warning(
        "network.loraplus_lr_ratio has no effect on %s (LoRA+ scales the lora_up weights of a LoRA); "
        "all parameters use the base learning rate", KIND_TITLES[kind],
    )


def param_groups(
    networks: LoRANetwork | Iterable[LoRANetwork], lr: float, loraplus_lr_ratio: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for one network or several (tied ones): each trainable parameter exactly once.

    Without a ratio: one group "default". With a ratio (LoRA): "lora_down" (everything but lora_up, lr) and
    "lora_up" (lr × ratio); for LoHa/LoKr a warning and the single "default" group. Groups carry a "name" key.
    """
    networks = [networks] if isinstance(networks, LoRANetwork) else list(networks)
    named, seen = [], set()
    for network in networks:
        for name, param in network.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                named.append((name, param))
    if loraplus_lr_ratio is None or not named:
        return [{"name": "default", "params": [p for _, p in named], "lr": lr}]
    non_lora = sorted({n.kind for n in networks if n.kind != "lora"})
    if non_lora:
        _warn_loraplus(non_lora[0])
        return [{"name": "default", "params": [p for _, p in named], "lr": lr}]
    down = [p for n, p in named if "lora_up" not in n]
    up = [p for n, p in named if "lora_up" in n]
    groups = [
        {"name": "lora_down", "params": down, "lr": lr},
        {"name": "lora_up", "params": up, "lr": lr * loraplus_lr_ratio},
    ]
    return [g for g in groups if g["params"]]


def network_kind_of(tensors: Mapping[str, torch.Tensor], source: str = "network weights") -> str:
    """"lora", "loha" or "lokr": the network type whose keys `tensors` (a LoRA file's contents) hold.

    Raises UserError for a file with no recognisable adapter keys or a mix of types.
    """
    kinds = kinds_in_keys(tensors)
    if len(kinds) == 1:
        return kinds.pop()
    if kinds:
        mixed = " and ".join(KIND_TITLES[k] for k in sorted(kinds))
        raise UserError(f"{source}: mixes {mixed} keys; one file holds one network type")
    sample = ", ".join(list(tensors)[:3]) or "<no tensors>"
    raise UserError(
        f"{source}: no LoRA/LoHa/LoKr keys found (keys like {sample}); expected musubi/sd-scripts keys such as "
        "lora_unet_<module>.lora_down.weight, .hada_w1_a or .lokr_w1"
    )


def network_module_name(kind: str, arch: str) -> str:
    """musubi-tuner's `ss_network_module` for a network type on an architecture ("networks.lora_wan", "networks.loha")."""
    if kind not in NETWORK_MODULES:
        raise ValueError(f"unknown network type {kind!r}; expected one of {NETWORK_MODULES}")
    if kind != "lora":
        return f"networks.{kind}"
    from musubi_pipe.models import get_family

    return get_family(arch).musubi_network_module


def network_from_weights(
    targets: Mapping[str, nn.Linear],
    tensors: Mapping[str, torch.Tensor],
    multiplier: float = 1.0,
    source: str = "network weights",
    prefix: str = "lora_unet",
) -> LoRANetwork:
    """Build the network a file describes (type, rank, LoKr factor, module set, from the tensors alone) and load it.

    Only the targets the file names are adapted (it may have been trained with include/exclude patterns); a file
    module that is not among `targets` is an error.
    """
    kind = network_kind_of(tensors, source)
    stems = {key.split(".", 1)[0] for key in tensors}
    by_name = {lora_name(o, prefix): o for o in targets}
    unknown = sorted(stems - set(by_name))
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} module(s) match no LoRA target of the model, e.g. {unknown[0]!r} "
            f"(targets look like {next(iter(by_name), '<none>')!r}); was it trained for another model or variant?"
        )
    selected = {o: m for o, m in targets.items() if lora_name(o, prefix) in stems}
    kwargs: dict[str, Any] = {}
    if kind == "lokr":
        kwargs["factor"] = _lokr_factor_of(selected, tensors, prefix, source)
    dim = _dim_of(kind, tensors)
    network = NETWORK_CLASSES[kind](selected, dim, None, multiplier, prefix, **kwargs)
    network.load_lora_state_dict(tensors, source=source)
    return network


def _dim_of(kind: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """The rank of a file's network (for a LoKr whose W2 are all full: its alpha, which LoKr sets to the rank)."""
    for key, value in tensors.items():
        if kind == "lora" and key.endswith(".lora_down.weight"):
            return int(value.shape[0])
        if kind == "loha" and key.endswith(".hada_w1_b"):
            return int(value.shape[0])
        if kind == "lokr" and key.endswith(".lokr_w2_b"):
            return int(value.shape[0])
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    return max(1, int(round(max(alphas)))) if alphas else 1


def _lokr_factor_of(targets: Mapping[str, nn.Linear], tensors: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    """The `lokr_factor` under which every lokr_w1 of the file has the shape LoKr gives it."""
    keys = {o: f"{lora_name(o, prefix)}.lokr_w1" for o in targets}
    shapes = {o: tuple(tensors[key].shape) for o, key in keys.items() if key in tensors}
    candidates = [-1] + sorted({d for shape in shapes.values() for d in shape})

    def fits(factor: int) -> bool:
        return all(
            (factorization(targets[o].out_features, factor)[0], factorization(targets[o].in_features, factor)[0]) == shape
            for o, shape in shapes.items()
        )

    for factor in candidates:
        if fits(factor):
            return factor
    raise UserError(f"{source}: the lokr_w1 shapes match no LoKr factorization of the model's layers (another model?)")
