"""fp8 weight storage: quantization error bounds, the Fp8Linear autograd path, conversion, training."""

import pytest
import torch
from torch import nn

from musubi_pipe.memory.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    dequantize_weight,
    fp8_bytes,
    quantize_linears,
    quantize_weight,
    to_fp8,
)

# e4m3: 3 mantissa bits, so round-to-nearest is within 2^-4 relative for normal numbers (|v| >= 2^-6);
# subnormals are spaced 2^-9 apart, so their absolute error is at most 2^-10.
REL = 2.0**-4
MIN_NORMAL = 2.0**-6
SUBNORMAL_ABS = 2.0**-10


def _converted(lin: nn.Linear, scaled: bool) -> nn.Linear:
    to_fp8(lin, scaled)
    return lin


def test_plain_round_trip_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    q, scale = quantize_weight(w, scaled=False)
    assert scale is None and q.dtype == FP8_DTYPE and q.shape == w.shape
    err = (dequantize_weight(q, None, torch.float32) - w).abs()
    normal = w.abs() >= MIN_NORMAL
    assert normal.sum() > 0.95 * w.numel()
    assert (err[normal] <= REL * w.abs()[normal]).all()
    assert (err[~normal] <= SUBNORMAL_ABS).all()
    assert err.max() > 0  # it did round


def test_scaled_round_trip_error_bounds_per_block():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    q, scale = quantize_weight(w, scaled=True)
    assert scale.shape == (256, 8, 1) and scale.dtype == torch.float32 and q.shape == w.shape
    blocks = w.unflatten(1, (8, 64))
    # Each block's absmax maps to FP8_MAX.
    assert torch.allclose(scale, blocks.abs().amax(-1, keepdim=True) / FP8_MAX, rtol=1e-6, atol=0)
    err = (dequantize_weight(q, scale, torch.float32) - w).unflatten(1, (8, 64)).abs()
    # In units of the block scale the value is rounded like a plain fp8 cast: relative 2^-4 in the
    # normal range, absolute scale * 2^-10 below it; the slack covers the float32 multiply.
    bound = torch.maximum(REL * blocks.abs(), scale * SUBNORMAL_ABS) * (1 + 1e-6)
    assert (err <= bound).all()
    assert (err.amax(-1, keepdim=True) <= scale * FP8_MAX * REL * (1 + 1e-6)).all()
    assert err.max() > 0


def test_scale_shapes_and_dtypes():
    q, s = quantize_weight(torch.randn(32, 100), scaled=True)  # 100 % 64 != 0: one scale per row
    assert s.shape == (32, 1) and q.shape == (32, 100)
    q, s = quantize_weight(torch.randn(100), scaled=True)  # not 2-D: one scale
    assert s.shape == (1,) and q.shape == (100,)
    assert torch.equal(dequantize_weight(q, s, torch.float32), q.float() * s)
    w = torch.randn(16, 128, dtype=torch.bfloat16)
    q, s = quantize_weight(w, scaled=True)
    assert s.dtype == torch.bfloat16 and s.shape == (16, 2, 1)
    assert dequantize_weight(q, s, torch.bfloat16).dtype == torch.bfloat16
    assert quantize_weight(torch.randn(8, 64, dtype=torch.float16), scaled=True)[1].min() > 0
    assert quantize_weight(torch.zeros(8, 64, dtype=torch.float16), scaled=True)[1].min() > 0


def test_refuses_integer_and_fp8_weights():
    with pytest.raises(ValueError):
        quantize_weight(torch.ones(4, 4, dtype=torch.int8), scaled=False)
    lin = _converted(nn.Linear(8, 4), scaled=False)
    with pytest.raises(ValueError):
        to_fp8(lin, scaled=True)


def test_scaled_beats_plain_on_wide_dynamic_range_and_plain_clamps():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-4, 2, 64)[:, None]  # row magnitudes 1e-4 .. 1e2
    x = torch.randn(32, 128)
    ref = x @ w.T
    rel = {}
    for scaled in (False, True):
        q, s = quantize_weight(w, scaled)
        y = x @ dequantize_weight(q, s, torch.float32).T
        rel[scaled] = ((y - ref).norm(dim=0) / ref.norm(dim=0)).max().item()
    assert rel[False] > 0.9  # the smallest rows flush to zero
    assert rel[True] < 0.06

    q, _ = quantize_weight(torch.tensor([1000.0, -1e6, 3.0]), scaled=False)
    assert q.float().tolist() == [FP8_MAX, -FP8_MAX, 3.0]


