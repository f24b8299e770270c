"""Timestep sampling against its formulas (one-sample KS tests against exact CDFs), ranges, loss weights."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from musubi_pipe.training.show_timesteps import SIZE, timestep_histogram, write_timestep_plot
from musubi_pipe.training.timestep_spec import (
    IDEOGRAM4_BOUNDS, METHODS, QINGLONG_MIXTURES, TimestepSpec, check_spec, resolution_shift,
)
from musubi_pipe.training.timesteps import (
    convention_notes, draw_qinglong, loss_weights, mode_density_map, model_timesteps, routing_offset, sample_t,
    sample_t_in, sample_timesteps, weighted_mse,
)

N = 20_000
KS_LIMIT = 0.016  # ~ the 0.1% critical value 1.95 / sqrt(N), plus a little for the 1/1000 grid of sigma
HW = (128, 128)  # latent height, width (1024x1024 px at 8x)


def _spec(**cfg) -> TimestepSpec:
    return TimestepSpec.from_config(cfg)


def _draw(spec, hw=HW, seed=0, n=N, **kw) -> torch.Tensor:
    return sample_timesteps(n, spec, hw, torch.Generator().manual_seed(seed), **kw)


def ks(samples: torch.Tensor, cdf) -> float:
    """One-sample Kolmogorov-Smirnov statistic sup |F_n - F|."""
    x, _ = torch.sort(samples.double())
    f = cdf(x)
    n = len(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


# -- exact CDFs ----------------------------------------------------------------------------------
phi = torch.special.ndtr


def logit_normal_cdf(mean, std):
    """CDF of sigmoid(mean + std z)."""
    return lambda x: phi((torch.logit(x) - mean) / std)


def unshift(x, s):
    return x / (s - (s - 1) * x)


def shift_cdf(s, scale=1.0):
    """CDF of shift_S(sigmoid(scale z))."""
    return lambda x: logit_normal_cdf(0.0, scale)(unshift(x, s))


def logsnr_cdf(mean, std):
    """t = sigmoid(-lambda / 2), lambda ~ N(mean, std): logit t ~ N(-mean / 2, std / 2)."""
    return logit_normal_cdf(-mean / 2, std / 2)


def squashed(cdf, a, b):
    return lambda x: cdf(((x - a) / (b - a)).clamp(1e-12, 1 - 1e-12))


def conditioned(cdf, a, b):
    lo, hi = (float(cdf(torch.tensor([v], dtype=torch.float64))) for v in (max(a, 1e-12), min(b, 1 - 1e-12)))
    return lambda x: (cdf(x.clamp(max(a, 1e-12), min(b, 1 - 1e-12))) - lo) / (hi - lo)


def mode_cdf(scale):
    """sigma mode, S = 1: t ~ 1 - v, v = mode_map(u) decreasing in u, so P(t <= x) = mode_map^-1(1 - x)."""
    def cdf(x):
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = mode_density_map(mid, scale) > 1 - x
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return lo
    return cdf


FLUX_128 = math.exp(1.15)  # (128/2)^2 = 4096 tokens -> mu = 1.15
QWEN_128 = math.exp(0.5 + (4096 - 256) * 0.4 / (8192 - 256))
KREA2_128 = math.exp(0.5 + (4096 - 256) * 0.65 / (6400 - 256))
FLUX2_128 = math.exp(0.5 + (128 * 128 - 256) * 0.65 / (4096 - 256))  # 16384 tokens, extrapolated

CASES = {
    "uniform": ({}, lambda x: x),
    "sigmoid": ({"sigmoid_scale": 1.5}, logit_normal_cdf(0.0, 1.5)),
    "shift": ({"discrete_flow_shift": 5.0, "sigmoid_scale": 0.8}, shift_cdf(5.0, 0.8)),
    "flux_shift": ({}, shift_cdf(FLUX_128)),
    "flux2_shift": ({}, shift_cdf(FLUX2_128)),
    "qwen_shift": ({"sigmoid_scale": 1.2}, shift_cdf(QWEN_128, 1.2)),
    "krea2_shift": ({}, shift_cdf(KREA2_128)),
    "ideogram4_shift": ({}, logit_normal_cdf(0.5 * math.log(4 * 4), 1.5)),  # 128x128 tokens = 2048^2 px
    "logsnr": ({"logit_mean": -6.0, "logit_std": 2.0}, logsnr_cdf(-6.0, 2.0)),
    "qinglong_flux": ({"logit_mean": -2.0, "logit_std": 1.5},
                      lambda x: 0.79 * shift_cdf(FLUX_128)(x) + 0.11 * logsnr_cdf(-2.0, 1.5)(x)
                      + 0.10 * logsnr_cdf(5.36, 1.0)(x)),
    "qinglong_qwen": ({}, lambda x: 0.95 * shift_cdf(QWEN_128)(x) + 0.05 * logsnr_cdf(5.36, 1.0)(x)),
    "sigma": ({"discrete_flow_shift": 1.0}, lambda x: x),
}


def test_every_method_has_a_case():
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_follows_its_formula(method):
    cfg, cdf = CASES[method]
    t = _draw(_spec(timestep_sampling=method, **cfg))
    assert t.dtype == torch.float32 and t.shape == (N,) and t.device.type == "cpu"
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert ks(t, cdf) < KS_LIMIT
    exact = _draw(_spec(timestep_sampling=method, conventions="exact", **cfg))
    assert float(exact.min()) > 0 and float(exact.max()) < 1  # exact keeps t off 0 and 1
    assert ks(exact, cdf) < KS_LIMIT


def test_ks_detects_a_wrong_formula():
    t = _draw(_spec(timestep_sampling="flux_shift"))
    assert ks(t, shift_cdf(math.exp(0.63))) > 5 * KS_LIMIT  # h*w tokens instead of (h/2)(w/2) would be this wrong
    assert ks(_draw(_spec(timestep_sampling="shift", discrete_flow_shift=3.0)), shift_cdf(2.5)) > KS_LIMIT


def test_resolution_shift_constants():
    assert resolution_shift("flux_shift", (128, 128)) == pytest.approx(math.exp(1.15))
    assert resolution_shift("flux_shift", (32, 32)) == pytest.approx(math.exp(0.5))  # 256 tokens
    assert resolution_shift("flux2_shift", (64, 64)) == pytest.approx(math.exp(1.15))  # already packed: h w
    assert resolution_shift("qwen_shift", (166, 166)) == pytest.approx(2.303, abs=1e-3)  # 1328^2: "about 2.2"
    assert resolution_shift("krea2_shift", (160, 160)) == pytest.approx(math.exp(1.15))  # 6400 tokens
    with pytest.raises(ValueError, match="latent height and width"):
        sample_timesteps(2, _spec(timestep_sampling="qwen_shift"), None, torch.Generator().manual_seed(0))


def test_pinned_quantiles():
    def quantiles(t):
        return [float(torch.quantile(t.double(), q)) for q in (0.1, 0.5, 0.9)]

    def sig(x):
        return 1 / (1 + math.exp(-x))

    z = (-1.2816, 0.0, 1.2816)
    shifted = quantiles(_draw(_spec(timestep_sampling="shift", discrete_flow_shift=3.0)))
    assert shifted == pytest.approx([3 * sig(v) / (1 + 2 * sig(v)) for v in z], abs=0.01)
    assert quantiles(_draw(_spec(timestep_sampling="logsnr", logit_mean=-6.0, logit_std=2.0)))[1] == \
        pytest.approx(sig(3.0), abs=0.005)
    # ideogram4 at 64x64 tokens (1024^2 px): median sigmoid(ln 2) = 2/3, as musubi-tuner's own test pins
    assert quantiles(_draw(_spec(timestep_sampling="ideogram4_shift"), hw=(64, 64)))[1] == pytest.approx(2 / 3, abs=0.01)
    assert quantiles(_draw(_spec(timestep_sampling="ideogram4_shift"), hw=(32, 32)))[1] == pytest.approx(0.5, abs=0.01)


def test_ideogram4_is_clamped():
    t = _draw(_spec(timestep_sampling="ideogram4_shift"), hw=(4096, 4096))  # mean 4.85: some draws above logit 9
    assert float(t.max()) == pytest.approx(IDEOGRAM4_BOUNDS[1], abs=1e-6)
    assert (t == t.max()).sum() > 10
    assert IDEOGRAM4_BOUNDS[0] == pytest.approx(1 - 1 / (1 + math.exp(-7.5)))


def test_qinglong_proportions():
    for method, (_, *weights) in QINGLONG_MIXTURES.items():
        _, component = draw_qinglong(N, _spec(timestep_sampling=method), HW, torch.Generator().manual_seed(0))
        shares = [float((component == k).double().mean()) for k in range(3)]
        assert shares == pytest.approx(weights, abs=0.01)
    assert QINGLONG_MIXTURES["qinglong_flux"][1:] == (0.79, 0.11, 0.10)
    assert QINGLONG_MIXTURES["qinglong_qwen"][1:] == (0.95, 0.0, 0.05)


# -- sigma ---------------------------------------------------------------------------------------

def test_sigma_is_musubi_tuners_table():
    """musubi: t is a table value k / 1000, k in 1..1000, the shift is ignored and min/max select the mirrored
    range, as musubi-tuner's trainer does (convention_notes warns of both)."""
    t = _draw(_spec(timestep_sampling="sigma", discrete_flow_shift=3.0))
    steps = model_timesteps(t, _spec(timestep_sampling="sigma"))
    assert torch.allclose(t.double() * 1000, steps.double(), atol=1e-3)
    assert float(steps.min()) == 1.0 and float(steps.max()) == 1000.0
    assert ks(t, lambda x: x) < KS_LIMIT  # unshifted
    mirrored = _draw(_spec(timestep_sampling="sigma", min_timestep=0, max_timestep=300)).double()
    assert float(mirrored.min()) > 0.7 and float(mirrored.max()) == 1.0  # t in (0.7, 1]
    notes = convention_notes(_spec(timestep_sampling="sigma", min_timestep=0, max_timestep=300,
                                   preserve_distribution_shape=True))
    assert len(notes) == 3 and "has no effect" in notes[0] and "(700, 1000]" in notes[1]
    assert convention_notes(_spec(timestep_sampling="sigma", discrete_flow_shift=1.0)) == []
    assert convention_notes(_spec(timestep_sampling="sigma", conventions="exact")) == []


