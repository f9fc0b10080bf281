import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantlab import (
    calc_min_max,
    calc_scale_zero_point,
    dequantize,
    fake_quantize,
    quant_range,
    quantize,
)

arrays = hnp.arrays(
    dtype="float32", shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(-100, 100, allow_nan=False, width=32))


def qparams_for(x, bits=8, signed=False, symmetric=False, axis=None):
    return calc_scale_zero_point(*calc_min_max(x, axis=axis), bits, signed, symmetric)


@settings(max_examples=200, deadline=None)
@given(a=arrays, bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans())
def test_integers_in_range_and_error_at_most_half_scale(a, bits, signed, symmetric):
    x = torch.from_numpy(a)
    scale, zp = qparams_for(x, bits, signed, symmetric)
    q = quantize(x, scale, zp, bits, signed)
    qmin, qmax = quant_range(bits, signed)
    assert q.dtype == torch.int32 and int(q.min()) >= qmin and int(q.max()) <= qmax
    x_hat = dequantize(q, scale, zp)
    assert x_hat.dtype == torch.float32
    # inside the representable range the error is at most half a step (plus float32 rounding)
    lo, hi = scale * (qmin - zp), scale * (qmax - zp)
    inside = (x >= lo) & (x <= hi)
    err = (x_hat - x).abs()[inside]
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()).all())


@settings(max_examples=150, deadline=None)
@given(a=arrays, bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans(),
       data=st.data())
def test_per_channel_equals_per_tensor_per_channel(a, bits, signed, symmetric, data):
    x = torch.from_numpy(a)
    axis = data.draw(st.integers(0, x.dim() - 1))
    scale, zp = qparams_for(x, bits, signed, symmetric, axis)
    q = quantize(x, scale, zp, bits, signed, axis=axis)
    for c in range(x.shape[axis]):
        xc = x.select(axis, c)
        qc = quantize(xc, scale[c], zp[c], bits, signed)
        assert torch.equal(q.select(axis, c), qc)
        assert torch.equal(dequantize(q, scale, zp, axis).select(axis, c),
                           dequantize(qc, scale[c], zp[c]))


@settings(max_examples=200, deadline=None)
@given(a=arrays, bits=st.integers(2, 16), symmetric=st.booleans())
def test_matches_pytorch_fake_quantize_per_tensor(a, bits, symmetric):
    x = torch.from_numpy(a)
    signed = symmetric
    scale, zp = qparams_for(x, bits, signed, symmetric)
    qmin, qmax = quant_range(bits, signed)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), zp.item(), qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, zp, bits, signed), ref)
    assert torch.equal(dequantize(quantize(x, scale, zp, bits, signed), scale, zp), ref)


@settings(max_examples=150, deadline=None)
@given(a=arrays, bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans(),
       data=st.data())
def test_matches_pytorch_fake_quantize_per_channel(a, bits, signed, symmetric, data):
    x = torch.from_numpy(a)
    axis = data.draw(st.integers(0, x.dim() - 1))
    scale, zp = qparams_for(x, bits, signed, symmetric, axis)
    qmin, qmax = quant_range(bits, signed)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, zp, bits, signed, axis), ref)


def test_ties_round_half_to_even_like_pytorch():
    # scale 0.5 has an exact reciprocal: k/4 hits every .5 tie
    x = torch.arange(-40, 41, dtype=torch.float32) / 4
    q = quantize(x, torch.tensor(0.5), torch.tensor(0), 8, signed=True)
    assert torch.equal(q, torch.round(x * 2).to(torch.int32))
    assert q[x == 0.25].item() == 0 and q[x == 0.75].item() == 2 and q[x == -0.25].item() == 0
    ref = torch.fake_quantize_per_tensor_affine(x, 0.5, 0, -128, 127)
    assert torch.equal(fake_quantize(x, 0.5, 0, 8, True), ref)


def test_reciprocal_multiplication_not_division():
    # find a case where x / s and x * f32(1/s) round to different integers: we follow PyTorch
    s = torch.tensor(0.05062565952539444, dtype=torch.float32)
    k = torch.arange(-30000, 30000, dtype=torch.float32)
    x = (k + 0.5) * s  # near ties
    div = torch.round(x / s)
    mul = torch.round(x * (1.0 / s))
    assert bool((div != mul).any()), "no distinguishing case found"
    q = quantize(x, s, 0, 16, signed=True)
    ref = torch.fake_quantize_per_tensor_affine(x, s.item(), 0, -32768, 32767)
    assert torch.equal(dequantize(q, s, 0), ref)


def test_straight_through_gradient():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.26, 0.9, 10.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.01), torch.tensor(100), 8)  # range [-1.0, 1.55]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    x2 = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x2, 0.01, 100, 0, 255).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_bad_inputs():
    x = torch.randn(4, 3)
    s, z = torch.tensor(0.1), torch.tensor(0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize(torch.ones(3, dtype=torch.int32), s, z)
    with pytest.raises(ValueError, match="x must not be empty"):
        quantize(torch.empty(0), s, z)
    with pytest.raises(ValueError, match="finite"):
        quantize(torch.tensor([float("nan")]), s, z)
    with pytest.raises(ValueError, match="axis"):
        quantize(x, torch.ones(3), torch.zeros(3), axis=5)
    with pytest.raises(ValueError, match="scale must have shape"):
        quantize(x, torch.ones(4), torch.zeros(4), axis=1)
    with pytest.raises(ValueError, match="zero_point must have shape"):
        quantize(x, torch.ones(3), torch.zeros(2), axis=1)
    with pytest.raises(ValueError, match="scale must have shape"):
        quantize(x, torch.ones(3), z)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize(x, torch.tensor(0.0), z)
    with pytest.raises(ValueError, match="num_bits"):
        quantize(x, s, z, num_bits=20)
    with pytest.raises(TypeError, match="q must be an integer"):
        dequantize(x, s, z)
    with pytest.raises(ValueError, match="q must not be empty"):
        dequantize(torch.empty(0, dtype=torch.int32), s, z)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fake_quantize(torch.ones(3, dtype=torch.int64), s, z)


def test_dequantize_large_int32_exactly():
    # int32 biases dequantize through int64, so q - zero_point never wraps around
    q = torch.tensor([2**31 - 1, -(2**31)], dtype=torch.int32)
    out = dequantize(q, torch.tensor(1.0), torch.tensor(0))
    assert out.tolist() == [float(2**31), float(-(2**31))]
    qu8 = torch.tensor([0, 255], dtype=torch.uint8)
    assert dequantize(qu8, 1.0, 128).tolist() == [-128.0, 127.0]
