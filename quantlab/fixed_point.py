"""Integer-only requantization: a real multiplier as a Q31 integer and a shift (TFLite/gemmlowp).

A real multiplier ``M`` (e.g. ``S_in * S_w / S_out``) is written as::

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

from ._validate import INT32_MAX, INT32_MIN, as_real_tensor, check_real


def quantize_multiplier(multiplier: float) -> tuple[int, int]:
    """Split a real multiplier into ``(M0, shift)`` with ``M ~= M0 * 2**(-31 - shift)``.

    As TFLite's ``QuantizeMultiplier``: ``M = q * 2**e`` with ``q`` in [0.5, 1) (``frexp``),
    ``M0 = round_half_away(q * 2**31)``, ``shift = -e``. ``M0 == 2**31`` after rounding is folded
    back into the range. ``M == 0`` gives ``(0, 0)``.

    Underflow: a multiplier below ``2**-32`` (exactly: one whose ``frexp`` exponent is below -31
    after rounding ``M0``, i.e. ``M < 2**-32 * (1 - 2**-32)``) would need a right shift above 31,
    which ``rounding_divide_by_pot`` cannot do, so it flushes to ``(0, 0)`` as TFLite does. That is
    harmless for int32 accumulators: ``|acc * M| < 2**31 * 2**-32 = 0.5`` rounds to 0 anyway.
    Overflow: ``M >= 2**30`` raises.

    Args:
        multiplier: a finite real >= 0 and < 2**30.
    Returns:
        ``(M0, shift)``: python ints; ``shift`` > 0 is a right shift, < 0 a left shift.
    """
    m = check_real(multiplier, "multiplier", 0.0)
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


def _check_int32(x, name: str) -> torch.Tensor:
    x = as_real_tensor(x, name)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor or python int; got "
                        f"{x.dtype}")
    x = x.to(torch.int64)
    if x.numel() and (int(x.min()) < INT32_MIN or int(x.max()) > INT32_MAX):
        raise ValueError(f"{name} must lie within int32 [{INT32_MIN}, {INT32_MAX}]")
    return x


def _check_shift(shift, name: str, low: int) -> torch.Tensor:
    """An integer shift (python int or integer tensor) in ``low..31``, as int64."""
    t = as_real_tensor(shift, name)
    if t.is_floating_point():
        raise TypeError(f"{name} must be an int or an integer tensor in {low}..31; got "
                        f"{shift!r}" if not isinstance(shift, torch.Tensor) else
                        f"{name} must be an integer tensor in {low}..31; got dtype {t.dtype}")
    t = t.to(torch.int64)
    if bool(((t < low) | (t > 31)).any()):
        raise ValueError(f"{name} must be in {low}..31; got values in [{int(t.min())}, "
                         f"{int(t.max())}]")
    return t


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2**31)`` in int32.

    Adds a nudge of ``2**30`` (``1 - 2**30`` for negative products), then divides by ``2**31``
    truncating toward zero (C++ division), so ties round upward; ``a == b == INT32_MIN``
    saturates to ``INT32_MAX``.
    """
    a = _check_int32(a, "a")
    b = _check_int32(b, "b")
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
    x = _check_int32(x, "x")
    exponent = _check_shift(exponent, "exponent", 0)
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
    acc = _check_int32(acc, "acc")
    m0 = _check_int32(quantized_multiplier, "quantized_multiplier")
    if bool((m0 < 0).any()):
        raise ValueError("quantized_multiplier must lie in [0, 2**31) (a Q31 number from "
                         "quantize_multiplier)")
    shift = _check_shift(shift, "shift", -31)
    left = torch.clamp(-shift, min=0)
    right = torch.clamp(shift, min=0)
    shifted = torch.clamp(acc << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), right)