def test_sigma_exact_uses_the_1000_step_table_and_the_shift():
    t = _draw(_spec(timestep_sampling="sigma", discrete_flow_shift=1.0, conventions="exact")).double()
    steps = t * 1000
    assert torch.allclose(steps, steps.round(), atol=0.02)  # the table, 1..1000 (1000 kept just below 1)
    assert float(steps.min()) == pytest.approx(1.0, abs=0.02)
    shifted = _draw(_spec(timestep_sampling="sigma", discrete_flow_shift=3.0, conventions="exact")).double()
    assert ks(shifted, lambda x: unshift(x, 3.0)) < KS_LIMIT  # musubi-tuner ignores the shift here
    assert torch.allclose(unshift(shifted, 3.0) * 1000, (unshift(shifted, 3.0) * 1000).round(), atol=0.05)


@pytest.mark.parametrize("conventions", ["musubi", "exact"])
def test_sigma_densities(conventions):
    spec = _spec(timestep_sampling="sigma", discrete_flow_shift=1.0, weighting_scheme="logit_normal",
                 logit_mean=1.0, logit_std=1.0, conventions=conventions)
    # the table descends, so logit_mean > 0 favours small t: t ~ sigmoid(-1 - z)
    assert ks(_draw(spec), logit_normal_cdf(-1.0, 1.0)) < KS_LIMIT
    mode = _spec(timestep_sampling="sigma", discrete_flow_shift=1.0, weighting_scheme="mode", mode_scale=1.29,
                 conventions=conventions)
    assert ks(_draw(mode), mode_cdf(1.29)) < KS_LIMIT
    assert ks(_draw(mode), lambda x: x) > 3 * KS_LIMIT


