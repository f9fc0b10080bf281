"""Ranges, scale and zero point: the qparams of affine quantization.

Real value ``r`` and integer ``q`` are related by ``r = scale * (q - zero_point)``.
Taught in notebook ``a_basic_quant``.
"""

from __future__ import annotations

import torch

#: smallest scale we ever return (PyTorch observers use the same floor)
EPS = torch.finfo(torch.float32).eps

MIN_BITS, MAX_BITS = 2, 16


def check_num_bits(num_bits) -> int:
    """Return ``num_bits`` as an int, or raise if it is not an integer in 2..16."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise TypeError(f"num_bits must be an int in {MIN_BITS}..{MAX_BITS}; got {num_bits!r}")
    if not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be in {MIN_BITS}..{MAX_BITS}; got {num_bits}")
    return num_bits


def quant_range(num_bits: int = 8, signed: bool = False) -> tuple[int, int]:
    """The integer range of a ``num_bits`` quantized value.

    Returns:
        ``(quant_min, quant_max)``: ``(0, 2**b - 1)`` unsigned, ``(-2**(b-1), 2**(b-1) - 1)`` signed.
    """
    b = check_num_bits(num_bits)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be True or False; got {signed!r}")
    if signed:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


def check_float_tensor(x, name: str = "x") -> torch.Tensor:
    """Raise unless ``x`` is a non-empty floating-point tensor of finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of floats; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must hold only finite values (no NaN or inf)")
    return x


def check_axis(axis, ndim: int, name: str = "axis") -> int | None:
    """Normalise a channel axis (negative allowed) or raise if it is out of range."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name} must be None or an int; got {axis!r}")
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
    check_float_tensor(x)
    axis = check_axis(axis, x.dim())
    x = x.detach().to(torch.float32)
    if axis is None:
        cur_min, cur_max = x.min(), x.max()
    else:
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
        cur_min, cur_max = flat.min(dim=1).values, flat.max(dim=1).values
    if (min_val is None) != (max_val is None):
        raise ValueError("min_val and max_val must both be None or both be given")
    if min_val is None:
        return cur_min, cur_max
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    for name, v in (("min_val", min_val), ("max_val", max_val)):
        if v.shape != cur_min.shape:
            raise ValueError(f"{name} must have shape {tuple(cur_min.shape)} for axis={axis}; "
                             f"got {tuple(v.shape)}")
    return torch.minimum(min_val, cur_min), torch.maximum(max_val, cur_max)


def calc_scale_zero_point(min_val, max_val, num_bits: int = 8, signed: bool = False,
                          symmetric: bool = False):
    """Scale and zero point for a range (the original's ``calcu_scale_and_zeropoint``).

    The range is first widened to include 0, so real 0 (padding, ReLU) is exactly representable.

    Affine:     ``scale = (max - min) / (quant_max - quant_min)``,
                ``zero_point = quant_min - round(min / scale)``, clamped to the range.
    Symmetric:  ``scale = max(|min|, |max|) / ((quant_max - quant_min) / 2)``; zero point 0 when
                ``signed``, the middle ``2**(num_bits-1)`` when unsigned (as PyTorch).

    ``scale`` is floored at ``EPS`` so that ``min == max`` and all-zero channels give finite qparams;
    rounding is half to even (``torch.round``), as every PyTorch engine.

    Args:
        min_val, max_val: floats or float tensors of the same shape: ``()`` or ``(C,)``.
    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the same shape as ``min_val``.
    """
    quant_min, quant_max = quant_range(num_bits, signed)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False; got {symmetric!r}")
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape; got {tuple(min_val.shape)}"
                         f" and {tuple(max_val.shape)}")
    if min_val.dim() > 1:
        raise ValueError(f"min_val must be a scalar or a 1-d per-channel tensor; got shape "
                         f"{tuple(min_val.shape)}")
    if not bool(torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("min_val and max_val must be finite")
    if bool((min_val > max_val).any()):
        raise ValueError("min_val must be <= max_val (element-wise); got min_val > max_val")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / ((quant_max - quant_min) / 2), min=EPS)
        mid = 0 if signed else (quant_min + quant_max + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(quant_max - quant_min), min=EPS)
        zero_point = quant_min - torch.round(min_neg / scale)
        zero_point = torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)
    return scale.to(torch.float32), zero_point
