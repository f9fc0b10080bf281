"""The checks of exercises/e_exercises.ipynb: integer conv, fixed-point requantization, the whole pipeline
(notebook e_conv_quantization_walkthrough)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from .. import fixed_point as fx
from .. import qparams
from ..modules import QConv2d
from ..reference import torch_ao_available, torch_integer_inference
from .common import INT32_MAX, INT32_MIN, Case, Exercise, Mismatch, exact_ints, show, t


def _e1():
    cases = [
        Case(dict(multiplier=0.5)), Case(dict(multiplier=0.0030706075485795736)),
        Case(dict(multiplier=0.5 + 2.0**-32), "a tie: f * 2**31 = 2**30 + 0.5; round half away "
             "from zero, floor(f * 2**31 + 0.5), not Python's round() (half to even)"),
        Case(dict(multiplier=1.0 - 2.0**-40), "f * 2**31 rounds up to 2**31: then halve M0 and add"
             " 1 to the exponent, so M0 stays below 2**31"),
        Case(dict(multiplier=3.0), "M > 1 gives a negative shift (a left shift)"),
        Case(dict(multiplier=0.0), "M == 0 gives (0, 0)"),
        Case(dict(multiplier=1e-12), "a multiplier below 2**-32 (shift > 31) is flushed to (0, 0)"),
    ]
    strat = st.floats(1e-9, 1e3, allow_nan=False).map(lambda m: Case(dict(multiplier=m)))

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(e), show(g), "return the tuple (M0, shift)")
        try:
            gi = tuple(int(v) for v in g)
        except (TypeError, ValueError):
            return Mismatch(show(e), show(g), "return two Python ints")
        return None if gi == tuple(e) else Mismatch(f"(M0, shift) = {e}", f"{gi}")

    return Exercise("e", 1, "quantize_multiplier", fx.quantize_multiplier, compare, lambda: cases,
                    lambda: strat, "f, e = math.frexp(M); M0 = floor(f * 2**31 + 0.5); shift = -e")


def _int_vec(*v):
    return torch.tensor(v, dtype=torch.int64)


def _e2():
    cases = [
        Case(dict(a=_int_vec(1, -1, 3, -3), b=2**30),
             "add the nudge 2**30 (1 - 2**30 for negative products) before dividing by 2**31: "
             "ties round up"),
        Case(dict(a=_int_vec(-3, -5, 7), b=2**30 + 1), "divide by 2**31 truncating toward zero"
             " (C++ integer division), not flooring with // or >>"),
        Case(dict(a=_int_vec(INT32_MIN), b=INT32_MIN), "INT32_MIN * INT32_MIN overflows: it "
             "saturates to INT32_MAX"),
        Case(dict(a=_int_vec(INT32_MAX, INT32_MIN, 0), b=INT32_MAX), "int32 limits"),
    ]

    @st.composite
    def strat(draw):
        a = draw(st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=6))
        return Case(dict(a=torch.tensor(a, dtype=torch.int64),
                         b=draw(st.integers(INT32_MIN, INT32_MAX))))

    return Exercise("e", 2, "saturating_rounding_doubling_high_mul",
                    fx.saturating_rounding_doubling_high_mul, exact_ints, lambda: cases, strat,
                    "(a * b + nudge) / 2**31 truncated toward zero, nudge 2**30 or 1 - 2**30; "
                    "INT32_MIN * INT32_MIN -> INT32_MAX")


def _e3():
    cases = [
        Case(dict(x=_int_vec(3, -3, 5, -5, 1, -1, 0), exponent=1),
             "ties round away from zero: -1.5 -> -2; for negative x the threshold is one larger "
             "(gemmlowp's RoundingDivideByPOT)"),
        Case(dict(x=_int_vec(7, -7, 12, -12), exponent=0), "exponent 0 divides by 1"),
        Case(dict(x=_int_vec(-6, -10, 6, 10), exponent=2), "-6 / 4 = -1.5 -> -2; -10 / 4 = -2.5 -> "
             "-3"),
        Case(dict(x=_int_vec(INT32_MAX, INT32_MIN), exponent=31), "int32 limits"),
    ]

    @st.composite
    def strat(draw):
        x = draw(st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=6))
        return Case(dict(x=torch.tensor(x, dtype=torch.int64), exponent=draw(st.integers(0, 31))))

    return Exercise("e", 3, "rounding_divide_by_pot", fx.rounding_divide_by_pot, exact_ints,
                    lambda: cases, strat,
                    "x / 2**exponent rounded half away from zero: mask = 2**e - 1, remainder = x & "
                    "mask, threshold = (mask >> 1) + (x < 0); (x >> e) + (remainder > threshold)")


def _fixed_oracle(acc, multiplier, zero_point, quant_min=0, quant_max=255):
    m0, shift = fx.quantize_multiplier(multiplier)
    y = fx.multiply_by_quantized_multiplier(acc, m0, shift) + zero_point
    return torch.clamp(y, quant_min, quant_max).to(torch.int32)


def _e4():
    cases = [
        Case(dict(acc=_int_vec(1, 3, 5, -1, -3, -5), multiplier=0.5, zero_point=10),
             "ties: the high multiply rounds up, the shift rounds away from zero"),
        Case(dict(acc=_int_vec(3135, 6875, -14565, -1547), multiplier=0.0030706075485795736,
                  zero_point=126)),
        Case(dict(acc=_int_vec(10, -10, 1000), multiplier=1.5, zero_point=0),
             "M > 1: shift is negative, a left shift of acc before the high multiply"),
        Case(dict(acc=_int_vec(INT32_MAX, INT32_MIN), multiplier=1e-7, zero_point=128),
             "int32 limits"),
        Case(dict(acc=_int_vec(2**30, -(2**30), 2**29 + 7), multiplier=3.0, zero_point=0,
                  quant_min=INT32_MIN, quant_max=INT32_MAX),
             "M = 3 shifts acc left by 2 bits: 2**30 << 2 leaves int32, so clamp the shifted value "
             "to [-2**31, 2**31 - 1] before the high multiply"),
        Case(dict(acc=_int_vec(10**6, -(10**6)), multiplier=0.01, zero_point=128),
             "clamp to [quant_min, quant_max] after adding the zero point"),
    ]

    @st.composite
    def strat(draw):
        acc = draw(st.lists(st.integers(-2**24, 2**24), min_size=1, max_size=6))
        return Case(dict(acc=torch.tensor(acc, dtype=torch.int64),
                         multiplier=draw(st.floats(1e-6, 1.0)), zero_point=draw(
                             st.integers(0, 255))))

    return Exercise("e", 4, "requantize_fixed_point", _fixed_oracle, exact_ints, lambda: cases,
                    strat, "M0, shift = quantize_multiplier(M); y = rounding_divide_by_pot("
                    "saturating_rounding_doubling_high_mul(acc, M0), shift); clamp(y + Z_y)")


def _acc_oracle(q_x, zero_point_x, q_w, zero_point_w, stride=1, padding=0):
    """The exact accumulator in int64 (unfold + integer matmul, no float sums)."""
    x = q_x.to(torch.int64) - int(zero_point_x)
    zw = torch.as_tensor(zero_point_w, dtype=torch.int64)
    w = q_w.to(torch.int64) - (zw.reshape(-1, 1, 1, 1) if zw.dim() else zw)
    k = w.shape[-1]
    cols = F.unfold(x.to(torch.float64), k, stride=stride, padding=padding).to(torch.int64)
    out = torch.einsum("ck,nkl->ncl", w.flatten(1), cols)  # int64: exact
    hw = [(s + 2 * padding - k) // stride + 1 for s in x.shape[-2:]]
    return out.reshape(x.shape[0], w.shape[0], *hw)


def _acc_case(seed, n, cin, cout, size, k, stride, padding, per_channel_zw, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    q_x = torch.randint(0, 256, (n, cin, size, size), generator=g).to(dtype)
    z_x = int(torch.randint(0, 256, (), generator=g))
    q_w = torch.randint(-128, 128, (cout, cin, k, k), generator=g, dtype=torch.int32)
    z_w = (torch.randint(-128, 128, (cout,), generator=g, dtype=torch.int32) if per_channel_zw
           else torch.tensor(int(torch.randint(-128, 128, (), generator=g)), dtype=torch.int32))
    return Case(dict(q_x=q_x, zero_point_x=z_x, q_w=q_w, zero_point_w=z_w, stride=stride,
                     padding=padding),
                desc=f"q_x: randint(0, 256, {(n, cin, size, size)}) as {str(dtype)[6:]}, "
                     f"zero_point_x={z_x}, q_w: randint(-128, 128, {(cout, cin, k, k)}), "
                     f"zero_point_w={show(z_w)} (seed {seed}), stride={stride}, padding={padding}")


def _e5():
    # An odd exact sum above 2**24: float32 holds only even integers there, so a float32
    # accumulation is wrong whatever order a CPU's kernel adds the products in (1001, 255 and
    # 127 are odd, so their product is).
    big = Case(dict(q_x=torch.full((1, 1001, 1, 1), 255, dtype=torch.int32), zero_point_x=0,
                    q_w=torch.full((1, 1001, 1, 1), 127, dtype=torch.int32),
                    zero_point_w=torch.tensor(0, dtype=torch.int32), stride=1, padding=0),
               "the exact sum is 1001 * 255 * 127 = 32,417,385, an odd number above 2**24 = "
               "16,777,216: float32 has only even integers there, so it cannot hold this sum; "
               "accumulate in int64 or float64",
               desc="q_x = 255 everywhere, shape (1, 1001, 1, 1), zero_point_x=0, q_w = 127 "
                    "everywhere, shape (1, 1001, 1, 1), zero_point_w=0")
    cases = [
        _acc_case(0, 1, 1, 2, 4, 3, 1, 0, True),
        Case(_acc_case(1, 1, 2, 3, 4, 3, 1, 0, True).kwargs, "subtract each output channel's "
             "zero point Z_w[c] from q_w before multiplying", _acc_case(1, 1, 2, 3, 4, 3, 1, 0,
                                                                         True).desc),
        Case(_acc_case(2, 1, 1, 2, 4, 3, 1, 1, False).kwargs, "padding is real 0, i.e. the integer"
             " Z_x: pad (q_x - Z_x) with zeros, not q_x", _acc_case(2, 1, 1, 2, 4, 3, 1, 1,
                                                                     False).desc),
        Case(_acc_case(3, 1, 1, 2, 4, 3, 2, 0, True, torch.uint8).kwargs, "q_x is uint8 here: "
             "convert to int64 before subtracting Z_x (uint8 arithmetic wraps around)",
             _acc_case(3, 1, 1, 2, 4, 3, 2, 0, True, torch.uint8).desc),
        big,
    ]

    @st.composite
    def strat(draw):
        size = draw(st.integers(1, 6))
        k = draw(st.integers(1, 3))
        padding = draw(st.integers(0, 1))
        size = max(size, k - 2 * padding)
        return _acc_case(draw(st.integers(0, 2**16)), draw(st.integers(1, 2)),
                         draw(st.integers(1, 3)), draw(st.integers(1, 3)), size, k,
                         draw(st.integers(1, 2)), padding, draw(st.booleans()))

    return Exercise("e", 5, "conv2d_accumulate", _acc_oracle, exact_ints, lambda: cases, strat,
                    "acc = conv2d(q_x - Z_x, q_w - Z_w[c]) with exact integer sums (int64 values "
                    "in float64 are exact), padding with 0 after subtracting Z_x")


def _conv_case(seed, n, cin, cout, size, k, stride, padding, shift, out_frac):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size, generator=g) + shift
    w = torch.randn(cout, cin, k, k, generator=g) * 0.3
    b = torch.randn(cout, generator=g) * 0.2
    res = F.conv2d(x, w, b, stride, padding)
    y_min, y_max = res.min().item() * out_frac, res.max().item() * out_frac
    sy, zy = qparams.calc_scale_zero_point(t(y_min), t(y_max))
    return Case(dict(x=x, weight=w, bias=b, scale_y=sy, zero_point_y=zy, stride=stride,
                     padding=padding),
                desc=f"x = randn{(n, cin, size, size)} + {shift}, weight = 0.3 * randn"
                     f"{(cout, cin, k, k)}, bias = 0.2 * randn({cout}) (seed {seed}), stride="
                     f"{stride}, padding={padding}, scale_y={sy.item()!r}, zero_point_y="
                     f"{zy.item()}")


def _conv_oracle(x, weight, bias, scale_y, zero_point_y, stride=1, padding=0):
    conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride, padding)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    layer = QConv2d(conv, per_channel=True)
    layer.q_in.update(x)
    layer.q_out.scale, layer.q_out.zero_point = scale_y.clone(), zero_point_y.clone()
    layer.q_out.min_val, layer.q_out.max_val = t(0.0), t(0.0)
    layer.freeze()
    q_x = layer.q_in.quantize_tensor(x)
    expected = layer.quantize_inference(q_x)
    if torch_ao_available():
        theirs = torch_integer_inference(layer, q_x, "qnnpack")
        if not torch.equal(theirs, expected):
            raise RuntimeError("quantlab and PyTorch's qnnpack disagree: please report this bug")
    return expected


def _near_tie_case(scale_y, zero_point_y):
    """Case 0's conv with an output scale chosen so that one output lands on a near-tie k + 1/2."""
    base = _conv_case(0, 1, 1, 2, 5, 3, 1, 0, 0.0, 1.0)
    zy = base.kwargs["zero_point_y"]
    kwargs = dict(base.kwargs, scale_y=t(scale_y), zero_point_y=torch.tensor(zero_point_y, dtype=zy.dtype))
    desc = base.desc.split(", scale_y=")[0] + f", scale_y={scale_y!r}, zero_point_y={zero_point_y}"
    return Case(kwargs, desc=desc)