def test_sigma_range_is_not_mirrored_under_exact():
    base = {"timestep_sampling": "sigma", "discrete_flow_shift": 1.0, "min_timestep": 0, "max_timestep": 300,
            "conventions": "exact"}
    for preserve in (False, True):
        t = _draw(_spec(**base, preserve_distribution_shape=preserve))
        assert float(t.max()) <= 0.3 + 1e-6  # musubi-tuner selects t in (0.7, 1] here
    t = _draw(_spec(**base, preserve_distribution_shape=True))
    assert ks(t, lambda x: x / 0.3) < KS_LIMIT


# -- model timesteps -----------------------------------------------------------------------------

def test_model_timesteps_and_routing_offset():
    t = torch.tensor([0.0, 0.25, 0.875, 0.9995])
    assert torch.equal(model_timesteps(t, _spec()), t * 1000 + 1)  # musubi-tuner: 1000 t + 1
    assert torch.equal(model_timesteps(t, _spec(conventions="exact")), t * 1000)
    table = torch.tensor([0.001, 0.5, 0.875, 1.0])
    assert torch.equal(model_timesteps(table, _spec(timestep_sampling="sigma")), torch.tensor([1.0, 500, 875, 1000]))
    assert routing_offset(_spec()) == 0.001  # (1000 t + 1) / 1000 >= boundary
    assert routing_offset(_spec(timestep_sampling="sigma")) == 0.0 and routing_offset(_spec(conventions="exact")) == 0.0


# -- ranges --------------------------------------------------------------------------------------

