"""Bad inputs to the core (qparams, quantize, QParam, fixed_point): each raises TypeError/ValueError
naming the argument. Plus a property test: no quantized value ever leaves [quant_min, quant_max]."""

import numpy as np
import torch
from bad_input import bad_input_test
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import (
    QParam,
    calc_min_max,
    calc_scale_zero_point,
    dequantize,
    fake_quantize,
    quant_range,
    quantize,
)
from quantlab.fixed_point import (
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

X = torch.randn(2, 3)
META = torch.empty(2, 3, device="meta")
T, V = TypeError, ValueError

# (call, exception, the argument the message must name)
CASES = {
    "quant_range": [
        (lambda: quant_range(None), T, "num_bits"),
        (lambda: quant_range("8"), T, "num_bits"),
        (lambda: quant_range(8.0), T, "num_bits"),
        (lambda: quant_range(True), T, "num_bits"),
        (lambda: quant_range(1), V, "num_bits"),
        (lambda: quant_range(17), V, "num_bits"),
        (lambda: quant_range(8, "yes"), T, "signed"),
        (lambda: quant_range(8, 1), T, "signed"),
    ],
    "calc_min_max": [
        (lambda: calc_min_max(None), T, "x"),
        (lambda: calc_min_max([1.0, 2.0]), T, "x"),
        (lambda: calc_min_max(torch.tensor([1, 2])), T, "x"),
        (lambda: calc_min_max(torch.tensor([1 + 1j])), T, "x"),
        (lambda: calc_min_max(META), V, "meta"),
        (lambda: calc_min_max(torch.empty(0)), V, "x"),
        (lambda: calc_min_max(torch.tensor([float("nan")])), V, "x"),
        (lambda: calc_min_max(X, axis=2), V, "axis"),
        (lambda: calc_min_max(X, axis=1.0), T, "axis"),
        (lambda: calc_min_max(X, axis=True), T, "axis"),
        (lambda: calc_min_max(X, min_val=torch.tensor(0.0)), V, "min_val"),
        (lambda: calc_min_max(X, "a", "b"), T, "min_val"),
        (lambda: calc_min_max(X, torch.zeros(3), torch.zeros(3)), V, "min_val"),
        (lambda: calc_min_max(X, float("-inf"), 1.0), V, "min_val"),
    ],
    "calc_scale_zero_point": [
        (lambda: calc_scale_zero_point(None, 1.0), T, "min_val"),
        (lambda: calc_scale_zero_point(0.0, "1"), T, "max_val"),
        (lambda: calc_scale_zero_point(0.0, 1 + 2j), T, "max_val"),
        (lambda: calc_scale_zero_point(True, 1.0), T, "min_val"),
        (lambda: calc_scale_zero_point(0.0, float("inf")), V, "max_val"),
        (lambda: calc_scale_zero_point(0.0, 1e39), V, "max_val"),
        (lambda: calc_scale_zero_point(1.0, 0.0), V, "min_val"),
        (lambda: calc_scale_zero_point(torch.zeros(2), torch.ones(3)), V, "min_val"),
        (lambda: calc_scale_zero_point(torch.zeros(2, 2), torch.ones(2, 2)), V, "min_val"),
        (lambda: calc_scale_zero_point(0.0, 1.0, num_bits=0), V, "num_bits"),
        (lambda: calc_scale_zero_point(0.0, 1.0, symmetric="no"), T, "symmetric"),
        (lambda: calc_scale_zero_point(0.0, 1.0, signed=None), T, "signed"),
        (lambda: calc_scale_zero_point(META, META), V, "meta"),
    ],
    "quantize": [
        (lambda: quantize(None, 0.1, 0), T, "x"),
        (lambda: quantize(np.zeros(3), 0.1, 0), T, "x"),
        (lambda: quantize(torch.tensor([1, 2]), 0.1, 0), T, "x"),
        (lambda: quantize(META, 0.1, 0), V, "meta"),
        (lambda: quantize(torch.tensor([float("inf")]), 0.1, 0), V, "x"),
        (lambda: quantize(X, None, 0), T, "scale"),
        (lambda: quantize(X, "0.1", 0), T, "scale"),
        (lambda: quantize(X, 0.1j, 0), T, "scale"),
        (lambda: quantize(X, True, 0), T, "scale"),
        (lambda: quantize(X, 0.0, 0), V, "scale"),
        (lambda: quantize(X, -0.1, 0), V, "scale"),
        (lambda: quantize(X, float("nan"), 0), V, "scale"),
        (lambda: quantize(X, float("inf"), 0), V, "scale"),
        (lambda: quantize(X, 1e-39, 0), V, "scale"),
        (lambda: quantize(X, 1e39, 0), V, "scale"),
        (lambda: quantize(X, 0.1, None), T, "zero_point"),
        (lambda: quantize(X, 0.1, "0"), T, "zero_point"),
        (lambda: quantize(X, 0.1, 0.5), V, "zero_point"),
        (lambda: quantize(X, 0.1, float("inf")), V, "zero_point"),
        (lambda: quantize(X, 0.1, float("nan")), V, "zero_point"),
        (lambda: quantize(X, 0.1, 256), V, "zero_point"),
        (lambda: quantize(X, 0.1, -1), V, "zero_point"),
        (lambda: quantize(X, 0.1, 128, signed=True), V, "zero_point"),
        (lambda: quantize(X, 0.1, 2**40), V, "zero_point"),
        (lambda: quantize(X, torch.ones(2), torch.zeros(2)), V, "scale"),
        (lambda: quantize(X, torch.ones(3), torch.zeros(3), axis=0), V, "scale"),
        (lambda: quantize(X, torch.ones(2), torch.zeros(3), axis=0), V, "zero_point"),
        (lambda: quantize(X, 0.1, 0, axis=5), V, "axis"),
        (lambda: quantize(X, 0.1, 0, num_bits=32), V, "num_bits"),
        (lambda: quantize(X, 0.1, 0, num_bits="8"), T, "num_bits"),
        (lambda: quantize(X, 0.1, 0, signed="no"), T, "signed"),
    ],
    "dequantize": [
        (lambda: dequantize(None, 0.1, 0), T, "q"),
        (lambda: dequantize(X, 0.1, 0), T, "q"),
        (lambda: dequantize(torch.tensor([True]), 0.1, 0), T, "q"),
        (lambda: dequantize(torch.empty(0, dtype=torch.int32), 0.1, 0), V, "q"),
        (lambda: dequantize(torch.empty(3, dtype=torch.int32, device="meta"), 0.1, 0), V, "meta"),
        (lambda: dequantize(torch.ones(3, dtype=torch.int32), "a", 0), T, "scale"),
        (lambda: dequantize(torch.ones(3, dtype=torch.int32), 0.0, 0), V, "scale"),
        (lambda: dequantize(torch.ones(3, dtype=torch.int32), 0.1, float("inf")), V, "zero_point"),
        (lambda: dequantize(torch.ones(3, dtype=torch.int32), 0.1, 2**33), V, "zero_point"),
        (lambda: dequantize(torch.ones(3, dtype=torch.int32), 0.1, 0, axis=1), V, "axis"),
    ],
    "fake_quantize": [
        (lambda: fake_quantize(None, 0.1, 0), T, "x"),
        (lambda: fake_quantize(META, 0.1, 0), V, "meta"),
        (lambda: fake_quantize(X, 1e-40, 0), V, "scale"),
        (lambda: fake_quantize(X, 0.1, 300), V, "zero_point"),
        (lambda: fake_quantize(X, 0.1, 0, num_bits=1), V, "num_bits"),
        (lambda: fake_quantize(X, 0.1, 0, signed=0), T, "signed"),
    ],
    "QParam": [
        (lambda: QParam(1), V, "num_bits"),
        (lambda: QParam(None), T, "num_bits"),
        (lambda: QParam(8, signed="yes"), T, "signed"),
        (lambda: QParam(8, symmetric=1), T, "symmetric"),
        (lambda: QParam(8, axis="0"), T, "axis"),
        (lambda: QParam(8, averaging_constant=0), V, "averaging_constant"),
        (lambda: QParam(8, averaging_constant=1.5), V, "averaging_constant"),
        (lambda: QParam(8, averaging_constant="0.1"), T, "averaging_constant"),
        (lambda: QParam(8, averaging_constant=float("nan")), V, "averaging_constant"),
        (lambda: QParam(8).update(None), T, "x"),
        (lambda: QParam(8).update(META), V, "meta"),
        (lambda: QParam(8).update(torch.tensor([float("nan")])), V, "x"),
        (lambda: QParam(8, axis=3).update(X), V, "axis"),
        (lambda: QParam(8).set_range(1.0, 0.0), V, "min_val"),
        (lambda: QParam(8).set_range("a", 1.0), T, "min_val"),
        (lambda: QParam(8).quantize_tensor(X), RuntimeError, "update"),
        (lambda: QParam(8).update(X).quantize_tensor(None), T, "x"),
        (lambda: QParam(8).update(X).dequantize_tensor(X), T, "q"),
    ],
    "quantize_multiplier": [
        (lambda: quantize_multiplier(None), T, "multiplier"),
        (lambda: quantize_multiplier("0.5"), T, "multiplier"),
        (lambda: quantize_multiplier(0.5j), T, "multiplier"),
        (lambda: quantize_multiplier(True), T, "multiplier"),
        (lambda: quantize_multiplier(-0.5), V, "multiplier"),
        (lambda: quantize_multiplier(float("nan")), V, "multiplier"),
        (lambda: quantize_multiplier(float("inf")), V, "multiplier"),
        (lambda: quantize_multiplier(2.0**31), V, "multiplier"),
    ],
    "multiply_by_quantized_multiplier": [
        (lambda: multiply_by_quantized_multiplier(None, 2**30, 1), T, "acc"),
        (lambda: multiply_by_quantized_multiplier(torch.tensor([1.5]), 2**30, 1), T, "acc"),
        (lambda: multiply_by_quantized_multiplier(torch.tensor([2**40]), 2**30, 1), V, "acc"),
        (lambda: multiply_by_quantized_multiplier(5, 2**31, 1), V, "quantized_multiplier"),
        (lambda: multiply_by_quantized_multiplier(5, -1, 1), V, "quantized_multiplier"),
        (lambda: multiply_by_quantized_multiplier(5, 0.5, 1), T, "quantized_multiplier"),
        (lambda: multiply_by_quantized_multiplier(5, "1", 1), T, "quantized_multiplier"),
        (lambda: multiply_by_quantized_multiplier(5, 2**30, 1.5), T, "shift"),
        (lambda: multiply_by_quantized_multiplier(5, 2**30, 32), V, "shift"),
        (lambda: multiply_by_quantized_multiplier(5, 2**30, -32), V, "shift"),
        (lambda: multiply_by_quantized_multiplier(5, 2**30, None), T, "shift"),
    ],
    "rounding_divide_by_pot": [
        (lambda: rounding_divide_by_pot(torch.tensor([1.0]), 1), T, "x"),
        (lambda: rounding_divide_by_pot(5, 32), V, "exponent"),
        (lambda: rounding_divide_by_pot(5, -1), V, "exponent"),
        (lambda: rounding_divide_by_pot(5, 1.0), T, "exponent"),
        (lambda: rounding_divide_by_pot(2**31, 1), V, "x"),
    ],
    "saturating_rounding_doubling_high_mul": [
        (lambda: saturating_rounding_doubling_high_mul(None, 1), T, "a"),
        (lambda: saturating_rounding_doubling_high_mul(1, 0.5), T, "b"),
        (lambda: saturating_rounding_doubling_high_mul(torch.tensor([2**32]), 1), V, "a"),
    ],
}

test_bad_input_raises_naming_the_argument = bad_input_test(CASES)


def test_every_public_core_function_has_a_table():
    assert set(CASES) >= {"quant_range", "calc_min_max", "calc_scale_zero_point", "quantize",
                          "dequantize", "fake_quantize", "QParam", "quantize_multiplier",
                          "multiply_by_quantized_multiplier", "rounding_divide_by_pot",
                          "saturating_rounding_doubling_high_mul"}


# -- property: whatever finite scale is accepted, the integers stay in range ------------------
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
scales = st.floats(0, exclude_min=True, allow_nan=False, allow_infinity=False, width=32) | st.sampled_from(
    [1e-45, 1e-40, 2.9e-39, 2.938736e-39, 2.93874e-39, 1e-38, 1e-7, 3.4e38])


@settings(max_examples=300, deadline=None)
@given(xs=st.lists(finite32, min_size=1, max_size=8), scale=scales,
       bits=st.integers(2, 16), signed=st.booleans(), zp_frac=st.floats(0, 1))
def test_no_accepted_scale_yields_an_integer_outside_the_range(xs, scale, bits, signed, zp_frac):
    quant_min, quant_max = quant_range(bits, signed)
    zero_point = quant_min + round(zp_frac * (quant_max - quant_min))
    x = torch.tensor(xs, dtype=torch.float32)
    try:
        q = quantize(x, scale, zero_point, bits, signed)
    except ValueError as e:  # refused: only scales whose float32 reciprocal is not finite
        assert "scale" in str(e)
        assert not torch.isfinite(1.0 / torch.tensor(scale, dtype=torch.float32))
        return
    assert q.dtype == torch.int32
    assert int(q.min()) >= quant_min and int(q.max()) <= quant_max
    fq = fake_quantize(x, scale, zero_point, bits, signed)
    assert bool(torch.isfinite(fq).all()) or scale > 1e30  # huge scale * 65535 may overflow


@settings(max_examples=200, deadline=None)
@given(lo=finite32, hi=finite32, bits=st.integers(2, 16), signed=st.booleans(),
       symmetric=st.booleans())
def test_every_finite_range_gives_usable_qparams(lo, hi, bits, signed, symmetric):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = calc_scale_zero_point(lo, hi, bits, signed, symmetric)
    quant_min, quant_max = quant_range(bits, signed)
    assert torch.isfinite(scale) and scale > 0 and torch.isfinite(1.0 / scale)
    assert quant_min <= int(zp) <= quant_max
    q = quantize(torch.tensor([lo, 0.0, hi]), scale, zp, bits, signed)
    assert int(q.min()) >= quant_min and int(q.max()) <= quant_max
    assert int(q[1]) == int(zp)  # real 0 is exactly representable
