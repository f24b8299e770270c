"""Learning-rate schedules (optimizer.lr_scheduler with optimizer.lr_warmup_steps), from diffusers."""

from __future__ import annotations


def build_scheduler(optimizer, opt_cfg: dict, max_steps: int):
    """Return a LambdaLR for constant | constant_with_warmup | linear | cosine over `max_steps`."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        opt_cfg["lr_scheduler"],
        optimizer=optimizer,
        num_warmup_steps=opt_cfg.get("lr_warmup_steps", 0),
        num_training_steps=max_steps,
    )