def test_min_max_squash():
    spec = _spec(timestep_sampling="shift", discrete_flow_shift=3.0, min_timestep=200, max_timestep=700)
    t = _draw(spec)
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.7
    assert ks(t, squashed(shift_cdf(3.0), 0.2, 0.7)) < KS_LIMIT


def test_preserve_distribution_shape_conditions_on_the_range():
    spec = _spec(timestep_sampling="shift", discrete_flow_shift=3.0, min_timestep=200, max_timestep=700,
                 preserve_distribution_shape=True)
    t = _draw(spec)
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.7
    assert ks(t, conditioned(shift_cdf(3.0), 0.2, 0.7)) < KS_LIMIT
    # the same as rejecting unrestricted draws
    free = _draw(_spec(timestep_sampling="shift", discrete_flow_shift=3.0), n=4 * N, seed=1)
    kept = free[(free >= 0.2) & (free <= 0.7)]
    assert float(torch.quantile(kept, 0.5)) == pytest.approx(float(torch.quantile(t, 0.5)), abs=0.01)


def test_preserve_distribution_shape_falls_back_to_the_squash(caplog):
    spec = _spec(timestep_sampling="logsnr", logit_mean=-6.0, logit_std=0.1, max_timestep=100,
                 preserve_distribution_shape=True)  # t ~ sigmoid(3): never below 0.1
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        t = _draw(spec, n=8)
    assert float(t.max()) <= 0.1 and "squashed" in caplog.text


def test_expert_range():
    spec = _spec(timestep_sampling="shift", discrete_flow_shift=3.0)
    t = _draw(spec, low=0.875, high=1.0)
    assert float(t.min()) >= 0.875
    assert ks(t, conditioned(shift_cdf(3.0), 0.875, 1.0)) < KS_LIMIT
    low = _draw(spec, low=0.0, high=0.5)
    assert float(low.max()) <= 0.5
    never = _spec(timestep_sampling="logsnr", logit_mean=-6.0, logit_std=0.1)  # t ~ 0.95: clamped after 100 tries
    assert torch.all(_draw(never, n=4, low=0.0, high=0.1) == torch.tensor(0.1))


def test_reproducible_from_the_generator_alone():
    for method in METHODS:
        spec = _spec(timestep_sampling=method, min_timestep=100, max_timestep=900, preserve_distribution_shape=True)
        torch.manual_seed(1)
        a = _draw(spec, n=64, seed=7, low=0.3, high=0.9)
        torch.manual_seed(2)  # the global RNG plays no part
        b = _draw(spec, n=64, seed=7, low=0.3, high=0.9)
        assert torch.equal(a, b), method
        assert not torch.equal(a, _draw(spec, n=64, seed=8, low=0.3, high=0.9)), method
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    first = sample_timesteps(16, _spec(), HW, g)
    g.set_state(state)
    assert torch.equal(first, sample_timesteps(16, _spec(), HW, g))


def test_earlier_api_still_works():
    g = torch.Generator().manual_seed(0)
    t = sample_t_in(1000, "shift", 0.875, 1.0, shift=3.0, generator=g)
    assert float(t.min()) >= 0.875
    assert ks(sample_t(N, "shift", shift=3.0, generator=g), shift_cdf(3.0)) < KS_LIMIT
    with pytest.raises(ValueError, match="training.timestep_sampling"):
        sample_t(1, "nope")


# -- loss ----------------------------------------------------------------------------------------

def test_loss_weights_exact():
    t = torch.tensor([0.25, 0.5, 1.0])
    exact = {"conventions": "exact"}
    assert torch.allclose(loss_weights(t, _spec(weighting_scheme="sigma_sqrt", **exact)), torch.tensor([16.0, 4.0, 1.0]))
    cosmap = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.25, 0.5, 1.0)]
    assert torch.allclose(loss_weights(t, _spec(weighting_scheme="cosmap", **exact)), torch.tensor(cosmap))
    assert loss_weights(t, _spec(weighting_scheme="cosmap", **exact))[1] == pytest.approx(4 / math.pi)
    for scheme in ("none", "logit_normal", "mode"):
        assert loss_weights(t, _spec(weighting_scheme=scheme, **exact)) is None
        assert loss_weights(t, _spec(weighting_scheme=scheme)) is None


