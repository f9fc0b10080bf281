"""Quantize, dequantize and fake-quantize tensors (per tensor or per channel).

``q = clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max)`` and
``x_hat = scale * (q - zero_point)``. Taught in notebook ``a_basic_quant``.

Like PyTorch, we multiply by the float32 reciprocal of the scale instead of dividing by it. The
float32 product ``x * f32(1/scale)`` carries two roundings, so not only exact ``.5`` ties move: the
result differs from rounding the exact quotient ``x / scale`` by one step (never more) on values
within a few float32 ulps of a half-way point, i.e. on about 1 value in a million at 8 bits and about
3 in 10,000 at 16 bits (measured on normal data: 7.5e-7 and 2.6e-4; the product's ulp grows with
``|q|``). It is what PyTorch's ``quantize_per_tensor`` computes.

Accepted qparams: ``scale`` finite, > 0 and with a finite float32 reciprocal (``scale >= 2.94e-39``,
i.e. ``1 / 3.4e38``; PyTorch's floor, float32 eps, is far above it), ``zero_point`` an integer inside
``[quant_min, quant_max]``. Anything else raises, so the result is always inside the integer range.
"""

from __future__ import annotations

import torch

from ._validate import INT32_MAX, INT32_MIN, as_real_tensor, check_int_tensor
from .qparams import check_axis, check_float_tensor, quant_range


def _broadcast(v: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Shape a per-channel vector so it broadcasts along ``axis`` of an ``ndim``-d tensor."""
    if axis is None:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _qparams(x: torch.Tensor, scale, zero_point, axis, zp_range=(INT32_MIN, INT32_MAX),
             zp_where="int32"):
    """Validate ``scale``/``zero_point`` against ``x`` and ``axis``; return broadcastable tensors."""
    axis = check_axis(axis, x.dim())
    scale = as_real_tensor(scale, "scale")
    zero_point = as_real_tensor(zero_point, "zero_point")
    want = () if axis is None else (x.shape[axis],)
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        if tuple(v.shape) != want and not (axis is None and v.numel() == 1):
            raise ValueError(
                f"{name} must have shape {want} for axis={axis} and a tensor of shape "
                f"{tuple(x.shape)}; got {tuple(v.shape)}")
    if zero_point.is_floating_point():
        if not bool(torch.isfinite(zero_point).all()):
            raise ValueError("zero_point must hold finite integers; got inf or NaN")
        if not bool((zero_point == torch.round(zero_point)).all()):
            raise ValueError("zero_point must hold integers")
        zero_point = zero_point.to(torch.float64)
    lo, hi = zp_range
    if bool(((zero_point < lo) | (zero_point > hi)).any()):
        raise ValueError(f"zero_point must lie in [{lo}, {hi}] ({zp_where}); got values in "
                         f"[{zero_point.min().item():g}, {zero_point.max().item():g}]")
    zero_point = zero_point.to(torch.int64)
    scale64 = scale.to(torch.float64)
    scale = scale.to(torch.float32)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    if not bool((scale64 > 0).all() and torch.isfinite(scale64).all()):
        raise ValueError("scale must be finite and > 0")
    if not bool((scale > 0).all() and torch.isfinite(1.0 / scale).all() and
                torch.isfinite(scale).all()):
        # 1/scale overflows float32 below 2.94e-39 (and 0 * inf would be NaN): refuse
        raise ValueError(f"scale must be >= {1 / torch.finfo(torch.float32).max:.3g} (its float32 "
                         f"reciprocal must be finite) and <= 3.4e38; got a minimum of "
                         f"{scale64.min().item():g}")
    return _broadcast(scale, x.dim(), axis), _broadcast(zero_point, x.dim(), axis)


def _round_and_clamp(x, scale, zero_point, quant_min, quant_max):
    """Float32 ``clamp(rne(x * f32(1/scale)) + zero_point)`` as floats (exact small integers)."""
    inv_scale = 1.0 / scale  # float32 reciprocal, as PyTorch's kernels
    q = torch.round(x.to(torch.float32) * inv_scale) + zero_point.to(torch.float32)
    return torch.clamp(q, quant_min, quant_max)


def quantize(x: torch.Tensor, scale, zero_point, num_bits: int = 8, signed: bool = False,
             axis: int | None = None) -> torch.Tensor:
    """Quantize a float tensor to integers (the original's ``quantize_tensor``).

    Args:
        x: float tensor.
        scale, zero_point: shape ``()`` per tensor, or ``(x.shape[axis],)`` per channel.
        num_bits, signed: the integer range (see :func:`quant_range`).
        axis: the channel axis for per-channel qparams, None per tensor.
    Returns:
        int32 tensor of the shape of ``x`` with values in ``[quant_min, quant_max]``;
        rounding is half to even of ``x * f32(1/scale)`` (see the module docstring for how often
        that differs from rounding ``x / scale``: one step, on about 3e-4 of values at 16 bits).
    Raises:
        TypeError, ValueError: naming the argument (``x``, ``scale``, ``zero_point``, ``num_bits``,
        ``signed``, ``axis``); e.g. a scale below 2.94e-39, whose float32 reciprocal is inf.
    """
    check_float_tensor(x)
    quant_min, quant_max = quant_range(num_bits, signed)
    scale, zero_point = _qparams(x, scale, zero_point, axis, (quant_min, quant_max),
                                 f"the {num_bits}-bit range")
    return _round_and_clamp(x.detach(), scale, zero_point, quant_min, quant_max).to(torch.int32)


def dequantize(q: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    """Map integers back to reals: ``scale * (q - zero_point)`` in float32
    (the original's ``dequantize_tensor``).

    Args:
        q: integer tensor (any integer dtype; int32 from :func:`quantize`).
    Returns:
        float32 tensor of the shape of ``q``.
    """
    check_int_tensor(q, "q")
    scale, zero_point = _qparams(q, scale, zero_point, axis)
    return (q.to(torch.int64) - zero_point).to(torch.float32) * scale


class _FakeQuantizeSTE(torch.autograd.Function):
    """dequantize(quantize(x)) forward; straight-through gradient inside the clamp range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):
        inv_scale = 1.0 / scale
        q = torch.round(x * inv_scale) + zero_point.to(torch.float32)
        inside = (q >= quant_min) & (q <= quant_max)
        ctx.save_for_backward(inside)
        q = torch.clamp(q, quant_min, quant_max)
        return (q - zero_point.to(torch.float32)) * scale

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None


def fake_quantize(x: torch.Tensor, scale, zero_point, num_bits: int = 8, signed: bool = False,
                  axis: int | None = None, *, check_finite: bool = True) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32, differentiable with a straight-through estimator.

    The gradient is passed through unchanged where ``x`` quantizes inside
    ``[quant_min, quant_max]`` and is zero where it is clamped (as
    ``torch.fake_quantize_per_tensor_affine``). Used for calibration and QAT.
    ``check_finite=False`` skips the pass that checks every value of ``x`` is finite, for a
    caller that has just checked it (an observer's min and max of ``x`` are finite).
    """
    check_float_tensor(x, finite=check_finite)
    quant_min, quant_max = quant_range(num_bits, signed)
    scale, zero_point = _qparams(x, scale, zero_point, axis, (quant_min, quant_max),
                                 f"the {num_bits}-bit range")
    return _FakeQuantizeSTE.apply(x.to(torch.float32), scale, zero_point, quant_min, quant_max)
