"""LoRA / LoHa / LoKr networks on a tiny CPU model: file round trips, key names, ΔW, merge, LoKr factorization,
dropouts, include/exclude target selection and LoRA+ parameter groups."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from torch import nn

from musubi_pipe.errors import ConfigError, UserError
from musubi_pipe.network.factory import (
    NETWORK_MODULES,
    build_network,
    load_network_weights,
    network_from_weights,
    network_kind_of,
    network_module_name,
    param_groups,
)
from musubi_pipe.network.lora import LoRANetwork, lora_name
from musubi_pipe.network.lora_file import load_lora_file, save_lora_file
from musubi_pipe.network.lycoris import LoHaNetwork, LoKrModule, LoKrNetwork, factorization
from musubi_pipe.network.targets import covering_pattern, filter_targets, select_targets

D, FF = 32, 64


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.ffn = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        x = x + a.o(a.q(x) * torch.tanh(a.k(x)) + a.v(x))
        return x + self.ffn(x)


class Tiny(nn.Module):
    """Linear layers named like a Wan DiT's: blocks.0.self_attn.q, blocks.0.ffn.0, ..."""

    def __init__(self, num_blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture(scope="module")
def base() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))


def targets_of(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def cfg(kind: str, **overrides) -> dict:
    return {"network_module": kind, "network_dim": 2, "network_alpha": 1.0, **overrides}


@torch.no_grad()
def randomize(network: nn.Module, seed: int = 2) -> None:
    """Nonzero values everywhere, the zero-initialised parts (lora_up, hada_w2_a, lokr_w2_b) included."""
    g = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def trained(base: Tiny, kind: str, **overrides) -> tuple[Tiny, LoRANetwork]:
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    network = build_network(targets_of(model), cfg(kind, **overrides))
    randomize(network)
    network.apply_to()
    return model, network


# -- round trips, keys, ΔW, merge -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_zero_init_leaves_outputs_unchanged(base, x, kind):
    model = copy.deepcopy(base)
    network = build_network(targets_of(model), cfg(kind))
    network.apply_to()
    assert torch.equal(run(model, x), run(base, x))
    assert all(torch.count_nonzero(m.delta_weight()) == 0 for m in network.loras.values())


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_save_build_load_round_trip(base, x, tmp_path, kind):
    model, network = trained(base, kind, network_alpha=3.0)
    expected = run(model, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3)
    path = tmp_path / f"{kind}.safetensors"
    save_lora_file(path, network.lora_state_dict(), {"ss_network_module": network_module_name(kind, "wan")})
    tensors, meta = load_lora_file(path)
    assert network_kind_of(tensors) == kind

    fresh = copy.deepcopy(base)
    loaded = build_network(targets_of(fresh), cfg(kind, network_alpha=3.0))
    loaded.load_lora_state_dict(tensors, source=str(path))
    loaded.apply_to()
    assert torch.equal(run(fresh, x), expected)

    inferred_model = copy.deepcopy(base)
    inferred = network_from_weights(targets_of(inferred_model), tensors, source=str(path))
    assert inferred.kind == kind
    inferred.apply_to()
    assert torch.equal(run(inferred_model, x), expected)


def test_state_dict_keys_and_shapes_per_type(base):
    targets = targets_of(copy.deepcopy(base))
    stem = lora_name("blocks.0.ffn.0")
    assert stem == "lora_unet_blocks_0_ffn_0"

    def module_keys(network):
        sd = network.lora_state_dict()
        assert len({k.split(".", 1)[0] for k in sd}) == len(targets)
        return {k: tuple(v.shape) for k, v in sd.items() if k.startswith(stem + ".")}

    assert module_keys(build_network(targets, cfg("lora", network_dim=4))) == {
        f"{stem}.lora_down.weight": (4, D), f"{stem}.lora_up.weight": (FF, 4), f"{stem}.alpha": (),
    }  # fmt: skip
    assert module_keys(build_network(targets, cfg("loha", network_dim=4))) == {
        f"{stem}.hada_w1_a": (FF, 4), f"{stem}.hada_w1_b": (4, D),
        f"{stem}.hada_w2_a": (FF, 4), f"{stem}.hada_w2_b": (4, D), f"{stem}.alpha": (),
    }  # fmt: skip
    # D = 32 -> (4, 8), FF = 64 -> (8, 8): W1 (out_l, in_m) = (8, 4), W2 (out_k, in_n) = (8, 8); rank 2 < 8 / 2
    assert module_keys(build_network(targets, cfg("lokr", network_dim=2))) == {
        f"{stem}.lokr_w1": (8, 4), f"{stem}.lokr_w2_a": (8, 2), f"{stem}.lokr_w2_b": (2, 8), f"{stem}.alpha": (),
    }  # fmt: skip
    # rank 4 is not < 8 / 2: a full W2
    assert module_keys(build_network(targets, cfg("lokr", network_dim=4))) == {
        f"{stem}.lokr_w1": (8, 4), f"{stem}.lokr_w2": (8, 8), f"{stem}.alpha": (),
    }  # fmt: skip


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_delta_weight_is_the_forward_difference(base, kind):
    model, network = trained(base, kind, network_alpha=3.0)
    network.set_multiplier(0.5)
    inputs = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    linear = model.blocks[1].self_attn.q
    module = network.loras[lora_name("blocks.1.self_attn.q")]
    with torch.no_grad():
        hooked = linear(inputs)
        plain = nn.functional.linear(inputs, linear.weight, linear.bias)
    expected = nn.functional.linear(inputs, module.delta_weight()) * 0.5
    torch.testing.assert_close(hooked - plain, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_merge_into_base_matches_hooked_forward(base, x, kind):
    model, network = trained(base, kind)
    hooked = run(model, x)
    network.merge_into_base()
    assert all("forward" not in m.__dict__ for m in targets_of(model).values())
    torch.testing.assert_close(run(model, x), hooked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_forward_keeps_base_dtype(kind):
    torch.manual_seed(0)
    linear = nn.Linear(D, D).to(torch.bfloat16)
    network = build_network({"blocks.0.self_attn.q": linear}, cfg(kind))
    randomize(network)
    network.apply_to()
    out = linear(torch.randn(2, D, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in network.parameters())


def test_load_wrong_type_names_the_key_and_suffixes(base, tmp_path):
    targets = targets_of(copy.deepcopy(base))
    loha = build_network(targets, cfg("loha"))
    lora = build_network(targets, cfg("lora"))
    with pytest.raises(UserError) as info:
        lora.load_lora_state_dict(loha.lora_state_dict(), source="network.network_weights=x.safetensors")
    message = str(info.value)
    assert "network.network_module" in message and "'loha'" in message
    assert "lora_down.weight, lora_up.weight, alpha" in message
    with pytest.raises(UserError) as info:
        loha.load_lora_state_dict(lora.lora_state_dict())
    assert "hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha" in str(info.value)
    lokr = build_network(targets, cfg("lokr"))
    with pytest.raises(UserError, match="lokr_factor"):  # another factor: same keys, other shapes
        lokr.load_lora_state_dict(build_network(targets, cfg("lokr", lokr_factor=2)).lora_state_dict())


# -- LoKr factorization ------------------------------------------------------------------------------------------


def test_lokr_factorization_cases(caplog):
    assert factorization(512) == (16, 32)
    assert factorization(512, 4) == (4, 128)
    assert factorization(512, 16) == (16, 32)
    assert factorization(1024) == (32, 32)
    assert factorization(127) == (1, 127)
    assert factorization(128, 3) == (2, 64)  # 3 does not divide 128: the best pair with the smaller value <= 3
    assert factorization(5120) == (64, 80)

    torch.manual_seed(0)
    square = {"blocks.0.self_attn.q": nn.Linear(512, 512)}
    balanced = LoKrNetwork(square, 4, 1.0).loras[lora_name("blocks.0.self_attn.q")]
    assert balanced.lokr_w1.shape == (16, 16) and balanced.lokr_w2_a.shape == (32, 4) and balanced.lokr_w2_b.shape == (4, 32)
    assert balanced.scale == 0.25 and not balanced.full_w2
    assert torch.count_nonzero(balanced.lokr_w2_b) == 0 and torch.count_nonzero(balanced.lokr_w1) > 0

    by_four = LoKrNetwork(square, 4, 1.0, factor=4).loras[lora_name("blocks.0.self_attn.q")]
    assert by_four.lokr_w1.shape == (4, 4) and by_four.lokr_w2_a.shape == (128, 4) and by_four.lokr_w2_b.shape == (4, 128)
    assert by_four.delta_weight().shape == (512, 512)

    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        full = LoKrNetwork(square, 16, 1.0).loras[lora_name("blocks.0.self_attn.q")]  # 16 is not < 32 / 2
    assert isinstance(full, LoKrModule) and full.full_w2
    assert full.lokr_w2.shape == (32, 32) and torch.count_nonzero(full.lokr_w2) == 0
    assert float(full.alpha) == 16.0 and full.scale == 1.0
    assert not hasattr(full, "lokr_w2_a")
    assert any("full lokr_w2" in r.getMessage() and "network.network_dim" in r.getMessage() for r in caplog.records)


# -- dropouts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_eval_mode_ignores_dropouts(base, x, kind):
    model, network = trained(base, kind)
    expected = run(model, x)
    other = copy.deepcopy(base)
    dropped = build_network(targets_of(other), cfg(kind, network_dropout=0.3, rank_dropout=0.3, module_dropout=0.5))
    dropped.load_lora_state_dict(network.lora_state_dict())
    dropped.apply_to()
    dropped.eval()
    assert torch.equal(run(other, x), expected) and torch.equal(run(other, x), expected)
    dropped.train()
    torch.manual_seed(0)
    assert not torch.equal(run(other, x), expected)  # the dropouts do act in training mode


@pytest.mark.parametrize("kind", NETWORK_MODULES)
def test_module_dropout_one_gives_the_base_output(base, x, kind):
    model, network = trained(base, kind, module_dropout=1.0)
    network.train()
    assert torch.equal(run(model, x), run(base, x))
    network.eval()
    assert not torch.equal(run(model, x), run(base, x))


def test_lora_network_dropout_acts_on_the_down_output():
    torch.manual_seed(0)
    linear = nn.Linear(D, D)
    network = LoRANetwork({"blocks.0.ffn.0": linear}, 4, 2.0, dropout=0.5)
    randomize(network)
    network.apply_to()
    network.train()
    module = network.loras[lora_name("blocks.0.ffn.0")]
    inputs = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    with torch.no_grad():
        got = linear(inputs)
    torch.manual_seed(7)
    with torch.no_grad():
        lx = nn.functional.dropout(module.lora_down(inputs), p=0.5)
        expected = nn.functional.linear(inputs, linear.weight, linear.bias) + module.lora_up(lx) * module.scale
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_lora_rank_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    linear = nn.Linear(D, D)
    network = LoRANetwork({"blocks.0.ffn.0": linear}, 8, 8.0, rank_dropout=0.5)
    randomize(network)
    network.apply_to()
    row = torch.randn(1, D, generator=torch.Generator().manual_seed(1))
    rows = row.expand(20000, D)  # one mask per sample: the batch mean estimates the expectation
    with torch.no_grad():
        base_out = nn.functional.linear(row, linear.weight, linear.bias)
        network.eval()
        exact = linear(row) - base_out
        network.train()
        torch.manual_seed(11)
        sampled = linear(rows) - base_out
    assert not torch.allclose(sampled[0], sampled[1])  # masks differ per sample
    kept = ((sampled - exact).abs().amax(dim=1) < 1e-5).float().mean()
    assert kept < 0.01  # almost no sample keeps every rank (p = 0.5, rank 8: 1/256)
    torch.testing.assert_close(sampled.mean(dim=0, keepdim=True), exact, rtol=0, atol=0.05 * exact.abs().max().item())


def test_dropout_values_are_checked(base):
    targets = targets_of(copy.deepcopy(base))
    with pytest.raises(ConfigError, match=r"network\.rank_dropout"):
        build_network(targets, cfg("lora", rank_dropout=1.0))
    with pytest.raises(ConfigError, match=r"network\.network_dropout"):
        build_network(targets, cfg("lora", network_dropout=-0.1))
    build_network(targets, cfg("lora", module_dropout=1.0))  # 1.0 is a valid module dropout


# -- tying and LoRA+ ---------------------------------------------------------------------------------------------


def test_tied_networks_share_weights_and_follow_loads(base):
    first = LoHaNetwork(targets_of(copy.deepcopy(base)), 2, 1.0)
    second = LoHaNetwork(targets_of(copy.deepcopy(base)), 2, 1.0)
    second.tie_to(first)
    name = lora_name("blocks.0.self_attn.q")
    assert second.loras[name].hada_w1_a is first.loras[name].hada_w1_a
    second.double().float()  # Module.to replaces buffers per module: the alphas are separate tensors now
    assert second.loras[name].alpha is not first.loras[name].alpha
    sd = first.lora_state_dict()
    sd[f"{name}.alpha"] = torch.tensor(4.0)
    first.load_lora_state_dict(sd)
    assert float(second.loras[name].alpha) == 4.0 and second.loras[name].scale == 2.0
    with pytest.raises(ValueError, match="cannot tie"):
        LoRANetwork(targets_of(copy.deepcopy(base)), 2, 1.0).tie_to(first)


def test_loraplus_groups_and_tied_parameters_once(base, caplog):
    first = build_network(targets_of(copy.deepcopy(base)), cfg("lora"))
    second = build_network(targets_of(copy.deepcopy(base)), cfg("lora"))
    second.tie_to(first)
    n_modules = len(first.loras)

    groups = param_groups([first, second], lr=1e-4, loraplus_lr_ratio=16)
    assert [g["name"] for g in groups] == ["lora_down", "lora_up"]
    assert [len(g["params"]) for g in groups] == [n_modules, n_modules]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1.6e-3)
    assert all(p.shape[1] == 2 for p in groups[1]["params"])  # lora_up: out x rank
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 2 * n_modules

    plain = param_groups([first, second], lr=1e-4)
    assert [g["name"] for g in plain] == ["default"] and len(plain[0]["params"]) == 2 * n_modules
    torch.optim.AdamW(groups)  # the groups are valid optimizer input

    loha = build_network(targets_of(copy.deepcopy(base)), cfg("loha"))
    with caplog.at_level(logging.WARNING, logger="musubi_pipe"):
        loha_groups = param_groups(loha, lr=1e-4, loraplus_lr_ratio=4)
    assert [g["name"] for g in loha_groups] == ["default"] and loha_groups[0]["lr"] == 1e-4
    assert len(loha_groups[0]["params"]) == 4 * n_modules
    assert any("loraplus_lr_ratio has no effect on LoHa" in r.getMessage() for r in caplog.records)


# -- target selection --------------------------------------------------------------------------------------------


NAMES = ["blocks.1.q", "blocks.1.ffn.0", "blocks.10.q", "blocks.1x.q", "blocks.2.q"]


def candidates() -> dict[str, str]:
    return {n: n for n in NAMES}


def test_selection_is_musubi_tuners_rule():
    """Left out iff an exclude pattern matches and no include pattern does: include only re-admits."""
    assert list(select_targets(candidates(), [], [])) == NAMES
    assert list(select_targets(candidates(), [], [r".*\.q"])) == ["blocks.1.ffn.0"]
    # training blocks.1 only: exclude everything, re-admit blocks.1 (musubi-tuner's documented recipe)
    assert list(select_targets(candidates(), [r"blocks\.1\..*"], [r".*"])) == ["blocks.1.q", "blocks.1.ffn.0"]
    # include wins over exclude for what both match
    assert list(select_targets(candidates(), [r"blocks\.2\..*"], [r".*\.q"])) == ["blocks.1.ffn.0", "blocks.2.q"]
    # the family's default excludes are appended to the user's and re-admitted the same way
    assert list(select_targets(candidates(), [], [], default_excludes=[r".*ffn.*"])) == [
        "blocks.1.q", "blocks.10.q", "blocks.1x.q", "blocks.2.q"]
    assert list(select_targets(candidates(), [r".*ffn.*"], [], default_excludes=[r".*ffn.*"])) == NAMES
    # a default exclude that matches nothing is no error (Wan's matches no block Linear)
    assert list(select_targets(candidates(), [], [], default_excludes=[r".*head.*"])) == NAMES


def test_include_that_re_admits_nothing_is_an_error():
    """An include pattern whose modules were never excluded does nothing in musubi-tuner; here it is an error that
    gives the exclude pattern that makes it narrow (an earlier version of this project narrowed with include)."""
    with pytest.raises(ConfigError, match=r"network\.include_patterns\[0\].*re-admits nothing") as info:
        select_targets(candidates(), [r"blocks\.1\..*"], [])
    assert "exclude_patterns: ['.*']" in str(info.value)
    with pytest.raises(ConfigError, match=r"network\.include_patterns\[1\]"):
        select_targets(candidates(), [r".*ffn.*", r"blocks\.2\..*"], [r".*ffn.*"])


def test_filter_narrows_with_include():
    """sampling.loras patterns: musubi-tuner's inference filter, where include is a whitelist."""
    assert list(filter_targets(candidates(), [r"blocks\.1\..*"], [], "s")) == ["blocks.1.q", "blocks.1.ffn.0"]
    assert list(filter_targets(candidates(), [r"blocks\.1\..*"], [r".*ffn.*"], "s")) == ["blocks.1.q"]
    with pytest.raises(ConfigError, match=r"s\.include_patterns / s\.exclude_patterns.*keep none"):
        filter_targets(candidates(), [r".*\.q"], [r"blocks\..*"], "s")


def test_selection_uses_full_match():
    # An unescaped dot matches any character: `blocks.1.*` also takes blocks.10 and blocks.1x.
    loose = select_targets(candidates(), [], ["blocks.1.*"])
    assert list(loose) == ["blocks.2.q"]
    # A pattern must match the whole path: a prefix alone matches nothing (re.search would have matched).
    with pytest.raises(ConfigError, match=r"network\.exclude_patterns\[0\]") as info:
        select_targets(candidates(), [], [r"blocks\.1"])
    assert "'blocks.1.q'" in str(info.value) and "re.fullmatch" in str(info.value)


def test_selection_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"network\.include_patterns\[1\].*not a valid regular expression"):
        select_targets(candidates(), [r".*", r"blocks\.(1"], [r".*"])
    with pytest.raises(ConfigError, match=r"network\.exclude_patterns\[0\].*matches none") as info:
        select_targets(candidates(), [], [r".*attn.*"])
    assert str(info.value).count("'blocks.") == 3  # three example candidates
    with pytest.raises(ConfigError, match=r"net\.include_patterns / net\.exclude_patterns"):
        select_targets(candidates(), [], [r"blocks\..*"], where="net")
    with pytest.raises(ConfigError, match=r"network\.include_patterns: must be a list"):
        select_targets(candidates(), "blocks.*", [])


def test_build_network_applies_the_selection(base):
    targets = targets_of(copy.deepcopy(base))
    network = build_network(targets, cfg("lokr", include_patterns=[r"blocks\.0\.self_attn\..*"],
                                         exclude_patterns=[r".*"]))
    assert list(network.loras) == [lora_name(f"blocks.0.self_attn.{p}") for p in "qkvo"]
    network = build_network(targets, cfg("lora"), default_excludes=[r".*ffn.*"])
    assert not any("ffn" in name for name in network.loras) and len(network.loras) == 4 * len(base.blocks)
    with pytest.raises(ConfigError, match=r"network\.include_patterns\[0\]"):
        build_network(targets, cfg("lora", include_patterns=["double_blocks.*"]))


def test_network_weights_mismatch_names_the_pattern(base):
    """network.network_weights: every key is used on both sides; otherwise the error gives the pattern that fixes
    it, and that pattern does fix it."""
    targets = targets_of(copy.deepcopy(base))
    full = build_network(targets, cfg("lora")).lora_state_dict()
    narrow = build_network(targets, cfg("lora"), default_excludes=[r".*ffn.*"])
    with pytest.raises(UserError, match="left out by the network's exclude patterns") as info:
        load_network_weights(narrow, full, targets, "f.safetensors")
    include = re.search(r"network\.include_patterns: \['(.+)'\]", str(info.value)).group(1).replace("\\\\", "\\")
    assert include == r"(blocks\.\d+\.ffn\.0|blocks\.\d+\.ffn\.2)"
    fixed = build_network(targets, cfg("lora", include_patterns=[include]), default_excludes=[r".*ffn.*"])
    load_network_weights(fixed, full, targets, "f.safetensors")

    wide = build_network(targets, cfg("lora"))
    with pytest.raises(UserError, match="not in the file") as info:
        load_network_weights(wide, narrow.lora_state_dict(), targets, "f.safetensors")
    exclude = re.search(r"network\.exclude_patterns: \['(.+)'\]", str(info.value)).group(1).replace("\\\\", "\\")
    fixed = build_network(targets, cfg("lora", exclude_patterns=[exclude]))
    load_network_weights(fixed, narrow.lora_state_dict(), targets, "f.safetensors")
    with pytest.raises(UserError, match="no LoRA target of this model"):
        load_network_weights(wide, {**full, "lora_unet_x_y.lora_down.weight": torch.zeros(1, 1)}, targets, "f")


def test_covering_pattern_generalises_block_indices_only_when_safe():
    assert covering_pattern(["blocks.0.ffn.0", "blocks.3.ffn.0"], ["blocks.1.q"]) == r"blocks\.\d+\.ffn\.0"
    assert covering_pattern(["blocks.0.ffn.0"], ["blocks.1.ffn.0"]) == r"blocks\.0\.ffn\.0"


# -- factory helpers ---------------------------------------------------------------------------------------------


def test_factory_config_errors(base):
    targets = targets_of(copy.deepcopy(base))
    with pytest.raises(ConfigError) as info:
        build_network(targets, cfg("dora", network_dim=0, network_alpha="x", lokr_factor=0, loraplus_lr_ratio=-1))
    keys = [k for k, _ in info.value.problems]
    assert keys == [
        "network.network_module", "network.network_dim", "network.network_alpha", "network.loraplus_lr_ratio",
        "network.lokr_factor",
    ]  # fmt: skip


def test_network_kind_and_module_names():
    assert network_kind_of({"lora_unet_a.lora_down.weight": torch.zeros(1), "lora_unet_a.alpha": torch.zeros(())}) == "lora"
    assert network_kind_of({"lora_unet_a.hada_w1_a": torch.zeros(1)}) == "loha"
    assert network_kind_of({"lora_unet_a.lokr_w1": torch.zeros(1), "lora_unet_a.lokr_w2": torch.zeros(1)}) == "lokr"
    with pytest.raises(UserError, match="mixes LoHa and LoRA"):
        network_kind_of({"a.hada_w1_a": torch.zeros(1), "b.lora_up.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="no LoRA/LoHa/LoKr keys"):
        network_kind_of({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1)})
    assert network_module_name("lora", "wan") == "networks.lora_wan"
    assert network_module_name("loha", "wan") == "networks.loha"
    assert network_module_name("lokr", "wan") == "networks.lokr"
    with pytest.raises(ValueError):
        network_module_name("dora", "wan")


def test_network_from_weights_infers_lokr_factor_and_subset(base, x):
    model, network = trained(base, "lokr", lokr_factor=2, include_patterns=[r"blocks\.1\..*"], exclude_patterns=[r".*"])
    expected = run(model, x)
    fresh = copy.deepcopy(base)
    rebuilt = network_from_weights(targets_of(fresh), network.lora_state_dict())
    assert rebuilt.factor == 2 and list(rebuilt.loras) == list(network.loras)
    rebuilt.apply_to()
    assert torch.equal(run(fresh, x), expected)
    with pytest.raises(UserError, match="lora_unet_double_blocks_0_x"):
        network_from_weights(targets_of(fresh), {"lora_unet_double_blocks_0_x.lokr_w1": torch.zeros(2, 2)})


def test_network_weights_of_another_rank_names_the_key(base):
    targets = targets_of(copy.deepcopy(base))
    rank8 = build_network(targets, cfg("lora", network_dim=8)).lora_state_dict()
    with pytest.raises(UserError, match=r"has rank 8, the network 4: set network\.network_dim=8"):
        load_network_weights(build_network(targets, cfg("lora", network_dim=4)), rank8, targets, "f.safetensors")