# output scales (found by a search offline) where one output's M * (acc + q_b) lies so close to k + 1/2
# that the quotient M = S_x S_w / S_y (ONNX Runtime's formula), or a float64 M, rounds it to the other
# integer
QUOTIENT_NEAR_TIE = (0.013188259676098824, 137)   # only the quotient changes an integer
FLOAT64_NEAR_TIE = (0.013644624501466751, 137)    # only a float64 M changes an integer


def _e6():
    cases = [_conv_case(0, 1, 1, 2, 5, 3, 1, 0, 0.0, 1.0),
             _conv_case(1, 2, 2, 3, 6, 3, 2, 1, 0.0, 1.0),
             _conv_case(2, 1, 1, 2, 5, 3, 1, 1, 2.0, 1.0),
             _conv_case(3, 1, 2, 2, 5, 3, 1, 0, 0.0, 0.5),
             _near_tie_case(*QUOTIENT_NEAR_TIE), _near_tie_case(*FLOAT64_NEAR_TIE)]
    hints = ["", "padding=1 and stride=2: pass them to the accumulator",
             "the input's range excludes 0 here (x + 2): its qparams must still include 0",
             "the output range is half the float output's: clamp to [0, 255]",
             "M = (S_x * S_w) * f32(1 / S_y), a product with the float32 reciprocal, as qnnpack: the "
             "quotient S_x * S_w / S_y (ONNX Runtime's formula) differs in its last bit, and one output "
             "here is a near-tie that this bit moves to the other integer",
             "M in float32, as qnnpack: a float64 M makes acc * M a float64 product, which rounds one "
             "output here (a near-tie) to the other integer"]
    cases = [Case(c.kwargs, h, c.desc) for c, h in zip(cases, hints)]

    @st.composite
    def strat(draw):
        size = draw(st.integers(2, 6))
        k = draw(st.integers(1, 3))
        padding = draw(st.integers(0, 1))
        size = max(size, k)
        return _conv_case(draw(st.integers(0, 2**16)), draw(st.integers(1, 2)),
                          draw(st.integers(1, 3)), draw(st.integers(1, 3)), size, k,
                          draw(st.integers(1, 2)), padding, draw(st.sampled_from([0.0, 0.0, 3.0])),
                          draw(st.sampled_from([1.0, 0.7])))

    return Exercise("e", 6, "quantized_conv2d", _conv_oracle, exact_ints, lambda: cases, strat,
                    "input: per-tensor affine uint8 from its own range; weights: per-channel "
                    "symmetric int8; q_b = quantize_bias(...); q_y = requantize(acc + q_b, "
                    "(S_x * S_w) * (1 / S_y), Z_y)", max_examples=15)




def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_e1(), _e2(), _e3(), _e4(), _e5(), _e6()]
