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
        # each case catches one more mistake (in this order; see lesson_e.py's MISTAKES)
        Case(dict(multiplier=0.5)),
        Case(dict(multiplier=0.5 + 0.75 * 2.0**-31), "round M0 to the nearest integer: int() "
             "truncates (f * 2**31 = 2**30 + 0.75 -> 2**30 instead of 2**30 + 1)"),
        Case(dict(multiplier=0.5 + 2.0**-32), "a tie: f * 2**31 = 2**30 + 0.5; round half away "
             "from zero, floor(f * 2**31 + 0.5), not Python's round() (half to even)"),
        Case(dict(multiplier=0.0030706075485795736), "shift = -e: a multiplier below 1 (e < 0) "
             "gives a positive shift, which is a right shift"),
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
        if not all(type(v) is int for v in g):  # exactly int: not a float, a bool or a tensor
            return Mismatch(f"(M0, shift) = {e}", f"{show(tuple(g))} ("
                            f"{', '.join(type(v).__name__ for v in g)})", "return two Python ints "
                            "(math.floor returns one; x // 1 of a float is still a float)")
        return None if tuple(g) == tuple(e) else Mismatch(f"(M0, shift) = {e}", f"{tuple(g)}")

    return Exercise("e", 1, "quantize_multiplier", fx.quantize_multiplier, compare, lambda: cases,
                    lambda: strat, "f, e = math.frexp(M); M0 = floor(f * 2**31 + 0.5); shift = -e")


def _int_vec(*v):
    return torch.tensor(v, dtype=torch.int64)


