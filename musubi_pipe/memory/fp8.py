"""fp8 weight storage for frozen base models (musubi-tuner's --fp8_base and --fp8_scaled).

The frozen nn.Linear weights of a base model are stored in float8_e4m3fn (one byte per weight instead
of two for bf16); every forward and backward dequantizes the weight to the input's dtype for the
matmul and drops it again, so only one layer's float copy exists at a time. Plain mode is a clamped
cast; scaled mode keeps one absmax scale per block of 64 input features (musubi-tuner's block-wise
fp8_optimization_utils), which is far more accurate for weights with a wide dynamic range.

    from musubi_pipe.memory.fp8 import quantize_linears
    n = quantize_linears(dit, exclude=("norm", "embedding"), scaled=True, work_device="cuda")
    # then wrap the layers with LoRA; the converted layers themselves are frozen

Call `model.to(dtype)` before converting: a later `.to(dtype)` upcasts the fp8 weights too (results
stay right, the memory saving is lost). Convert before anything replaces a layer's `forward` with an
instance attribute, since such a wrapper captures the class forward of that moment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_SIZE = 64


def _scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The scale is stored in the weight's dtype; its floor must survive that rounding (1e-8 is 0 in
    # fp16, which would divide by zero), so it is at least the dtype's smallest normal number.
    floor = max(1e-8, torch.finfo(dtype).tiny)
    return (amax / FP8_MAX).clamp(min=floor).to(dtype)


def quantize_weight(
    weight: torch.Tensor, scaled: bool, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize a weight to float8_e4m3fn; return (fp8 tensor of the same shape, scale or None).

    Plain (`scaled=False`): a clamped cast, scale None. Scaled: the scale, in the weight's dtype, has
    shape [out, in/block_size, 1] for a 2-D weight whose `in` is a multiple of block_size, [out, 1]
    (one per row) for other 2-D weights and [1] for any other shape; weight ≈ fp8 · scale per block.
    Raises ValueError for a weight that is not floating point or already fp8.
    """
    # element_size 1 among floating dtypes means one of the float8 variants.
    if not weight.is_floating_point() or weight.element_size() == 1:
        raise ValueError(f"cannot quantize a {weight.dtype} weight to fp8")
    weight = weight.detach()
    if not scaled:
        # Clamp first: out-of-range casts to e4m3fn are NaN on some backends (no infinity in fn).
        return weight.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    w = weight.float()  # amax and division in float32 whatever the storage dtype
    if w.dim() == 2 and w.shape[1] % block_size == 0:
        w = w.unflatten(1, (-1, block_size))
        scale = _scale_of(w.abs().amax(dim=-1, keepdim=True), weight.dtype)
    elif w.dim() == 2:
        scale = _scale_of(w.abs().amax(dim=1, keepdim=True), weight.dtype)
    else:
        scale = _scale_of(w.abs().amax().reshape(1), weight.dtype)
    # Divide by the stored (rounded) scale, the one dequantizing multiplies by, not its float32 value.
    q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(weight.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Return the weight held by (q, scale) from `quantize_weight` as a new tensor in `dtype`, shape of q."""
    w = q.to(dtype)
    if scale is None:
        return w
    scale = scale.to(dtype)
    if scale.dim() == 3:  # block-wise: [out, in/block, 1]
        return (w.unflatten(1, (scale.shape[1], -1)) * scale).flatten(1)
    return w * scale  # [out, 1] and [1] broadcast as they are


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b, saving only the fp8 weight and its scale for backward."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        # The dequantized weight is a temporary: saving it would keep a float copy of every layer's
        # weight alive from forward to backward, which is what fp8 storage is meant to avoid.
        ctx.save_for_backward(q, scale)
        w = dequantize_weight(q, scale, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(dequantize_weight(q, scale, grad_out.dtype))
        return grad_x, None, None, None  # frozen base: no gradient for weight, scale or bias


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen `weight` holds fp8 data and buffer `scale_weight` its scale (or None).

    Made by `to_fp8` from an existing nn.Linear, never constructed directly. Compute runs in the input's
    dtype; under autocast the input is first cast to the autocast dtype, so forward returns that dtype.
    """

    scale_weight: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x @ W^T + b computed in x's dtype (the autocast dtype when autocast is on)."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        return _Fp8LinearFunction.apply(x, self.weight, self.scale_weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight.dtype}, scaled={self.scale_weight is not None}"


def _install(linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(q, requires_grad=False)
    linear.register_buffer("scale_weight", scale)
    if linear.bias is not None:
        # The Function returns no bias gradient; a trainable bias would silently never learn.
        linear.bias.requires_grad_(False)
    # In place, so references, hooks and the module tree keep pointing at this object. A subclass's
    # own forward is replaced by Fp8Linear's.
    linear.__class__ = Fp8Linear


def to_fp8(linear: nn.Linear, scaled: bool) -> None:
    """Turn `linear` into a frozen Fp8Linear in place (weight and bias stop requiring grad).

    Raises ValueError if its weight is not floating point or is already fp8.
    """
    q, scale = quantize_weight(linear.weight, scaled)
    _install(linear, q, scale)


def quantize_linears(
    model: nn.Module,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    scaled: bool = False,
    work_device: torch.device | str | None = None,
) -> int:
    """Convert the nn.Linear modules of `model` to Fp8Linear in place; return how many were converted.

    A module is converted when its name (from `named_modules`) contains one of `include` (empty: all)
    and none of `exclude`; modules already Fp8Linear are skipped. With `work_device`, each weight is
    quantized there (fast on a GPU) and the result moved back to the weight's own device, so a model
    held in CPU memory has at most one layer's weight on the GPU at a time.
    Raises ValueError (from `quantize_weight`) for a matching layer whose weight cannot be quantized.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, Fp8Linear):
            continue
        if include and not any(s in name for s in include):
            continue
        if any(s in name for s in exclude):
            continue
        weight = module.weight.detach()
        home = weight.device
        if work_device is not None:
            weight = weight.to(work_device)
        q, scale = quantize_weight(weight, scaled)
        _install(module, q.to(home), None if scale is None else scale.to(home))
        count += 1
    return count


def fp8_bytes(model: nn.Module) -> int:
    """Return the bytes held by the fp8 weights and scales of the Fp8Linear modules in `model`."""
    total = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            total += module.weight.nbytes
            if module.scale_weight is not None:
                total += module.scale_weight.nbytes
    return total