def test_loss_weights_musubi_use_the_scheduler_table():
    """sigma is the table entry nearest 1000 t + 1 (ties to the larger), at least 0.001, in the DiT's dtype."""
    t = torch.tensor([0.0, 0.2494, 0.4995, 0.999])
    table_sigma = torch.tensor([0.001, 0.250, 0.501, 1.0])
    weights = loss_weights(t, _spec(weighting_scheme="sigma_sqrt"))
    assert torch.allclose(weights, table_sigma ** -2.0, rtol=1e-6)
    bf16 = loss_weights(t, _spec(weighting_scheme="cosmap"), torch.bfloat16)
    s = table_sigma.to(torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.equal(bf16, (2 / (math.pi * (1 - 2 * s + 2 * s ** 2))).float())
    sigma_method = loss_weights(torch.tensor([0.25, 1.0]), _spec(timestep_sampling="sigma", weighting_scheme="sigma_sqrt"))
    assert torch.allclose(sigma_method, torch.tensor([16.0, 1.0]))


def test_weighted_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    assert torch.allclose(weighted_mse(pred, target, None), F.mse_loss(pred, target))
    assert torch.allclose(weighted_mse(pred, target, torch.ones(3)), F.mse_loss(pred, target))
    w = torch.tensor([1.0, 2.0, 0.5])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(weighted_mse(pred, target, w), (per_sample * w).mean())
    mask = (torch.rand(3, 1, 2, 5, 5, generator=g) > 0.5).float()
    m = mask.expand_as(pred)
    assert torch.allclose(weighted_mse(pred, target, None, mask), ((pred - target) ** 2 * m).sum() / m.sum())
    expected = ((pred - target) ** 2 * m * w.view(3, 1, 1, 1, 1)).sum() / m.sum()
    assert torch.allclose(weighted_mse(pred, target, w, mask), expected)


# -- config --------------------------------------------------------------------------------------

def test_spec_defaults_and_checks():
    spec = TimestepSpec.from_config({"seed": 1})  # other training keys are ignored
    assert (spec.timestep_sampling, spec.discrete_flow_shift, spec.sigmoid_scale) == ("shift", 3.0, 1.0)
    assert (spec.min_timestep, spec.max_timestep, spec.preserve_distribution_shape) == (0, 1000, False)
    assert (spec.weighting_scheme, spec.logit_mean, spec.logit_std, spec.mode_scale) == ("none", 0.0, 1.0, 1.29)
    assert spec.conventions == "musubi" and spec.musubi
    assert check_spec({}) == []
    assert check_spec({"timestep_sampling": "sigma", "weighting_scheme": "mode"}) == []

    def keys(cfg):
        return [key for key, _ in check_spec(cfg)]

    assert keys({"timestep_sampling": "nope"}) == ["training.timestep_sampling"]
    assert keys({"weighting_scheme": "nope"}) == ["training.weighting_scheme"]
    assert keys({"min_timestep": 500, "max_timestep": 500}) == ["training.min_timestep"]
    assert keys({"max_timestep": 1001}) == ["training.min_timestep"]
    assert keys({"min_timestep": -1}) == ["training.min_timestep"]
    assert keys({"sigmoid_scale": 0}) == ["training.sigmoid_scale"]
    assert keys({"discrete_flow_shift": -1.0}) == ["training.discrete_flow_shift"]
    assert keys({"logit_std": 0.0}) == ["training.logit_std"]
    assert keys({"preserve_distribution_shape": "yes"}) == ["training.preserve_distribution_shape"]
    assert keys({"conventions": "musubi-tuner"}) == ["training.conventions"]
    assert keys({"timestep_sampling": "sigma", "weighting_scheme": "mode", "mode_scale": 3.0}) == ["training.mode_scale"]
    [(key, message)] = check_spec({"weighting_scheme": "logit_normal", "timestep_sampling": "shift"})
    assert key == "training.weighting_scheme" and "has no effect unless timestep_sampling=sigma" in message
    with pytest.raises(ValueError, match="training.sigmoid_scale"):
        TimestepSpec.from_config({"sigmoid_scale": -1})


# -- plot ----------------------------------------------------------------------------------------

def test_histogram_and_plot(tmp_path):
    spec = _spec(timestep_sampling="shift", weighting_scheme="cosmap")
    counts, edges, weights = timestep_histogram(spec, HW, n=5000, seed=0)
    assert counts.shape == (100,) and int(counts.sum()) == 5000 and edges.shape == (101,)
    centres = (edges[:-1] + edges[1:]) / 2
    assert torch.allclose(weights, 2 / (math.pi * (1 - 2 * centres + 2 * centres ** 2)), rtol=0.02)
    _, _, ones = timestep_histogram(_spec(), HW, n=1000, seed=0)
    assert torch.equal(ones, torch.ones(100, dtype=ones.dtype))

    path = write_timestep_plot(_spec(weighting_scheme="sigma_sqrt"), HW, tmp_path / "plots" / "t.png", n=5000)
    assert path == tmp_path / "plots" / "t.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == SIZE
        image.load()
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.png"]  # no temp file left