def _e2():
    cases = [
        # each case catches one more mistake (in this order; see lesson_e.py's MISTAKES)
        Case(dict(a=_int_vec(65536, 3), b=65536), "|a * b| reaches 2**62: compute in int64 (an "
             "int32 product wraps around: 65536 * 65536 = 2**32)"),
        Case(dict(a=_int_vec(-1, -3, -5), b=2**30), "divide by 2**31 truncating toward zero "
             "(C++ integer division), not flooring with // or >>"),
        Case(dict(a=_int_vec(1, 3), b=2**30), "add the rounding nudge 2**30 before dividing by "
             "2**31: ties (0.5, 1.5) round up"),
        Case(dict(a=_int_vec(-5), b=2**29), "for a negative product the nudge is 1 - 2**30, not "
             "2**30: -1.25 rounds to -1, not 0"),
        Case(dict(a=_int_vec(INT32_MIN), b=INT32_MIN), "INT32_MIN * INT32_MIN overflows: it "
             "saturates to INT32_MAX"),
        Case(dict(a=_int_vec(INT32_MAX, INT32_MIN, 0), b=INT32_MAX), "int32 limits"),
        Case(dict(a=_int_vec(-3, -5, 7), b=2**30 + 1)),
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
        # each case catches one more mistake (in this order; see lesson_e.py's MISTAKES)
        Case(dict(x=_int_vec(7, 6), exponent=2), "x >> exponent floors (7 / 4 = 1.75 -> 1): "
             "round by adding 1 when the remainder x & mask is above the threshold"),
        Case(dict(x=_int_vec(4, 6), exponent=1), "add 1 only when the remainder is above the "
             "threshold (>), not equal to it: 4 / 2 = 2 exactly"),
        Case(dict(x=_int_vec(5, 1, 9), exponent=1), "ties round away from zero (2.5 -> 3, 0.5 -> "
             "1), not half to even"),
        Case(dict(x=_int_vec(3, -3, 5, -5, 1, -1, 0), exponent=1),
             "ties round away from zero: -1.5 -> -2; for negative x the threshold is one larger "
             "(gemmlowp's RoundingDivideByPOT)"),
        Case(dict(x=_int_vec(7, -7, 12, -12), exponent=0), "exponent 0 divides by 1: mask = 0, "
             "nothing to round (1 << (exponent - 1) is a negative shift there)"),
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
        # each case catches one more mistake (in this order; see lesson_e.py's MISTAKES)
        Case(dict(acc=_int_vec(1, 3, 5, -1, -3, -5), multiplier=0.5, zero_point=10),
             "integers only: the high multiply rounds ties up and the shift rounds them away from "
             "zero; torch.round of a float product rounds them half to even"),
        Case(dict(acc=_int_vec(4, 40, -200, 400), multiplier=0.25, zero_point=100),
             "a positive shift is a right shift: M = 0.25 gives shift = 1, applied by "
             "rounding_divide_by_pot after the high multiply, not a left shift of acc"),
        Case(dict(acc=_int_vec(3135, 6875, -14565, -1547), multiplier=0.0030706075485795736,
                  zero_point=126),
             "the high multiply first, then the rounding right shift: shifting acc first rounds "
             "twice and loses its low bits"),
        Case(dict(acc=_int_vec(-1000, 1000, 300), multiplier=0.01, zero_point=0, quant_min=-128,
                  quant_max=127),
             "clamp to [quant_min, quant_max], the arguments (int8's [-128, 127] here): do not "
             "hard-code [0, 255]"),
        Case(dict(acc=_int_vec(10**6, -(10**6)), multiplier=0.01, zero_point=128),
             "clamp to [quant_min, quant_max] after adding the zero point"),
        Case(dict(acc=_int_vec(10, -10, 1000), multiplier=1.5, zero_point=0),
             "M > 1: shift is negative, a left shift of acc before the high multiply"),
        Case(dict(acc=_int_vec(INT32_MAX, INT32_MIN), multiplier=1e-7, zero_point=128),
             "int32 limits"),
        Case(dict(acc=_int_vec(2**30, -(2**30), 2**29 + 7), multiplier=3.0, zero_point=0,
                  quant_min=INT32_MIN, quant_max=INT32_MAX),
             "M = 3 shifts acc left by 2 bits: 2**30 << 2 leaves int32, so clamp the shifted value "
             "to [-2**31, 2**31 - 1] before the high multiply"),
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


def _acc_case(seed, n, cin, cout, size, k, stride, padding, per_channel_zw, dtype=torch.int32,
              hint="", zero_point_x=None):
    g = torch.Generator().manual_seed(seed)
    q_x = torch.randint(0, 256, (n, cin, size, size), generator=g).to(dtype)
    z_x = int(torch.randint(0, 256, (), generator=g))
    z_x = z_x if zero_point_x is None else zero_point_x
    q_w = torch.randint(-128, 128, (cout, cin, k, k), generator=g, dtype=torch.int32)
    z_w = (torch.randint(-128, 128, (cout,), generator=g, dtype=torch.int32) if per_channel_zw
           else torch.tensor(int(torch.randint(-128, 128, (), generator=g)), dtype=torch.int32))
    return Case(dict(q_x=q_x, zero_point_x=z_x, q_w=q_w, zero_point_w=z_w, stride=stride,
                     padding=padding), hint,
                desc=f"g = torch.Generator().manual_seed({seed}); q_x = torch.randint(0, 256, "
                     f"{(n, cin, size, size)}, generator=g).to(torch.{str(dtype)[6:]}); zero_point_x = "
                     f"int(torch.randint(0, 256, (), generator=g)); q_w = torch.randint(-128, 128, "
                     f"{(cout, cin, k, k)}, generator=g, dtype=torch.int32); zero_point_w = " + (
                         f"torch.randint(-128, 128, ({cout},), generator=g, dtype=torch.int32)"
                         if per_channel_zw else "torch.tensor(int(torch.randint(-128, 128, (), "
                         "generator=g)), dtype=torch.int32)")
                     + ("" if zero_point_x is None else f"; zero_point_x = {zero_point_x}")
                     + f"; stride={stride}, padding={padding}")


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
        # each case catches one more mistake (in this order; see lesson_e.py's MISTAKES)
        _acc_case(0, 1, 1, 2, 4, 3, 1, 0, False, hint="subtract the weights' zero point too: "
                  "(q_x - Z_x)(q_w - Z_w)"),
        _acc_case(1, 1, 2, 3, 4, 3, 1, 0, True, hint="one zero point per output channel: reshape "
                  "Z_w to (C_out, 1, 1, 1) so that Z_w[c] is subtracted from channel c of q_w (as it "
                  "is, it broadcasts along the last axis)"),
        _acc_case(4, 1, 1, 2, 5, 3, 2, 0, True, hint="pass stride to the conv: stride=2 takes every "
                  "second window"),
        _acc_case(5, 1, 1, 2, 4, 3, 1, 1, True, zero_point_x=0, hint="pass padding to the conv: "
                  "padding=1 adds a row and a column of real 0 on every side"),
        _acc_case(2, 1, 1, 2, 4, 3, 1, 1, False, hint="padding is real 0, i.e. the integer Z_x: pad "
                  "(q_x - Z_x) with zeros, not q_x"),
        _acc_case(3, 1, 1, 2, 4, 3, 2, 0, True, torch.uint8, hint="q_x is uint8 here: convert to "
                  "int64 before subtracting Z_x (uint8 arithmetic wraps around)"),
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


def _conv_inputs(seed, n, cin, cout, size, k, shift):
    """x, weight, bias drawn as integers over 1024: exact float32 values, the same on every CPU (torch.randn
    is not: its vectorised kernels round differently), so the near-tie cases below stay near-ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2048, 2048, (n, cin, size, size), generator=g) / 1024 + shift
    w = torch.randint(-512, 512, (cout, cin, k, k), generator=g) / 1024
    b = torch.randint(-256, 256, (cout,), generator=g) / 1024
    code = (f"g = torch.Generator().manual_seed({seed}); x = torch.randint(-2048, 2048, "
            f"{(n, cin, size, size)}, generator=g) / 1024 + {shift}; weight = torch.randint(-512, 512, "
            f"{(cout, cin, k, k)}, generator=g) / 1024; bias = torch.randint(-256, 256, ({cout},), "
            f"generator=g) / 1024")
    return x, w, b, code


def _conv_case(seed, n, cin, cout, size, k, stride, padding, shift, out_frac, hint=""):
    x, w, b, code = _conv_inputs(seed, n, cin, cout, size, k, shift)
    res = F.conv2d(x, w, b, stride, padding)
    y_min, y_max = res.min().item() * out_frac, res.max().item() * out_frac
    sy, zy = qparams.calc_scale_zero_point(t(y_min), t(y_max))
    return Case(dict(x=x, weight=w, bias=b, scale_y=sy, zero_point_y=zy, stride=stride,
                     padding=padding), hint,
                desc=f"{code}; scale_y={sy.item()!r}, zero_point_y={zy.item()}, stride={stride}, "
                     f"padding={padding}")


def _exact_conv_case(x, weight, what, hint, bias=None, scale_y=1.0, zero_point_y=128):
    """A conv whose input and weight ranges are chosen so that every mistake but one gives the same
    integers (see _e6); no bias unless given, and M = S_x S_w / S_y a power of two (no near-ties)."""
    bias = torch.zeros(weight.shape[0]) if bias is None else bias
    return Case(dict(x=x, weight=weight, bias=bias, scale_y=t(scale_y),
                     zero_point_y=torch.tensor(zero_point_y, dtype=torch.int32), stride=1, padding=0),
                hint, desc=f"{what}; bias = {show(bias)}, scale_y={scale_y}, "
                           f"zero_point_y={zero_point_y}, stride=1, padding=0")


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


def _near_tie_case(scale_y, zero_point_y, hint):
    """Case 0's conv with an output scale chosen so that one output lands on a near-tie k + 1/2."""
    x, w, b, code = _conv_inputs(0, 1, 1, 2, 5, 3, 0.0)
    return Case(dict(x=x, weight=w, bias=b, scale_y=t(scale_y),
                     zero_point_y=torch.tensor(zero_point_y, dtype=torch.int32), stride=1, padding=0),
                hint, f"{code}; scale_y={scale_y!r}, zero_point_y={zero_point_y}, stride=1, padding=0")


# output scales (found by a search offline) where one output's M * (acc + q_b) lies so close to k + 1/2
# that the quotient M = S_x S_w / S_y (ONNX Runtime's formula), or a float64 M, rounds it to the other
# integer
QUOTIENT_NEAR_TIE = (0.01537877507507801, 128)   # only the quotient changes an integer
FLOAT64_NEAR_TIE = (0.01581752672791481, 128)     # only a float64 M changes an integer

# inputs of the first e6 cases: ranges in which the other mistakes give the right integers
# x: 25 values from -127.5 to 127.5 (S_x = 1; Z_x = 128 both affine and symmetric)
_X_SYM = ((torch.arange(25, dtype=torch.float32) - 12) * 10.625).reshape(1, 1, 5, 5)
# x: 25 values from 0 to 255 (affine S_x = 1, Z_x = 0; symmetric would take S_x = 2, Z_x = 128)
_X_POS = (torch.arange(25, dtype=torch.float32) * 10.625).reshape(1, 1, 5, 5)
_STEPS = (torch.arange(9, dtype=torch.float32) - 4) / 4                 # -1 ... 1
_A = 127.5 / 256                                                       # S_w = 1 / 256 (a power of 2)
# two channels of the same symmetric range [-A, A]: per tensor = per channel, affine = symmetric
_W_SAME = torch.stack([_STEPS * _A, _STEPS.flip(0) * _A]).reshape(2, 1, 3, 3)
# channels of ranges [-A, A] and [-A/2, A/2]: per-channel scales 1/256 and 1/512
_W_TWO = torch.stack([_STEPS * _A, _STEPS.flip(0) * _A / 2]).reshape(2, 1, 3, 3)
# channels of asymmetric ranges [-A, A/2] and [-A/2, A]: affine and symmetric differ
_W_ASYM = torch.stack([torch.where(_STEPS > 0, _STEPS / 2, _STEPS) * _A,
                       torch.where(_STEPS < 0, _STEPS / 2, _STEPS) * _A]).reshape(2, 1, 3, 3)
_SYM_DESC = "x = ((torch.arange(25) - 12) * 10.625).reshape(1, 1, 5, 5)"
_POS_DESC = "x = (torch.arange(25) * 10.625).reshape(1, 1, 5, 5)"
_W_DESC = "s = (torch.arange(9) - 4) / 4; A = 127.5 / 256; weight = torch.stack([{}, {}]).reshape(2, 1, 3, 3)"
_SAME_DESC = _W_DESC.format("s * A", "s.flip(0) * A")
_TWO_DESC = _W_DESC.format("s * A", "s.flip(0) * A / 2")
_ASYM_DESC = _W_DESC.format("torch.where(s > 0, s / 2, s) * A", "torch.where(s < 0, s / 2, s) * A")


def _e6():
    fold = _conv_case(1, 2, 2, 3, 6, 3, 2, 1, 0.0, 1.0)
    cases = [
        # each case catches one more mistake (in this order; see lesson_e.py's MISTAKES)
        _exact_conv_case(_X_SYM, _W_SAME, f"{_SYM_DESC}; {_SAME_DESC}",
                         "reshape q_b to (1, C_out, 1, 1) before adding it to acc (N, C_out, H, W): "
                         "as it is, it broadcasts along the last axis"),
        _exact_conv_case(_X_SYM, _W_TWO, f"{_SYM_DESC}; {_TWO_DESC}",
                         "weights per channel: calc_min_max(weight, axis=0) gives one scale per "
                         "output channel (here 1/256 and 1/512), not one for the whole tensor"),
        _exact_conv_case(_X_POS, _W_TWO, f"{_POS_DESC}; {_TWO_DESC}",
                         "the input is affine: calc_scale_zero_point of x's own range [0, 255] "
                         "(S_x = 1, Z_x = 0), not a symmetric range"),
        _exact_conv_case(_X_SYM, _W_ASYM, f"{_SYM_DESC}; {_ASYM_DESC}",
                         "the weights are symmetric: calc_scale_zero_point_symmetric (zero point 0, "
                         "scale max|w_c| / 127.5), not an affine range"),
        Case(dict(fold.kwargs, bias=torch.zeros(3)), "padding=1 and stride=2: pass them to the "
             "accumulator", fold.desc.replace("; scale_y", "; bias = torch.zeros(3); scale_y")),
        _conv_case(0, 1, 1, 2, 5, 3, 1, 0, 0.0, 1.0,
                   hint="add the int32 bias q_b = quantize_bias(bias, S_x, S_w) to the accumulator, "
                   "not the float bias"),
        _conv_case(1, 2, 2, 3, 6, 3, 2, 1, 0.0, 1.0),
        _conv_case(2, 1, 1, 2, 5, 3, 1, 1, 2.0, 1.0, hint="the input's range excludes 0 here (x + 2):"
                   " its qparams must still include 0"),
        _conv_case(3, 1, 2, 2, 5, 3, 1, 0, 0.0, 0.5, hint="the output range is half the float "
                   "output's: clamp to [0, 255]"),
        _near_tie_case(*QUOTIENT_NEAR_TIE, "M = (S_x * S_w) * f32(1 / S_y), a product with the "
                       "float32 reciprocal, as qnnpack: the quotient S_x * S_w / S_y (ONNX Runtime's "
                       "formula) differs in its last bit, and one output here is a near-tie that this "
                       "bit moves to the other integer"),
        _near_tie_case(*FLOAT64_NEAR_TIE, "M in float32, as qnnpack: a float64 M makes acc * M a "
                       "float64 product, which rounds one output here (a near-tie) to the other "
                       "integer"),
    ]

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
