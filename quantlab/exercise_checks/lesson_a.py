"""The checks of exercises/a_exercises.ipynb: quant range, scale and zero point, quantize, dequantize, per
channel (notebook a_basic_quant)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .. import qparams
from ..quantize import dequantize, quantize
from .common import (
    EPS,
    Case,
    Exercise,
    Mismatch,
    _bits,
    _range_pair,
    _shaped,
    close,
    exact_ints,
    floats32,
    same_floats,
    same_tuple,
    show,
    t,
    vector,
)


def _a1():
    cases = [Case(dict(num_bits=8, signed=False)), Case(dict(num_bits=8, signed=True)),
             Case(dict(num_bits=2, signed=True)), Case(dict(num_bits=16, signed=True)),
             Case(dict(num_bits=4, signed=False))]
    strat = _bits().map(lambda bs: Case(dict(num_bits=bs[0], signed=bs[1])))

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(e), show(g), "return the tuple (quant_min, quant_max)")
        if not all(type(v) is int for v in g):  # exactly int: not a float, a bool or a tensor
            return Mismatch(show(e), f"{show(tuple(g))} ({', '.join(type(v).__name__ for v in g)})",
                            "return two Python ints (int(...) of an exact integer, never of a "
                            "float that is not whole)")
        return None if tuple(g) == e else Mismatch(show(e), show(tuple(g)))

    return Exercise("a", 1, "quant_range", qparams.quant_range, compare, lambda: cases,
                    lambda: strat, "unsigned: [0, 2**b - 1]; signed: [-2**(b-1), 2**(b-1) - 1]")


def _a2():
    x3 = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2) - 5
    cases = [Case(dict(x=t([3.0, -1.0, 2.0]), axis=None)),
             Case(dict(x=t([[1.0, -2.0], [0.5, 4.0], [-3.0, -1.0]]), axis=0)),
             Case(dict(x=x3, axis=1), "per channel along axis 1: reduce over every other axis"),
             Case(dict(x=x3, axis=-1), "a negative axis counts from the end, as in PyTorch"),
             Case(dict(x=t([2.0, 2.0]), axis=None), "min == max is a valid range")]

    @st.composite
    def strat(draw):
        x = draw(_shaped())
        axis = draw(st.one_of(st.none(), st.integers(-x.dim(), x.dim() - 1)))
        return Case(dict(x=x, axis=axis))

    def oracle(x, axis=None):
        return qparams.calc_min_max(x, axis=axis)

    return Exercise("a", 2, "calc_min_max", oracle,
                    same_tuple(("min_val", exact_ints_or_floats), ("max_val", exact_ints_or_floats)),
                    lambda: cases, strat,
                    "per tensor: x.min(), x.max(); per channel: move `axis` first, flatten the rest,"
                    " reduce over dim 1")


def exact_ints_or_floats(e, g, what=""):
    return same_floats(e, g, what)


def _scale_zp_compare():
    return same_tuple(("scale", close(1e-6)), ("zero_point", exact_ints))


def _a3():
    zero_ch = (t([-1.0, 0.0, 2.0]), t([1.0, 0.0, 5.0]))
    cases = [
        # first a case where min / scale = -1 exactly (any rounding agrees), then the rounding cases, each
        # with the hint for its own mistake
        Case(dict(min_val=t(-1.0), max_val=t(254.0), num_bits=8, signed=False)),
        Case(dict(min_val=t(-0.7), max_val=t(254.3), num_bits=8, signed=False),
             "round the zero point (torch.round); int() truncates toward zero"),
        Case(dict(min_val=t(-1.5), max_val=t(253.5), num_bits=8, signed=False),
             "a tie: min/scale = -1.5 exactly; round half to even with torch.round (int() truncates,"
             " floor(x + 0.5) rounds ties up)"),
        Case(dict(min_val=t(-1.0), max_val=t(3.0), num_bits=8, signed=False)),
        Case(dict(min_val=t(2.0), max_val=t(10.0), num_bits=8, signed=False),
             "a range that excludes 0: widen it to include 0 first (min <= 0 <= max), so real 0 "
             "is exactly representable"),
        Case(dict(min_val=t(-10.0), max_val=t(-2.0), num_bits=8, signed=True),
             "a range that excludes 0: widen it to include 0 first"),
        Case(dict(min_val=t(0.0), max_val=t(0.0), num_bits=8, signed=False),
             "min == max == 0: floor the scale at EPS (torch.finfo(torch.float32).eps), never 0"),
        Case(dict(min_val=t(3.0), max_val=t(3.0), num_bits=8, signed=False),
             "min == max: widen to include 0, then the range is [0, 3]"),
        Case(dict(min_val=zero_ch[0], max_val=zero_ch[1], num_bits=8, signed=False),
             "per channel with an all-zero channel: the same formula element-wise, scale floored "
             "at EPS"),
        Case(dict(min_val=t(-1.0), max_val=t(3.0), num_bits=4, signed=True)),
        Case(dict(min_val=t(-1e-30), max_val=t(1e-30), num_bits=8, signed=False),
             "an extremely small range: the scale is floored at EPS"),
        Case(dict(min_val=t(-3e30), max_val=t(1e30), num_bits=8, signed=False),
             "an extremely large range: compute in float32 tensors; clamp the zero point"),
    ]

    @st.composite
    def strat(draw):
        lo, hi = draw(_range_pair(draw(st.booleans())))
        b, s = draw(_bits())
        return Case(dict(min_val=lo, max_val=hi, num_bits=b, signed=s))

    def oracle(min_val, max_val, num_bits=8, signed=False):
        return qparams.calc_scale_zero_point(min_val, max_val, num_bits, signed, symmetric=False)

    return Exercise("a", 3, "calc_scale_zero_point", oracle, _scale_zp_compare(), lambda: cases,
                    strat, "widen the range to include 0; scale = (max - min) / (quant_max - "
                    "quant_min) floored at EPS; zero_point = quant_min - round(min / scale), "
                    "clamped, as int32")


def _a4():
    cases = [
        Case(dict(min_val=t(-1.0), max_val=t(0.5), num_bits=8, signed=True)),
        Case(dict(min_val=t(-1.0), max_val=t(0.5), num_bits=8, signed=False),
             "unsigned symmetric: the zero point is the middle, 2**(num_bits-1)"),
        Case(dict(min_val=t([-1.0, 0.0, -0.25]), max_val=t([2.0, 0.0, 0.5]), num_bits=8,
                  signed=True), "an all-zero channel: floor the scale at EPS"),
        Case(dict(min_val=t(2.0), max_val=t(10.0), num_bits=4, signed=True),
             "amax = max(|min|, |max|) (10 here), divided by (quant_max - quant_min) / 2, not "
             "by max - min"),
        Case(dict(min_val=t(-1e-30), max_val=t(1e-30), num_bits=8, signed=True),
             "an extremely small range: the scale is floored at EPS"),
    ]

    @st.composite
    def strat(draw):
        lo, hi = draw(_range_pair(draw(st.booleans())))
        b, s = draw(_bits())
        return Case(dict(min_val=lo, max_val=hi, num_bits=b, signed=s))

    def oracle(min_val, max_val, num_bits=8, signed=True):
        return qparams.calc_scale_zero_point(min_val, max_val, num_bits, signed, symmetric=True)

    return Exercise("a", 4, "calc_scale_zero_point_symmetric", oracle, _scale_zp_compare(),
                    lambda: cases, strat,
                    "scale = max(|min|, |max|) / ((quant_max - quant_min) / 2) floored at EPS; "
                    "zero_point 0 when signed, 2**(num_bits-1) when unsigned")


# pairs (x, scale) where x / scale and x * f32(1 / scale) round to different integers
RECIPROCAL_CASES = [(0.18319496512413025, 0.04070999100804329),
                    (-3.832268238067627, 0.06440787017345428)]


def _a5():
    zp = lambda v: t(v, torch.int32)  # noqa: E731
    x_r, s_r = RECIPROCAL_CASES[0]
    x_n, s_n = RECIPROCAL_CASES[1]
    cases = [
        Case(dict(x=t([-1.0, 0.0, 0.5, 1.0]), scale=t(0.01), zero_point=zp(100), num_bits=8,
                  signed=False)),
        Case(dict(x=t([0.25, 0.75, -0.25, -0.75, 1.25]), scale=t(0.5), zero_point=zp(127),
                  num_bits=8, signed=False),
             "ties at .5: round half to even (torch.round), as every PyTorch engine, and only then "
             "add the zero point (with an odd zero point, adding it first moves each tie)"),
        Case(dict(x=t([-1000.0, 1000.0, 0.0]), scale=t(0.1), zero_point=zp(10), num_bits=8,
                  signed=False), "clamp to [quant_min, quant_max] after adding the zero point"),
        Case(dict(x=t([-1000.0, 1000.0]), scale=t(0.1), zero_point=zp(0), num_bits=4,
                  signed=True), "clamp to the signed range of num_bits"),
        Case(dict(x=t([x_r]), scale=t(s_r), zero_point=zp(0), num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale) as PyTorch does; dividing by the "
             "scale rounds this value to the other integer"),
        Case(dict(x=t([x_n]), scale=t(s_n), zero_point=zp(128), num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale) as PyTorch does, do not divide"),
        Case(dict(x=t([1e-7, -1e-7, 1.0]), scale=t(EPS), zero_point=zp(0), num_bits=8,
                  signed=True), "an extremely small scale: most values clamp"),
        Case(dict(x=t([1.0, -5.0]), scale=t(1e30), zero_point=zp(3), num_bits=8, signed=False),
             "an extremely large scale: every value maps to the zero point"),
    ]

    @st.composite
    def strat(draw):
        b, s = draw(_bits())
        lo, hi = qparams.quant_range(b, s)
        x = draw(vector(floats32(-1e4, 1e4)))
        scale = draw(floats32(1e-6, 1e3))
        z = draw(st.integers(lo, hi))
        return Case(dict(x=x, scale=t(scale), zero_point=zp(z), num_bits=b, signed=s))

    def oracle(x, scale, zero_point, num_bits=8, signed=False):
        return quantize(x, scale, zero_point, num_bits, signed)

    return Exercise("a", 5, "quantize", oracle, exact_ints, lambda: cases, strat,
                    "q = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max), "
                    "rounded half to even, as int32")


def _a6():
    cases = [
        Case(dict(q=t([92, 124, 148], torch.int32), scale=t(0.034925), zero_point=t(124,
                                                                                  torch.int32))),
        Case(dict(q=t([0, 1, 255], torch.uint8), scale=t(0.5), zero_point=t(128, torch.int32)),
             "q is uint8 here: q - zero_point wraps around in uint8; convert q to int32 (or "
             "float) first"),
        Case(dict(q=t([-128, 0, 127], torch.int8), scale=t(0.25), zero_point=t(-3, torch.int32)),
             "q is int8 here: q - zero_point can overflow int8; convert q to int32 first"),
    ]

    @st.composite
    def strat(draw):
        b, s = draw(_bits())
        lo, hi = qparams.quant_range(b, s)
        q = draw(st.lists(st.integers(lo, hi), min_size=1, max_size=8))
        z = draw(st.integers(lo, hi))
        scale = draw(floats32(1e-6, 1e3))
        return Case(dict(q=t(q, torch.int32), scale=t(scale), zero_point=t(z, torch.int32)))

    def oracle(q, scale, zero_point):
        return dequantize(q, scale, zero_point)

    return Exercise("a", 6, "dequantize", oracle, lambda e, g: same_floats(e, g, rtol=1e-6),
                    lambda: cases, strat, "x_hat = scale * (q - zero_point), in float32, with q "
                    "converted from its integer dtype before subtracting")


def _a7():
    zp = lambda v: t(v, torch.int32)  # noqa: E731
    x3 = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2) / 4 - 1.3
    cases = [
        Case(dict(x=t([[0.5, -1.0], [2.0, 0.1]]), scale=t([0.01, 0.02]), zero_point=zp([0, 10]),
                  axis=0, num_bits=8, signed=True)),
        Case(dict(x=t([[RECIPROCAL_CASES[0][0]], [RECIPROCAL_CASES[1][0]]]),
                  scale=t([RECIPROCAL_CASES[0][1], RECIPROCAL_CASES[1][1]]), zero_point=zp([0, 128]),
                  axis=0, num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale[c]) as PyTorch does; dividing by the "
             "scale rounds these values to the other integer"),
        Case(dict(x=x3, scale=t([0.1, 0.2, 0.05]), zero_point=zp([1, -2, 0]), axis=1, num_bits=8,
                  signed=True), "per channel along axis 1: reshape scale and zero_point to "
             "broadcast along `axis`, e.g. shape (1, C, 1)"),
        Case(dict(x=t([[0.0, 0.0], [0.3, -0.3]]), scale=t([EPS, 0.1]), zero_point=zp([0, 0]),
                  axis=0, num_bits=8, signed=True), "an all-zero channel (scale EPS) maps to "
             "its zero point"),
        Case(dict(x=t([[0.25, 0.75], [-0.25, -0.75]]), scale=t([0.5, 0.5]), zero_point=zp([1, 1]),
                  axis=0, num_bits=8, signed=True),
             "ties at .5: round half to even, then add the zero point (an odd zero point added "
             "before rounding moves each tie)"),
        Case(dict(x=t([[100.0, -100.0]]), scale=t([0.1]), zero_point=zp([3]), axis=0,
                  num_bits=4, signed=False), "clamp to [quant_min, quant_max]"),
    ]

    @st.composite
    def strat(draw):
        x = draw(_shaped())
        axis = draw(st.integers(0, x.dim() - 1))
        c = x.shape[axis]
        b, s = draw(_bits())
        lo, hi = qparams.quant_range(b, s)
        scale = draw(st.lists(floats32(1e-5, 1e2), min_size=c, max_size=c))
        z = draw(st.lists(st.integers(lo, hi), min_size=c, max_size=c))
        return Case(dict(x=x, scale=t(scale), zero_point=zp(z), axis=axis, num_bits=b, signed=s))

    def oracle(x, scale, zero_point, axis, num_bits=8, signed=False):
        return quantize(x, scale, zero_point, num_bits, signed, axis=axis)

    return Exercise("a", 7, "quantize_per_channel", oracle, exact_ints, lambda: cases, strat,
                    "quantize as in a5 with scale[c], zero_point[c] for channel c along `axis` "
                    "(reshape them to broadcast)")




def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_a1(), _a2(), _a3(), _a4(), _a5(), _a6(), _a7()]
