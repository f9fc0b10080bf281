"""quantlab.fixed_point against an independent pure-Python model of TFLite's integer arithmetic."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)


# ---- an independent reference, written from gemmlowp's fixedpoint.h with Python integers ----
def ref_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    num = ab + nudge
    q = abs(num) // (1 << 31)  # C++ division truncates toward zero
    return q if num >= 0 else -q


def ref_rdbpot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def ref_mbqm(x: int, m0: int, shift: int) -> int:
    left, right = max(-shift, 0), max(shift, 0)
    return ref_rdbpot(ref_srdhm(x * (1 << left), m0), right)


# pinned cases: (acc, M0, shift) -> result, derived with exact fractions: SRDHM rounds
# acc * M0 / 2**31 to nearest with ties upward (its nudge is 1 - 2**30 for negative products, so
# -500.5 -> -500), then RoundingDivideByPOT rounds ties away from zero.
PINNED = [
    (1000, 1 << 30, 0, 500),           # M = 0.5 exactly
    (1001, 1 << 30, 0, 501),           # 500.5 -> 501
    (-1001, 1 << 30, 0, -500),         # -500.5 -> -500 (tie upward in SRDHM)
    (1000, 1 << 30, 1, 250),           # M = 0.25
    (1002, 1 << 30, 2, 125),           # 501 / 4 = 125.25 -> 125
    (-6, 1 << 30, 1, -2),              # -3 / 2 = -1.5 -> -2 (away from zero)
    (6, 1 << 30, 1, 2),                # 3 / 2 = 1.5 -> 2
    (123456, 1518500250, 0, 87297),    # 87296.5748 -> 87297
    (987654, 1518500250, 5, 21824),    # 698377 / 32 = 21824.28 -> 21824
    (-987654, 1518500250, 5, -21824),
    (INT32_MAX, INT32_MAX, 0, INT32_MAX - 1),
    (7, 1 << 30, -1, 7),               # M = 1: left shift 1 then halve
]


@pytest.mark.parametrize("acc,m0,shift,expected", PINNED)
def test_pinned_cases(acc, m0, shift, expected):
    assert ref_mbqm(acc, m0, shift) == expected
    assert multiply_by_quantized_multiplier(torch.tensor([acc]), m0, shift).item() == expected


def test_srdhm_saturates():
    assert saturating_rounding_doubling_high_mul(torch.tensor([INT32_MIN]), INT32_MIN).item() \
        == INT32_MAX


@pytest.mark.parametrize("m,expected", [
    (0.5, (1 << 30, 0)), (0.25, (1 << 30, 1)), (1.0, (1 << 30, -1)), (0.0, (0, 0)),
    (0.75, (3 << 29, 0)),
])
def test_quantize_multiplier_pinned(m, expected):
    assert quantize_multiplier(m) == expected


@settings(max_examples=300, deadline=None)
@given(m=st.floats(1e-9, 1000.0, allow_nan=False))
def test_quantize_multiplier_is_accurate(m):
    m0, shift = quantize_multiplier(m)
    assert (1 << 30) <= m0 < (1 << 31)
    assert m0 * 2.0 ** (-31 - shift) == pytest.approx(m, rel=2**-30)


def test_quantize_multiplier_rejects():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="multiplier"):
            quantize_multiplier(bad)
    assert quantize_multiplier(1e-30) == (0, 0)


@settings(max_examples=300, deadline=None)
@given(acc=st.lists(st.integers(-(2**24), 2**24), min_size=1, max_size=20),
       m=st.floats(1e-7, 0.99), )
def test_tensor_version_equals_python_reference(acc, m):
    m0, shift = quantize_multiplier(m)
    out = multiply_by_quantized_multiplier(torch.tensor(acc), m0, shift)
    assert out.tolist() == [ref_mbqm(a, m0, shift) for a in acc]


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=20),
       e=st.integers(0, 31))
def test_rounding_divide_by_pot_equals_reference(x, e):
    assert rounding_divide_by_pot(torch.tensor(x), e).tolist() == [ref_rdbpot(v, e) for v in x]


def test_fixed_point_within_one_lsb_of_float_and_usually_equal():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-30000, 30000, (200_000,), generator=g)  # outputs within +-370
    m = 0.0123456789
    m0, shift = quantize_multiplier(m)
    fixed = multiply_by_quantized_multiplier(acc, m0, shift)
    exact = acc.double() * (m0 * 2.0 ** (-31 - shift))
    # two roundings (SRDHM, then the shift): at most half an LSB plus half of 2**-shift
    assert ((fixed.double() - exact).abs() <= 0.5 + 0.5 * 2.0**-shift + 1e-9).all()
    float_path = torch.round(acc.to(torch.float32) * torch.tensor(m, dtype=torch.float32))
    diff = (fixed - float_path.long()).abs()
    # they differ by 1 where the first rounding (to 2**-shift of an LSB) crosses a half-integer:
    # a fraction of about 2**-shift of the outputs (here shift = 6: 1.6%)
    assert diff.max().item() <= 1 and 0 < diff.float().mean().item() < 1.5 * 2.0**-shift
    assert math.isclose(m0 * 2.0 ** (-31 - shift), m, rel_tol=2**-30)


def test_bad_inputs():
    with pytest.raises(TypeError, match="acc must be an integer"):
        multiply_by_quantized_multiplier(torch.tensor([1.5]), 1 << 30, 0)
    with pytest.raises(ValueError, match="int32"):
        multiply_by_quantized_multiplier(torch.tensor([2**40]), 1 << 30, 0)
    with pytest.raises(ValueError, match="exponent"):
        rounding_divide_by_pot(torch.tensor([1]), 32)