@pytest.mark.parametrize("scaled", [False, True])
def test_layer_output_error_bounded(scaled):
    torch.manual_seed(0)
    ref = nn.Linear(512, 256).to(torch.bfloat16)
    lin = nn.Linear(512, 256).to(torch.bfloat16)
    lin.load_state_dict(ref.state_dict())
    to_fp8(lin, scaled)
    assert isinstance(lin, Fp8Linear)
    assert lin.weight.dtype == FP8_DTYPE and lin.weight.element_size() == 1
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert (lin.scale_weight is not None) == scaled
    assert f"scaled={scaled}" in repr(lin) and "float8" in repr(lin)
    x = torch.randn(16, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = ref(x).float(), lin(x).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert 0.01 < rel < (0.04 if scaled else 0.05)


def test_fp8_bytes_counts_weights_and_scales():
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 100))
    assert fp8_bytes(model) == 0
    quantize_linears(model, scaled=True)
    assert fp8_bytes(model) == 256 * 512 + 256 * 8 * 4 + 100 * 256 + 100 * 4 * 4


@pytest.mark.parametrize("scaled", [False, True])
def test_input_gradient_matches_reference_and_saves_no_float_weight(scaled):
    torch.manual_seed(0)
    lin = _converted(nn.Linear(128, 64), scaled)
    ref = nn.Linear(128, 64)
    with torch.no_grad():
        ref.weight.copy_(dequantize_weight(lin.weight, lin.scale_weight, torch.float32))
        ref.bias.copy_(lin.bias)
    x = torch.randn(4, 10, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(4, 10, 64)

    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    y.backward(grad_out)
    ref(x_ref).backward(grad_out)

    assert torch.equal(y, ref(x_ref))
    assert torch.equal(x.grad, x_ref.grad)
    assert lin.weight.grad is None and lin.bias.grad is None
    assert (FP8_DTYPE, (64, 128)) in saved
    assert not [d for d, shape in saved if shape == (64, 128) and d != FP8_DTYPE]


def test_to_fp8_keeps_identity_and_later_forward_wrappers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    lin = model[0]
    to_fp8(lin, scaled=True)
    assert model[0] is lin and type(lin) is Fp8Linear
    x = torch.randn(3, 16)
    with torch.no_grad():
        base = lin(x)
        calls = []
        lin.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
        orig = lin.forward
        lin.forward = lambda x: orig(x) + 1
        assert torch.equal(model(x), base + 1)
    assert calls == [(3, 8)]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(8, 8)
        self.attn.to_k = nn.Linear(8, 8)
        self.norm1 = nn.Module()
        self.norm1.linear = nn.Linear(8, 16)
        self.norm2 = nn.LayerNorm(8)


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, 8, 2)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.proj_out = nn.Linear(8, 4)


def test_quantize_linears_include_exclude():
    tree = _Tree()
    n = quantize_linears(tree, include=("blocks",), exclude=("norm",), scaled=True)
    converted = sorted(name for name, m in tree.named_modules() if isinstance(m, Fp8Linear))
    assert converted == [f"blocks.{i}.attn.to_{k}" for i in (0, 1) for k in "kq"]
    assert n == 4
    assert tree.blocks[0].norm1.linear.weight.dtype == torch.float32
    assert tree.proj_out.weight.dtype == torch.float32 and type(tree.proj_out) is nn.Linear
    assert type(tree.blocks[0].norm2) is nn.LayerNorm and tree.blocks[0].norm2.weight.requires_grad
    assert tree.patch_embedding.weight.dtype == torch.float32
    # A second pass converts only what is left and skips the fp8 layers.
    assert quantize_linears(tree) == 3
    assert quantize_linears(tree) == 0


def test_quantize_linears_work_device_returns_layers_home():
    tree = _Tree()
    assert quantize_linears(tree, include=("attn",), scaled=True, work_device="cpu") == 4
    q = tree.blocks[1].attn.to_q
    assert q.weight.device.type == "cpu" and q.scale_weight.device.type == "cpu"


def test_training_an_adapter_through_an_fp8_base():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)
            # LoRA-like float32 adapter on fc1.
            self.down, self.up = nn.Linear(16, 4, bias=False), nn.Linear(4, 32, bias=False)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x) + self.up(self.down(x))))

    net = Net()
    assert quantize_linears(net, include=("fc",), scaled=True) == 2
    x = torch.randn(64, 16)
    with torch.no_grad():
        target = net(x)  # reachable: the output of this base with the adapter's first random state
    nn.init.zeros_(net.up.weight)
    nn.init.normal_(net.down.weight, std=0.25)
    base = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc")}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) == 2
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # observed about 0.16
    for k, v in net.state_dict().items():
        if k.startswith("fc"):
            assert v.dtype == base[k].dtype and torch.equal(v.view(torch.uint8), base[k].view(torch.uint8))


def test_bf16_forward_and_autocast():
    torch.manual_seed(0)
    lin = _converted(nn.Linear(64, 32).to(torch.bfloat16), scaled=True)
    y = lin(torch.randn(5, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()

    lin = _converted(nn.Linear(64, 32), scaled=True)  # float32 bias and scale
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
