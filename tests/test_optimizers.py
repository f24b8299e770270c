"""Optimizers (training/optimizers.py) and lr schedules (training/schedule.py): fast CPU unit tests."""

import io
import math

import pytest
import torch

from musubi_pipe.errors import UserError
from musubi_pipe.training.optimizers import (
    OPTIMIZER_TYPES,
    build_optimizer,
    check_optimizer_config,
    describe_optimizer,
    normalize_optimizer_type,
    parse_optimizer_args,
)
from musubi_pipe.training.schedule import SCHEDULERS, build_scheduler, check_scheduler_config, resolve_warmup

LR = 1e-3


def _param(seed: int = 0) -> torch.nn.Parameter:
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: bitsandbytes' 8-bit path


def _step(optimizer, param) -> None:
    optimizer.zero_grad()
    (param ** 2).sum().backward()
    optimizer.step()


def _bnb_cpu_error():
    """None when bitsandbytes' AdamW8bit can step on CPU tensors here, else why not."""
    try:
        from musubi_pipe.training.optimizers import _bnb_probe_error
        return _bnb_probe_error("cpu")
    except Exception as exc:  # bitsandbytes not importable
        return str(exc)


# -- optimizers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer_type", ["AdamW", "adamw", "AdaFactor", "SGD", "Prodigy"])
def test_each_optimizer_steps(optimizer_type):
    if optimizer_type == "Prodigy":
        pytest.importorskip("prodigyopt")
    p = _param()
    before = p.detach().clone()
    lr = 1.0 if optimizer_type == "Prodigy" else LR
    optimizer = build_optimizer([{"params": [p]}], {"optimizer_type": optimizer_type, "lr": lr})
    _step(optimizer, p)
    assert not torch.equal(p.detach(), before)
    assert optimizer.param_groups[0]["lr"] == lr


def test_adamw8bit_on_cpu_steps_with_8bit_state_or_says_what_to_do():
    p = _param()
    cfg = {"optimizer_type": "AdamW8bit", "lr": LR}
    if _bnb_cpu_error():
        with pytest.raises(UserError, match="optimizer.optimizer_type"):
            build_optimizer([{"params": [p]}], cfg)
        return
    before = p.detach().clone()
    optimizer = build_optimizer([{"params": [p]}], cfg)
    _step(optimizer, p)
    assert not torch.equal(p.detach(), before)
    assert optimizer.state[p]["state1"].dtype == torch.uint8  # really 8-bit
    # its state survives the checkpoint format (torch.load weights_only=True)
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    restored = build_optimizer([{"params": [q]}], cfg)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    _step(optimizer, p)
    _step(restored, q)
    assert torch.equal(p.detach(), q.detach())


def test_adamw8bit_unusable_says_what_to_do(monkeypatch):
    import sys

    from musubi_pipe.training import optimizers

    monkeypatch.setattr(optimizers, "_bnb_probe_error", lambda device: "RuntimeError: no kernel for this device")
    with pytest.raises(UserError, match="optimizer.optimizer_type=adamw") as err:
        build_optimizer([{"params": [_param()]}], {"optimizer_type": "adamw8bit", "lr": LR})
    assert "no kernel" in str(err.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install"):
        build_optimizer([{"params": [_param()]}], {"optimizer_type": "adamw8bit", "lr": LR})


def test_prodigy_missing_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"musubi_pipe\[prodigy\]"):
        build_optimizer([{"params": [_param()]}], {"optimizer_type": "prodigy", "lr": 1.0})
    [(key, message)] = check_optimizer_config({"optimizer_type": "prodigy", "lr": 1.0})
    assert key == "optimizer.optimizer_type" and "pip install" in message


def test_type_names_are_case_insensitive_and_accept_class_paths():
    assert normalize_optimizer_type("AdamW8bit") == "adamw8bit"
    assert normalize_optimizer_type("AdaFactor") == "adafactor"
    assert normalize_optimizer_type("prodigyopt.Prodigy") == "prodigy"
    assert normalize_optimizer_type("bitsandbytes.optim.AdamW8bit") == "adamw8bit"
    assert set(OPTIMIZER_TYPES) == {"adamw", "adamw8bit", "adafactor", "prodigy", "sgd"}


def test_args_dict_and_musubi_strings_give_the_same_optimizer():
    as_dict = {"betas": [0.9, 0.99], "weight_decay": 0.05, "eps": "1e-6"}
    as_strings = ["betas=(0.9,0.99)", "weight_decay=0.05", "eps=1e-6"]
    assert parse_optimizer_args(as_dict) == parse_optimizer_args(as_strings)
    a = build_optimizer([{"params": [_param()]}], {"optimizer_type": "adamw", "lr": LR, "optimizer_args": as_dict})
    b = build_optimizer([{"params": [_param()]}], {"optimizer_type": "adamw", "lr": LR, "optimizer_args": as_strings})
    assert a.defaults == b.defaults
    assert a.defaults["betas"] == (0.9, 0.99) and a.defaults["weight_decay"] == 0.05 and a.defaults["eps"] == 1e-6


