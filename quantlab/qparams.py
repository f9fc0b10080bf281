"""Ranges, scale and zero point: the qparams of affine quantization.

Real value ``r`` and integer ``q`` are related by ``r = scale * (q - zero_point)``.
Taught in notebook ``a_basic_quant``.
"""

from __future__ import annotations

import torch

from ._validate import as_real_tensor, check_bool, check_finite_reduction, check_float_tensor, check_int

__all__ = ["EPS", "MIN_BITS", "MAX_BITS", "check_num_bits", "quant_range", "check_float_tensor",
           "check_axis", "calc_min_max", "calc_scale_zero_point"]

#: smallest scale we ever return (PyTorch observers use the same floor)
EPS = torch.finfo(torch.float32).eps

MIN_BITS, MAX_BITS = 2, 16


def check_num_bits(num_bits, name: str = "num_bits") -> int:
    """Return ``num_bits`` as an int, or raise (naming ``name``) unless it is an int in 2..16."""
    return check_int(num_bits, name, MIN_BITS, MAX_BITS)


def quant_range(num_bits: int = 8, signed: bool = False) -> tuple[int, int]:
    """The integer range of a ``num_bits`` quantized value.

    Returns:
        ``(quant_min, quant_max)``: ``(0, 2**b - 1)`` unsigned, ``(-2**(b-1), 2**(b-1) - 1)`` signed.
    """
    b = check_num_bits(num_bits)
    if check_bool(signed, "signed"):
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


def check_axis(axis, ndim: int, name: str = "axis") -> int | None:
    """Normalise a channel axis (negative allowed) or raise if it is out of range."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name} must be None or an int; got {axis!r}")
    if ndim == 0:
        raise ValueError(f"{name}={axis} needs a tensor with at least 1 dimension; got a 0-d one")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be None or in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor; "
                         f"got {axis}")
    return axis % ndim


def calc_min_max(x: torch.Tensor, min_val=None, max_val=None, axis: int | None = None):
    """Running min and max of ``x`` (the original's ``calcu_max_and_min``).

    Args:
        x: float tensor of any shape.
        min_val, max_val: the range observed so far (None for the first batch); float tensors of
            shape ``()`` per tensor or ``(x.shape[axis],)`` per channel.
        axis: None for one range for the whole tensor, or the channel axis for one range per
            channel (e.g. 0 for conv weights of shape (C_out, C_in, kH, kW)).

    Returns:
        ``(min_val, max_val)`` float32 tensors, the range of ``x`` merged with the previous one.
    """
    check_float_tensor(x, finite=False)  # checked below, on the min and max (one pass less)
    axis = check_axis(axis, x.dim())
    x = x.detach().to(torch.float32)
    if axis is None:
        cur_min, cur_max = x.min(), x.max()
    else:
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
        cur_min, cur_max = flat.min(dim=1).values, flat.max(dim=1).values
    check_finite_reduction(cur_min, cur_max)
    if (min_val is None) != (max_val is None):
        raise ValueError("min_val and max_val must both be None or both be given")
    if min_val is None:
        return cur_min, cur_max
    min_val = as_real_tensor(min_val, "min_val").to(torch.float32)
    max_val = as_real_tensor(max_val, "max_val").to(torch.float32)
    for name, v in (("min_val", min_val), ("max_val", max_val)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite")
        if v.shape != cur_min.shape:
            raise ValueError(f"{name} must have shape {tuple(cur_min.shape)} for axis={axis}; "
                             f"got {tuple(v.shape)}")
    return torch.minimum(min_val, cur_min), torch.maximum(max_val, cur_max)


def calc_scale_zero_point(min_val, max_val, num_bits: int = 8, signed: bool = False,
                          symmetric: bool = False):
    """Scale and zero point for a range (the original's ``calcu_scale_and_zeropoint``).

    The range is first widened to include 0, so real 0 (padding, ReLU) is exactly representable.

    Affine:     ``scale = (max - min) / (quant_max - quant_min)``,
                ``zero_point = quant_min - round(min / scale)``, clamped to the range (PyTorch's
                guard: with 0 in the range the unclamped value already lies in it, so the clamp
                never acts).
    Symmetric:  ``scale = max(|min|, |max|) / ((quant_max - quant_min) / 2)``; zero point 0 when
                ``signed``, the middle ``2**(num_bits-1)`` when unsigned (PyTorch's 128 for its default
                8-bit range; its observers take ``(quant_min + quant_max) // 2`` for other ranges).

    ``scale`` is floored at ``EPS`` so that ``min == max`` and all-zero channels give finite qparams;
    rounding is half to even (``torch.round``), as every PyTorch engine. The arithmetic is float32,
    as PyTorch's observers; a range too wide for float32 (``max - min`` above 3.4e38, e.g.
    ``(-3e38, 3e38)``) is computed in float64 instead, so every finite range gives a finite scale.

    Args:
        min_val, max_val: floats or float tensors of the same shape: ``()`` or ``(C,)``.
    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the same shape as ``min_val``.
    """
    quant_min, quant_max = quant_range(num_bits, signed)
    symmetric = check_bool(symmetric, "symmetric")
    min_val = as_real_tensor(min_val, "min_val").to(torch.float32)
    max_val = as_real_tensor(max_val, "max_val").to(torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape; got {tuple(min_val.shape)}"
                         f" and {tuple(max_val.shape)}")
    if min_val.dim() > 1:
        raise ValueError(f"min_val must be a scalar or a 1-d per-channel tensor; got shape "
                         f"{tuple(min_val.shape)}")
    if not bool(torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("min_val and max_val must be finite (as float32: |value| <= 3.4e38)")
    if bool((min_val > max_val).any()):
        raise ValueError("min_val must be <= max_val (element-wise); got min_val > max_val")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / ((quant_max - quant_min) / 2), min=EPS)  # finite: levels >= 3
        mid = 0 if signed else (quant_min + quant_max + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
    else:
        span = max_pos - min_neg  # can overflow float32 for a finite range: then use float64
        scale = span / float(quant_max - quant_min)
        if not bool(torch.isfinite(span).all()):
            wide = (max_pos.double() - min_neg.double()) / float(quant_max - quant_min)
            scale = torch.where(torch.isfinite(span), scale, wide.to(torch.float32))
        scale = torch.clamp(scale, min=EPS)
        zero_point = quant_min - torch.round(min_neg / scale)
        zero_point = torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)
    return scale.to(torch.float32), zero_point
