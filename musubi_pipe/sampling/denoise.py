"""The default sampling hook (`Family.sample`): flow-matching Euler over the prompt's steps.

Each step runs the expert its timestep routes to (models.base.route, as in training) with that expert's
guidance (the first, high-noise expert of a two-expert model takes guidance_scale_high), classifier-free
unless the family's `guidance_style` is "none". The shift comes from `Family.sampling_shift`, the step spacing
from `Family.sampling_sigmas` and the latent shape from `Family.latent_shape`, so a family changes those without rewriting the loop.
"""

from __future__ import annotations

# musubi-tuner's default --strength for video-to-video
DEFAULT_STRENGTH = 0.8


def flow_match_sample(family, model_cfg: dict, request):
    """Denoise `request` (models.base.SampleRequest) with the family's shape, shift and guidance style."""
    import torch

    from musubi_pipe.models.base import route
    from musubi_pipe.sampling.flow_match import guided, sample_latents

    p, experts, dits, device = request.prompt, request.experts, request.dits, request.device
    shape = family.latent_shape(model_cfg, p)
    init = request.cond.get("init_latents")
    # predict casts for the model; float32 kept for exact conditioning
    cond = {k: v.to(device) for k, v in request.cond.items() if k != "init_latents"}
    cfg = family.guidance_style == "cfg"

    def velocity(x, timestep):
        expert = route(experts, float(timestep) / 1000)
        dit = dits.get(expert.name)
        scale = p["guidance_scale_high"] if len(experts) > 1 and expert is experts[0] else p["guidance_scale"]
        x, t = x.to(device), timestep.expand(x.shape[0]).to(device, torch.float32)
        embeds = {True: request.positive, False: request.negative}
        return guided(lambda pos: family.predict(dit, x, t, embeds[pos], cond), scale if cfg else 1.0)

    strength = DEFAULT_STRENGTH if p.get("strength") is None else p["strength"]
    return sample_latents(velocity, shape=shape, steps=p["steps"], shift=family.sampling_shift(model_cfg, p, shape),
                          seed=p["seed"], progress=request.progress, init=init, strength=strength,
                          sigmas=family.sampling_sigmas(model_cfg, p))