def test_sgd_momentum_through_args():
    sgd = build_optimizer([_param()], {"optimizer_type": "sgd", "lr": LR, "optimizer_args": ["momentum=0.9", "nesterov=True"]})
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True


@pytest.mark.parametrize("cfg, key", [
    ({"optimizer_type": "lion", "lr": LR}, "optimizer.optimizer_type"),
    ({"optimizer_type": "torch.optim.Rprop", "lr": LR}, "optimizer.optimizer_type"),
    ({"optimizer_type": "adamw", "lr": LR, "optimizer_args": {"bogus": 1}}, "optimizer.optimizer_args.bogus"),
    ({"optimizer_type": "sgd", "lr": LR, "optimizer_args": ["betas=(0.9,0.99)"]}, "optimizer.optimizer_args.betas"),
    ({"optimizer_type": "adamw", "lr": LR, "optimizer_args": ["betas=(0.9,"]}, "optimizer.optimizer_args.betas"),
    ({"optimizer_type": "adamw", "lr": LR, "optimizer_args": ["no equals sign"]}, "optimizer.optimizer_args"),
    ({"optimizer_type": "adamw", "lr": LR, "optimizer_args": ["lr=1"]}, "optimizer.optimizer_args.lr"),
    ({"optimizer_type": "adamw", "lr": 0}, "optimizer.lr"),
    ({"optimizer_type": "adamw"}, "optimizer.lr"),
    ({"optimizer_type": "adamw", "lr": LR, "weight_decay": -1}, "optimizer.weight_decay"),
])
def test_bad_optimizer_config_names_the_key(cfg, key):
    keys = [k for k, _ in check_optimizer_config(cfg)]
    assert key in keys
    with pytest.raises(UserError) as err:
        build_optimizer([{"params": [_param()]}], cfg)
    assert key in str(err.value)


def test_unknown_type_and_arg_list_the_choices():
    [(_, message)] = check_optimizer_config({"optimizer_type": "lion", "lr": LR})
    assert all(name in message for name in OPTIMIZER_TYPES)
    [(_, message)] = check_optimizer_config({"optimizer_type": "adamw", "lr": LR, "optimizer_args": {"bogus": 1}})
    assert "amsgrad" in message and "betas" in message


def test_good_config_has_no_problems():
    assert check_optimizer_config({"optimizer_type": "AdamW", "lr": LR, "optimizer_args": ["betas=(0.9,0.99)"]}) == []


def test_param_group_lr_is_kept_lora_plus():
    a, b = _param(0), _param(1)
    groups = [{"params": [a]}, {"params": [b], "lr": 16 * LR}]
    for optimizer_type in ("adamw", "adafactor", "sgd"):
        optimizer = build_optimizer(groups, {"optimizer_type": optimizer_type, "lr": LR})
        assert [g["lr"] for g in optimizer.param_groups] == [LR, 16 * LR]
    assert "lr" not in groups[0]  # the caller's dicts are not changed
    scheduler = build_scheduler(optimizer, {"lr_scheduler": "linear", "lr_warmup_steps": 10}, 100)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([LR / 2, 8 * LR])


def test_adafactor_uses_the_configured_lr():
    optimizer = build_optimizer([{"params": [_param()]}], {"optimizer_type": "adafactor", "lr": LR})
    assert optimizer.param_groups[0]["lr"] == LR
    assert optimizer.defaults["relative_step"] is False
    assert optimizer.defaults["scale_parameter"] is False and optimizer.defaults["warmup_init"] is False


def test_adafactor_relative_step_gets_its_own_schedule():
    from transformers.optimization import AdafactorSchedule

    p = _param()
    cfg = {"optimizer_type": "adafactor", "lr": LR, "optimizer_args": ["relative_step=True"]}
    optimizer = build_optimizer([{"params": [p]}], cfg)
    assert optimizer.defaults["lr"] is None and optimizer.defaults["relative_step"] is True
    scheduler = build_scheduler(optimizer, cfg, 100)
    assert isinstance(scheduler, AdafactorSchedule)
    before = p.detach().clone()
    _step(optimizer, p)
    scheduler.step()
    assert not torch.equal(p.detach(), before)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2)  # min(1e-2, 1/sqrt(step 1))


def test_adafactor_warmup_init_needs_relative_step():
    cfg = {"optimizer_type": "adafactor", "lr": LR, "optimizer_args": {"warmup_init": True, "relative_step": False}}
    assert [k for k, _ in check_optimizer_config(cfg)] == ["optimizer.optimizer_args.warmup_init"]
    on = build_optimizer([_param()], {"optimizer_type": "adafactor", "lr": LR, "optimizer_args": {"warmup_init": True}})
    assert on.defaults["relative_step"] is True  # musubi: warmup_init turns relative_step on


