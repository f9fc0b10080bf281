import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import calc_min_max, calc_scale_zero_point, quant_range
from quantlab.qparams import EPS


@pytest.mark.parametrize("bits,signed,expected", [
    (8, False, (0, 255)), (8, True, (-128, 127)), (2, True, (-2, 1)), (16, False, (0, 65535)),
    (4, False, (0, 15)),
])
def test_quant_range(bits, signed, expected):
    assert quant_range(bits, signed) == expected


@pytest.mark.parametrize("bits", [1, 17, 0, -8])
def test_quant_range_rejects_bits(bits):
    with pytest.raises(ValueError, match="num_bits"):
        quant_range(bits)


@pytest.mark.parametrize("bits", [8.0, "8", True, None])
def test_quant_range_rejects_non_int(bits):
    with pytest.raises(TypeError, match="num_bits"):
        quant_range(bits)


def test_calc_min_max_per_tensor_and_running():
    x = torch.tensor([[-1.0, 2.0], [0.5, 3.0]])
    mn, mx = calc_min_max(x)
    assert (mn.item(), mx.item()) == (-1.0, 3.0)
    mn, mx = calc_min_max(torch.tensor([-4.0, 1.0]), mn, mx)
    assert (mn.item(), mx.item()) == (-4.0, 3.0)


def test_calc_min_max_per_channel():
    w = torch.randn(5, 3, 3, 3)
    mn, mx = calc_min_max(w, axis=0)
    assert torch.equal(mn, w.amin(dim=(1, 2, 3))) and torch.equal(mx, w.amax(dim=(1, 2, 3)))
    mn1, mx1 = calc_min_max(w, axis=1)
    assert torch.equal(mn1, w.amin(dim=(0, 2, 3)))
    mn_neg, _ = calc_min_max(w, axis=-4)
    assert torch.equal(mn_neg, mn)
    mn2, mx2 = calc_min_max(w * 3, mn, mx, axis=0)
    assert torch.equal(mn2, torch.minimum(mn, (w * 3).amin(dim=(1, 2, 3))))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([1, 2, 3]), TypeError, "floating-point"),
    (torch.tensor([]), ValueError, "empty"),
    (torch.tensor([1.0, float("nan")]), ValueError, "finite"),
    (torch.tensor([1.0, float("inf")]), ValueError, "finite"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_calc_min_max_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        calc_min_max(bad)


def test_calc_min_max_rejects_axis_and_shapes():
    with pytest.raises(ValueError, match="axis"):
        calc_min_max(torch.randn(2, 3), axis=2)
    with pytest.raises(ValueError, match="min_val must have shape"):
        calc_min_max(torch.randn(2, 3), torch.zeros(3), torch.zeros(3), axis=0)
    with pytest.raises(ValueError, match="both"):
        calc_min_max(torch.randn(2, 3), torch.tensor(0.0), None)


def test_scale_zero_point_affine_matches_formula():
    scale, zp = calc_scale_zero_point(-1.0, 3.0, 8)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == round(1.0 / (4.0 / 255)) and zp.dtype == torch.int32


def test_range_includes_zero():
    # an all-positive range is widened to [0, max]: real 0 maps exactly to the zero point 0
    scale, zp = calc_scale_zero_point(2.0, 10.0, 8)
    assert zp.item() == 0 and scale.item() == pytest.approx(10.0 / 255)
    scale, zp = calc_scale_zero_point(-10.0, -2.0, 8)
    assert zp.item() == 255


def test_symmetric_signed_and_unsigned():
    scale, zp = calc_scale_zero_point(-0.5, 2.0, 8, signed=True, symmetric=True)
    assert zp.item() == 0 and scale.item() == pytest.approx(2.0 / 127.5)
    scale, zp = calc_scale_zero_point(-0.5, 2.0, 8, signed=False, symmetric=True)
    assert zp.item() == 128


@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_ranges_are_finite(symmetric):
    scale, zp = calc_scale_zero_point(torch.zeros(3), torch.zeros(3), 8, True, symmetric)
    assert torch.all(scale == EPS) and torch.all(torch.isfinite(scale))
    scale, zp = calc_scale_zero_point(1.5, 1.5, 8, False, symmetric)
    assert math.isfinite(scale.item()) and scale.item() > 0


def test_scale_zero_point_rejects():
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        calc_scale_zero_point(1.0, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        calc_scale_zero_point(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        calc_scale_zero_point(float("-inf"), 1.0)
    with pytest.raises(ValueError, match="num_bits"):
        calc_scale_zero_point(0.0, 1.0, num_bits=1)
    with pytest.raises(TypeError, match="symmetric"):
        calc_scale_zero_point(0.0, 1.0, symmetric="yes")


def test_zero_point_rounds_half_to_even():
    # min/scale lands exactly on -2.5 -> zero point rounds to 2 (even), not 3
    scale, zp = calc_scale_zero_point(-2.5, 252.5, 8)
    assert scale.item() == 1.0 and zp.item() == 2
    scale, zp = calc_scale_zero_point(-3.5, 251.5, 8)
    assert zp.item() == 4


def test_matches_pytorch_observer():
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    torch.manual_seed(0)
    x = torch.randn(16, 8) * 3 + 1
    obs = MinMaxObserver(dtype=torch.quint8)
    obs(x)
    s_ref, z_ref = obs.calculate_qparams()
    s, z = calc_scale_zero_point(*calc_min_max(x))
    assert torch.equal(s, s_ref.reshape(())) and z.item() == z_ref.item()
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    obs(x)
    s_ref, z_ref = obs.calculate_qparams()
    s, z = calc_scale_zero_point(*calc_min_max(x, axis=0), signed=True, symmetric=True)
    assert torch.equal(s, s_ref.float()) and torch.equal(z.long(), z_ref.long())


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(a=finite, b=finite, bits=st.integers(2, 16), signed=st.booleans(), sym=st.booleans())
def test_zero_is_exact_and_zero_point_in_range(a, b, bits, signed, sym):
    lo, hi = min(a, b), max(a, b)
    scale, zp = calc_scale_zero_point(lo, hi, bits, signed, sym)
    qmin, qmax = quant_range(bits, signed)
    assert qmin <= zp.item() <= qmax and scale.item() > 0
    # real 0 is quantized to the zero point exactly, and dequantizes to exactly 0
    from quantlab import dequantize, quantize
    q0 = quantize(torch.zeros(1), scale, zp, bits, signed)
    assert q0.item() == zp.item() and dequantize(q0, scale, zp).item() == 0.0


any_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
tiny = st.floats(-(2.0**-100), 2.0**-100, width=32)


@settings(max_examples=300, deadline=None)
@given(a=any_float32 | finite | tiny, b=any_float32 | finite | tiny, bits=st.integers(2, 16),
       signed=st.booleans())
def test_the_zero_points_clamp_never_acts_once_the_range_includes_zero(a, b, bits, signed):
    # the docstring's (and notebook a's) claim: Z = q_min - round(r_min / S) lies in [q_min, q_max]
    # before the clamp, for any range (widened to include 0), so the clamp is only PyTorch's guard
    lo, hi = min(a, b), max(a, b)
    scale, zp = calc_scale_zero_point(lo, hi, bits, signed)
    qmin, qmax = quant_range(bits, signed)
    r_min = torch.clamp(torch.tensor(lo, dtype=torch.float32), max=0.0)
    unclamped = qmin - int(torch.round(r_min / scale))
    assert qmin <= unclamped <= qmax and unclamped == zp.item()
