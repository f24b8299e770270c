"""Adapters on a FusedLinear (one official module held by the model as several Linears, e.g. HunyuanVideo's
img_attn_qkv = diffusers' to_q/to_k/to_v) equal adapters on the real fused Linear: outputs, dropouts,
gradients, ΔW and merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from musubi_pipe.network.fused import FusedLinear
from musubi_pipe.network.lora import LoRANetwork
from musubi_pipe.network.lycoris import LoHaNetwork, LoKrNetwork

D = 16
OUTS = (16, 16, 16, 24)  # q, k, v and an MLP input, like a single block's linear1
NETWORKS = {"lora": LoRANetwork, "loha": LoHaNetwork, "lokr": LoKrNetwork}


class Split(nn.Module):
    """The diffusers shape: four Linears fed the same input; the MLP part is called first, as diffusers'
    single blocks do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.mlp = (nn.Linear(D, o) for o in OUTS)

    def forward(self, x):
        mlp = self.mlp(x)
        return torch.cat([self.q(x), self.k(x), self.v(x), mlp], dim=-1)


class Fused(nn.Module):
    def __init__(self, split: Split):
        super().__init__()
        parts = [split.q, split.k, split.v, split.mlp]
        self.linear1 = nn.Linear(D, sum(OUTS))
        with torch.no_grad():
            self.linear1.weight.copy_(torch.cat([p.weight for p in parts]))
            self.linear1.bias.copy_(torch.cat([p.bias for p in parts]))

    def forward(self, x):
        return self.linear1(x)


def _pair(kind: str, groups=None, **dropouts):
    torch.manual_seed(0)
    split = Split()
    fused = Fused(split)
    view = FusedLinear([split.q, split.k, split.v, split.mlp], groups=groups)
    a = NETWORKS[kind]({"linear1": view}, 4, 2.0, **dropouts)
    b = NETWORKS[kind]({"linear1": fused.linear1}, 4, 2.0, **dropouts)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
    b.load_state_dict(a.state_dict())
    a.apply_to()
    b.apply_to()
    return split, fused, a, b


@pytest.mark.parametrize("groups", [None, [(0, 1, 2), (3,)]])
@pytest.mark.parametrize("kind", NETWORKS)
def test_fused_view_equals_fused_linear(kind, groups):
    split, fused, a, b = _pair(kind, groups)
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-5)
    assert a.state_dict().keys() == b.state_dict().keys()
    torch.testing.assert_close(a.loras["lora_unet_linear1"].delta_weight(), b.loras["lora_unet_linear1"].delta_weight())


def test_dropouts_and_gradients_match_the_fused_module():
    split, fused, a, b = _pair("lora", dropout=0.2, rank_dropout=0.3, module_dropout=0.3)
    a.train()
    b.train()
    x = torch.randn(2, 7, D)
    for step in range(6):  # module dropout skips some steps: the same ones in both
        torch.manual_seed(step)
        out_a = split(x)
        torch.manual_seed(step)
        out_b = fused(x)
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-5)
        grads = []
        for net, out in ((a, out_a), (b, out_b)):
            net.zero_grad()
            out.square().sum().backward()
            grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()])
        for ga, gb in zip(*grads):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_merge_and_restore_on_fused_view():
    split, fused, a, b = _pair("lora")
    x = torch.randn(4, D)
    hooked = split(x)
    a.merge_into_base()
    torch.testing.assert_close(split(x), hooked, rtol=0, atol=1e-5)
    assert not any("forward" in p.__dict__ for p in (split.q, split.k, split.v, split.mlp))


def test_restore_gives_the_parts_their_forwards_back():
    split, _, a, _ = _pair("lora")
    x = torch.randn(4, D)
    a.restore()
    base = torch.cat([split.q(x), split.k(x), split.v(x), split.mlp(x)], dim=-1)
    torch.testing.assert_close(split(x), base, rtol=0, atol=0)
    a.apply_to()
    assert not torch.equal(split(x), base)


def test_groups_fed_other_tensors_compute_their_own_rows_and_keep_nothing():
    """diffusers' single blocks give proj_mlp one tensor and to_q/k/v another of equal values: with two groups
    each computes its update once, and no input stays referenced after the forward."""
    import gc
    import weakref

    split, fused, a, _ = _pair("lora", groups=[(0, 1, 2), (3,)])
    x = torch.randn(3, D)
    y = x.clone()
    out = torch.cat([split.q(y), split.k(y), split.v(y), split.mlp(x)], dim=-1)
    torch.testing.assert_close(out, fused(x), rtol=0, atol=1e-5)
    module = a.loras["lora_unet_linear1"]
    assert module._shared == {}
    ref = weakref.ref(y)
    del y, out
    gc.collect()
    assert ref() is None