def test_describe_optimizer_like_musubi_metadata():
    adamw = build_optimizer([_param()], {"optimizer_type": "adamw", "lr": LR, "optimizer_args": ["betas=(0.9, 0.999)"]})
    assert describe_optimizer(adamw) == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))"
    ada = build_optimizer([_param()], {"optimizer_type": "adafactor", "lr": LR, "weight_decay": 0.0})
    assert describe_optimizer(ada) == (
        "transformers.optimization.Adafactor(weight_decay=0.0,relative_step=False,scale_parameter=False,warmup_init=False)"
    )
    assert describe_optimizer(torch.optim.SGD([_param()], lr=LR, momentum=0.9)) == "torch.optim.sgd.SGD(momentum=0.9)"


# -- schedules -----------------------------------------------------------------------------------
def _lrs(cfg: dict, max_steps: int = 100) -> list[float]:
    """lr after 0, 1, ..., max_steps scheduler steps (index = optimizer steps taken)."""
    optimizer = torch.optim.SGD([_param()], lr=LR)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(max_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


PINNED = {  # (config, {step: lr}) for max_steps=100, warmup 10
    "constant": ({}, {0: LR, 50: LR, 100: LR}),
    "constant_with_warmup": ({}, {0: 0.0, 5: LR / 2, 10: LR, 99: LR}),
    "linear": ({}, {5: LR / 2, 10: LR, 55: LR * (100 - 55) / 90, 100: 0.0}),
    "cosine": ({}, {5: LR / 2, 10: LR, 25: LR * _cosine(15 / 90), 55: LR / 2, 100: 0.0}),
    "cosine_with_restarts": (
        {"lr_scheduler_num_cycles": 2},
        {10: LR, 28: LR * _cosine(0.4), 54: LR * _cosine(88 / 90), 55: LR, 100: 0.0},
    ),
    "polynomial": (
        {"lr_scheduler_power": 2},
        {5: LR / 2, 10: LR, 55: (LR - 1e-7) * 0.25 + 1e-7, 100: 1e-7},
    ),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_values_are_pinned(name):
    extra, pinned = PINNED[name]
    cfg = {"lr_scheduler": name, "lr_warmup_steps": 0 if name == "constant" else 10, **extra}
    lrs = _lrs(cfg)
    for step, lr in pinned.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12, abs=1e-15), (name, step)


def test_warmup_fraction_is_a_share_of_the_steps():
    assert resolve_warmup(0.1, 100) == 10
    assert resolve_warmup("10%", 100) == 10
    assert resolve_warmup(0.29, 100) == 29  # not 28 from 28.999...
    assert resolve_warmup(10, 100) == 10 and resolve_warmup(None, 100) == 0
    assert _lrs({"lr_scheduler": "linear", "lr_warmup_steps": 0.1}) == _lrs({"lr_scheduler": "linear", "lr_warmup_steps": 10})


def test_constant_with_warmup_is_refused():
    with pytest.raises(UserError, match="constant_with_warmup") as err:
        build_scheduler(torch.optim.SGD([_param()], lr=LR), {"lr_scheduler": "constant", "lr_warmup_steps": 10}, 100)
    assert "optimizer.lr_warmup_steps" in str(err.value)


@pytest.mark.parametrize("cfg, key", [
    ({"lr_scheduler": "rex"}, "optimizer.lr_scheduler"),
    ({"lr_scheduler": "linear", "lr_warmup_steps": -1}, "optimizer.lr_warmup_steps"),
    ({"lr_scheduler": "linear", "lr_warmup_steps": 150}, "optimizer.lr_warmup_steps"),
    ({"lr_scheduler": "linear", "lr_warmup_steps": "ten"}, "optimizer.lr_warmup_steps"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 0}, "optimizer.lr_scheduler_num_cycles"),
    ({"lr_scheduler": "polynomial", "lr_scheduler_power": -1}, "optimizer.lr_scheduler_power"),
])
def test_bad_scheduler_config_names_the_key(cfg, key):
    assert key in [k for k, _ in check_scheduler_config(cfg, 100)]
    with pytest.raises(UserError, match=key):
        build_scheduler(torch.optim.SGD([_param()], lr=LR), cfg, 100)


def test_scheduler_names_are_case_insensitive():
    assert check_scheduler_config({"lr_scheduler": "Cosine", "lr_warmup_steps": 0.05}) == []


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_state_round_trip_continues_the_lr_sequence(name):
    cfg = {"lr_scheduler": name, "lr_warmup_steps": 0 if name == "constant" else 10, "lr_scheduler_num_cycles": 2}

    def build():
        optimizer = torch.optim.AdamW([{"params": [_param(0)]}, {"params": [_param(1)], "lr": 4 * LR}], lr=LR)
        return optimizer, build_scheduler(optimizer, cfg, 100)

    def run(optimizer, scheduler, steps):
        out = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(scheduler.get_last_lr())
        return out

    optimizer, scheduler = build()
    run(optimizer, scheduler, 30)
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
    buf.seek(0)
    states = torch.load(buf, weights_only=True)  # as training/checkpoint.py reads them
    rest = run(optimizer, scheduler, 70)

    optimizer2, scheduler2 = build()
    optimizer2.load_state_dict(states["optimizer"])
    scheduler2.load_state_dict(states["scheduler"])
    assert [g["lr"] for g in optimizer2.param_groups] == scheduler2.get_last_lr()
    assert run(optimizer2, scheduler2, 70) == rest
