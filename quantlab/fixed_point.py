"""Integer-only requantization: a real multiplier as a Q31 integer and a shift (TFLite/gemmlowp).

A real multiplier ``M`` (e.g. ``S_in * S_w / S_out``) is written as

    M ~= M0 * 2**-31 * 2**-shift,   M0 in [2**30, 2**31)  (a Q31 fixed-point number in [0.5, 1))

and ``acc * M`` is computed with integers only:
``rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, M0), shift)``, exactly as
TFLite's ``MultiplyByQuantizedMultiplier``. Note the sign convention: quantlab's ``shift`` is a
*right* shift (``shift = -exponent``; TFLite stores the exponent). Taught in notebook
``e_conv_quantization_walkthrough``.

The tensor functions compute in int64 and return int64; inputs must be within int32.
"""

from __future__ import annotations

import math

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(multiplier: float) -> tuple[int, int]:
    """Split a real multiplier into ``(M0, shift)`` with ``M ~= M0 * 2**(-31 - shift)``.

    As TFLite's ``QuantizeMultiplier``: ``M = q * 2**e`` with ``q`` in [0.5, 1) (``frexp``),
    ``M0 = round_half_away(q * 2**31)``, ``shift = -e``. ``M0 == 2**31`` after rounding is folded
    back into the range. ``M == 0`` gives ``(0, 0)``. Multipliers below ``2**-62`` underflow to 0.

    Args:
        multiplier: a finite real >= 0.
    Returns:
        ``(M0, shift)``: python ints; ``shift`` > 0 is a right shift, < 0 a left shift.
    """
    m = float(multiplier)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"multiplier must be finite and >= 0; got {multiplier!r}")
    if m == 0.0:
        return 0, 0
    q, exponent = math.frexp(m)
    q_fixed = int(math.floor(q * 2**31 + 0.5))  # round half away from zero (q > 0)
    if q_fixed == 2**31:
        q_fixed //= 2
        exponent += 1
    if exponent < -31:  # too small to represent: TFLite flushes to zero
        return 0, 0
    if exponent > 30:
        raise ValueError(f"multiplier must be < 2**30; got {multiplier!r}")
    return q_fixed, -exponent


def _check_int32(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got {x.dtype}")
    x = x.to(torch.int64)
    if x.numel() and (int(x.min()) < INT32_MIN or int(x.max()) > INT32_MAX):
        raise ValueError(f"{name} must lie within int32 [{INT32_MIN}, {INT32_MAX}]")
    return x


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2**31)`` in int32.

    Adds a nudge of ``2**30`` (``1 - 2**30`` for negative products), then divides by ``2**31``
    truncating toward zero (C++ division), so ties round upward; ``a == b == INT32_MIN``
    saturates to ``INT32_MAX``.
    """
    a = _check_int32(torch.as_tensor(a), "a")
    b = _check_int32(torch.as_tensor(b), "b")
    ab = a * b  # |ab| <= 2**62: exact in int64
    negative = (ab < 0).to(torch.int64)
    # ab + nudge, with nudge = 2**30 or 1 - 2**30 = 2**30 - (2**31 - 1)
    x = ab.add_(1 << 30).sub_(negative * ((1 << 31) - 1))
    # division by 2**31 truncating toward zero: add 2**31 - 1 to negative x, then shift
    high = x.add_((x < 0).to(torch.int64) * ((1 << 31) - 1)).bitwise_right_shift_(31)
    if bool((b == INT32_MIN).any()):
        overflow = (a == INT32_MIN) & (b == INT32_MIN)
        high = torch.where(overflow, torch.tensor(INT32_MAX), high)
    return high


def rounding_divide_by_pot(x: torch.Tensor, exponent) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero."""
    x = _check_int32(torch.as_tensor(x), "x")
    exponent = torch.as_tensor(exponent, dtype=torch.int64)
    if bool(((exponent < 0) | (exponent > 31)).any()):
        raise ValueError("exponent must be in 0..31")
    mask = (torch.ones_like(exponent) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(acc: torch.Tensor, quantized_multiplier,
                                     shift) -> torch.Tensor:
    """TFLite's ``MultiplyByQuantizedMultiplier``: ``acc * M0 * 2**(-31 - shift)``, integers only.

    Args:
        acc: integer tensor (int32 range), e.g. an accumulator plus bias.
        quantized_multiplier, shift: from :func:`quantize_multiplier`; scalars or tensors that
            broadcast against ``acc`` (per channel).
    Returns:
        int64 tensor (values in int32 range).
    """
    acc = _check_int32(torch.as_tensor(acc), "acc")
    m0 = torch.as_tensor(quantized_multiplier, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left = torch.clamp(-shift, min=0)
    right = torch.clamp(shift, min=0)
    shifted = torch.clamp(acc << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), right)
