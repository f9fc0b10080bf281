"""The checks of exercises/a_exercises.ipynb: quant range, scale and zero point, quantize, dequantize, per
channel (notebook a_basic_quant).

The cases of each exercise are ordered so that each plausible mistake (listed, and planted in a copy of
the solutions, in scripts/exercise_sources/lesson_a.py) first fails on a case whose hint names that
mistake and only it; where no input can tell two mistakes apart (both change every output), the
comparison names the mistake from the value returned.
"""

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

HARD_CODED = "do not hard-code 8 bits: quant_min and quant_max follow from num_bits and signed"


def _a1():
    cases = [Case(dict(num_bits=8, signed=False)), Case(dict(num_bits=8, signed=True)),
             Case(dict(num_bits=2, signed=True)), Case(dict(num_bits=16, signed=True)),
             Case(dict(num_bits=4, signed=False))]
    strat = _bits().map(lambda bs: Case(dict(num_bits=bs[0], signed=bs[1])))

    def diagnose(e, g):
        """The mistake that returns ``g`` for the range ``e`` (the input follows from ``e``)."""
        lo, hi = e
        signed = lo < 0
        b = (hi - lo + 1).bit_length() - 1
        other = (0, 2**b - 1) if signed else (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
        if g == other:
            return ("signed and unsigned swapped: signed is [-2**(b-1), 2**(b-1) - 1], unsigned "
                    "[0, 2**b - 1]")
        if g in ((0, 255), (-128, 127)):
            return HARD_CODED + f" (here {b} bits)"
        if g == (lo, hi + 1):
            return ("off by one: the largest of 2**b levels counted from "
                    + ("-2**(b-1) is 2**(b-1) - 1" if signed else "0 is 2**b - 1"))
        if signed and g == (lo + 1, hi):
            return ("the smallest signed value is -2**(b-1) (-128 for 8 bits): two's complement "
                    "has one more negative number than positive ones")
        return None

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(e), show(g), "return the tuple (quant_min, quant_max)")
        if not all(type(v) is int for v in g):  # exactly int: not a float, a bool or a tensor
            return Mismatch(show(e), f"{show(tuple(g))} ({', '.join(type(v).__name__ for v in g)})",
                            "return two Python ints (int(...) of an exact integer, never of a "
                            "float that is not whole)")
        return None if tuple(g) == e else Mismatch(show(e), show(tuple(g)), diagnose(e, tuple(g)))

    return Exercise("a", 1, "quant_range", qparams.quant_range, compare, lambda: cases,
                    lambda: strat, "unsigned: [0, 2**b - 1]; signed: [-2**(b-1), 2**(b-1) - 1]")


def _a2_compare(e, g):
    """(min_val, max_val): float32 tensors, exactly the oracle's values and shapes."""
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        return Mismatch("a tuple (min_val, max_val)", show(g), "return the tuple (min_val, max_val)")
    if not all(isinstance(v, torch.Tensor) for v in g):
        return Mismatch(f"tensors {show(tuple(e))}", show(tuple(g)) + " (" + ", ".join(
            type(v).__name__ for v in g) + ")", "return float32 tensors (x.min()), not a Python "
            "float (.item()): the statement asks for tensors of shape ()")
    for name, ev, gv in zip(("min_val", "max_val"), e, g):
        if gv.numel() == ev.numel() and tuple(gv.shape) != tuple(ev.shape):
            return Mismatch(f"{name}: shape {tuple(ev.shape)}", f"{name}: shape {tuple(gv.shape)}",
                            "one value per channel, shape (x.shape[axis],): do not keep the reduced "
                            "dimensions (keepdim=False)")
    same_shapes = all(tuple(gv.shape) == tuple(ev.shape) for ev, gv in zip(e, g))
    if same_shapes and torch.equal(g[0], e[1]) and torch.equal(g[1], e[0]) and \
            not torch.equal(e[0], e[1]):
        return Mismatch(show(tuple(e)), show(tuple(g)), "min and max swapped: return "
                        "(min_val, max_val) in this order")
    return same_tuple(("min_val", same_floats), ("max_val", same_floats))(e, g)


def _a2():
    x3 = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2) - 5
    cases = [Case(dict(x=t([3.0, -1.0, 2.0]), axis=None)),
             Case(dict(x=t([[1.0, -2.0], [0.5, 4.0], [-3.0, -1.0]]), axis=0),
                  "one (min, max) per index of `axis`, over all the other axes: x.amin(dim=axis) "
                  "reduces over `axis` itself"),
             Case(dict(x=x3, axis=1), "move `axis` to the front before flattening (x.movedim(axis,"
                  " 0)): reshape alone mixes the channels when axis is not 0"),
             Case(dict(x=x3, axis=-1), "a negative axis counts from the end, as in PyTorch "
                  "(axis=-1 is the last axis)"),
             Case(dict(x=t([2.0, 2.0]), axis=None), "min == max is a valid range")]

    @st.composite
    def strat(draw):
        x = draw(_shaped())
        axis = draw(st.one_of(st.none(), st.integers(-x.dim(), x.dim() - 1)))
        return Case(dict(x=x, axis=axis))

    def oracle(x, axis=None):
        return qparams.calc_min_max(x, axis=axis)

    return Exercise("a", 2, "calc_min_max", oracle, _a2_compare, lambda: cases, strat,
                    "per tensor: x.min(), x.max(); per channel: move `axis` first, flatten the rest,"
                    " reduce over dim 1")


def _scale_zp_compare(diagnose_zero_point=None):
    """(scale, zero_point): scale float32 within 1e-6, zero point int32 exactly; ``diagnose_zero_point``
    (expected, got) may name the mistake behind a wrong zero point."""
    plain = same_tuple(("scale", close(1e-6)), ("zero_point", exact_ints))

    def compare(e, g):
        m = plain(e, g)
        if m is not None and m.hint is None and diagnose_zero_point is not None and \
                m.expected.startswith("zero_point") and isinstance(g[1], torch.Tensor):
            m.hint = diagnose_zero_point(e[1], g[1])
        return m
    return compare


def _a3():
    zero_ch = (t([-1.0, 0.0, 2.0]), t([1.0, 0.0, 5.0]))
    u8 = dict(num_bits=8, signed=False)
    cases = [
        # each case catches one more mistake (in this order; see lesson_a.py's MISTAKES)
        Case(dict(min_val=t(0.0), max_val=t(255.0), **u8),
             "S = (r_max - r_min) / (q_max - q_min): 8 bits have 256 levels but 255 steps between "
             "them, so divide by 255, not by 2**8 = 256"),
        Case(dict(min_val=t(-1.0), max_val=t(254.0), **u8),
             "Z = q_min - round(r_min / S): subtract (here r_min / S = -1, so Z = 0 - (-1) = 1)"),
        Case(dict(min_val=t(-0.7), max_val=t(254.3), **u8),
             "round the zero point (torch.round): int() and .to(torch.int32) truncate toward zero "
             "(-0.7 -> 0 instead of -1)"),
        Case(dict(min_val=t(-1.5), max_val=t(253.5), **u8),
             "a tie: r_min / S = -1.5 exactly; torch.round rounds half to even (-2), floor(x + 0.5) "
             "rounds it up to -1"),
        Case(dict(min_val=t(-2.5), max_val=t(252.5), **u8),
             "a tie: r_min / S = -2.5 exactly; torch.round rounds half to even (-2), rounding half "
             "away from zero gives -3"),
        Case(dict(min_val=t(-1.0), max_val=t(3.0), num_bits=4, signed=False),
             HARD_CODED + " (quant_range; here 4 bits unsigned: [0, 15])"),
        Case(dict(min_val=t(-1.0), max_val=t(3.0), num_bits=8, signed=True),
             "a signed range: Z = q_min - round(r_min / S) with q_min = -128 here; without q_min "
             "you get the unsigned zero point"),
        Case(dict(min_val=t(2.0), max_val=t(10.0), **u8),
             "a range above 0: widen r_min to 0 first (r_min <- min(r_min, 0)), so real 0 is "
             "exactly representable"),
        Case(dict(min_val=t(-10.0), max_val=t(-2.0), num_bits=8, signed=True),
             "a range below 0: widen r_max to 0 too (r_max <- max(r_max, 0))"),
        Case(dict(min_val=t(0.0), max_val=t(0.0), **u8),
             "min == max == 0: floor the scale at EPS (torch.finfo(torch.float32).eps), never 0"),
        Case(dict(min_val=t(3.0), max_val=t(3.0), **u8),
             "min == max: widen to include 0, then the range is [0, 3]"),
        Case(dict(min_val=zero_ch[0], max_val=zero_ch[1], **u8),
             "per channel with an all-zero channel: the same formula element-wise, scale floored "
             "at EPS"),
        Case(dict(min_val=t(-1.0), max_val=t(3.0), num_bits=4, signed=True)),
        Case(dict(min_val=t(-1e-30), max_val=t(1e-30), **u8),
             "an extremely small range: the scale is floored at EPS"),
        Case(dict(min_val=t(-3e30), max_val=t(1e30), **u8),
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


def _a4_zero_point(e, g):
    """Name the unsigned zero point a learner took instead of the middle 2**(num_bits-1)."""
    if e.numel() == 0 or int(e.reshape(-1)[0]) == 0 or tuple(g.shape) != tuple(e.shape) or \
            g.is_floating_point():
        return None
    middle = int(e.reshape(-1)[0])
    if bool((g == 0).all()):
        return (f"unsigned symmetric: the zero point is the middle 2**(num_bits-1) = {middle}, "
                "not 0 (0 is the signed zero point)")
    if bool((g == middle - 1).all()):
        return (f"the middle is 2**(num_bits-1) = {middle}, as quantlab and PyTorch's default "
                f"quint8 range; (q_min + q_max) // 2 = {middle - 1} is what PyTorch's observers "
                "take for other ranges, not this function")
    return None


def _a4():
    s8 = dict(num_bits=8, signed=True)
    cases = [
        Case(dict(min_val=t(-1.0), max_val=t(1.0), **s8),
             "divide by (q_max - q_min) / 2 = 127.5 for 8 bits, not by q_max = 127"),
        Case(dict(min_val=t(-0.5), max_val=t(1.0), **s8),
             "the symmetric range is [-amax, amax] with amax = max(|r_min|, |r_max|) = 1 here: "
             "S = amax / 127.5, not (r_max - r_min) / 255"),
        Case(dict(min_val=t(-1.0), max_val=t(0.5), **s8),
             "amax = max(|r_min|, |r_max|): here |r_min| = 1 is the larger, not r_max = 0.5"),
        Case(dict(min_val=t(-1.0), max_val=t(1.0), num_bits=4, signed=True),
             "(q_max - q_min) / 2 depends on num_bits (7.5 for 4 bits): do not hard-code 127.5"),
        Case(dict(min_val=t(-1.0), max_val=t(0.5), num_bits=8, signed=False),
             "unsigned symmetric: the zero point is the middle, 2**(num_bits-1)"),
        Case(dict(min_val=t([-1.0, 0.0, -0.25]), max_val=t([2.0, 0.0, 0.5]), **s8),
             "an all-zero channel: floor the scale at EPS"),
        Case(dict(min_val=t(2.0), max_val=t(10.0), num_bits=4, signed=True),
             "amax = max(|min|, |max|) (10 here), divided by (quant_max - quant_min) / 2, not "
             "by max - min"),
        Case(dict(min_val=t(-1e-30), max_val=t(1e-30), **s8),
             "an extremely small range: the scale is floored at EPS"),
    ]

    @st.composite
    def strat(draw):
        lo, hi = draw(_range_pair(draw(st.booleans())))
        b, s = draw(_bits())
        return Case(dict(min_val=lo, max_val=hi, num_bits=b, signed=s))

    def oracle(min_val, max_val, num_bits=8, signed=True):
        return qparams.calc_scale_zero_point(min_val, max_val, num_bits, signed, symmetric=True)

    return Exercise("a", 4, "calc_scale_zero_point_symmetric", oracle,
                    _scale_zp_compare(_a4_zero_point), lambda: cases, strat,
                    "scale = max(|min|, |max|) / ((quant_max - quant_min) / 2) floored at EPS; "
                    "zero_point 0 when signed, 2**(num_bits-1) when unsigned")


# pairs (x, scale) where x / scale and x * f32(1 / scale) round to different integers
RECIPROCAL_CASES = [(0.18319496512413025, 0.04070999100804329),
                    (-3.832268238067627, 0.06440787017345428)]
# a pair (x, scale) where x * f32(1 / scale) and x / scale (both float32) round to the same integer, -24,
# but the float64 product x * (1 / scale) rounds to -23 (found by a search offline)
FLOAT64_CASE = (-0.41794678568840027, 0.01778496988117695)


def _a5():
    zp = lambda v: t(v, torch.int32)  # noqa: E731
    s8 = dict(num_bits=8, signed=True)
    u8 = dict(num_bits=8, signed=False)
    x_r, s_r = RECIPROCAL_CASES[0]
    x_n, s_n = RECIPROCAL_CASES[1]
    x_d, s_d = FLOAT64_CASE
    cases = [
        # each case catches one more mistake (in this order; see lesson_a.py's MISTAKES)
        Case(dict(x=t([0.35, 0.6, 1.3]), scale=t(0.5), zero_point=zp(0), **u8),
             "round to the nearest integer (torch.round): .to(torch.int32) and int() truncate "
             "toward zero (0.7 -> 0 instead of 1)"),
        Case(dict(x=t([0.0, 1.0]), scale=t(0.5), zero_point=zp(10), **u8),
             "add the zero point: q = round(x * (1 / S)) + Z (here 0 + 10 and 2 + 10)"),
        Case(dict(x=t([-3.0, 127.0]), scale=t(1.0), zero_point=zp(10), **u8),
             "add the zero point, then clamp: clamping round(x * (1 / S)) before adding Z gives "
             "-3 -> 0 -> 10 instead of 7"),
        Case(dict(x=t([-0.75, 0.75, 1.75]), scale=t(0.5), zero_point=zp(100), **u8),
             "ties at .5: torch.round rounds half to even, -1.5 -> -2; floor(x + 0.5) rounds it "
             "up to -1"),
        Case(dict(x=t([0.25, -0.25, 1.25, -1.25]), scale=t(0.5), zero_point=zp(100), **u8),
             "ties at .5: torch.round rounds half to even (0.5 -> 0, 2.5 -> 2), as every PyTorch "
             "engine; rounding half away from zero gives 1 and 3"),
        Case(dict(x=t([0.25, 0.75, -0.25]), scale=t(0.5), zero_point=zp(127), **u8),
             "round first, then add the zero point: with an odd zero point, adding it before "
             "rounding moves each tie (0.5 + 127 = 127.5 -> 128, but round(0.5) + 127 = 127)"),
        Case(dict(x=t([-1000.0, 1000.0, 0.0]), scale=t(0.1), zero_point=zp(10), **u8),
             "clamp to [quant_min, quant_max] after adding the zero point"),
        Case(dict(x=t([-1000.0, 1000.0]), scale=t(0.1), zero_point=zp(0), num_bits=4,
                  signed=True), HARD_CODED + " (quant_range; here 4 bits signed: [-8, 7])"),
        Case(dict(x=t([x_d]), scale=t(s_d), zero_point=zp(100), **u8),
             "compute in float32, as PyTorch: x * f32(1 / scale) in float64 rounds this value to "
             "the other integer"),
        Case(dict(x=t([x_r]), scale=t(s_r), zero_point=zp(0), num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale) as PyTorch does; dividing by the "
             "scale rounds this value to the other integer"),
        Case(dict(x=t([x_n]), scale=t(s_n), zero_point=zp(128), num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale) as PyTorch does, do not divide"),
        Case(dict(x=t([1e-7, -1e-7, 1.0]), scale=t(EPS), zero_point=zp(0), **s8),
             "an extremely small scale: most values clamp"),
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
        Case(dict(q=t([1, -2, 3], torch.int32), scale=t(0.5), zero_point=t(0, torch.int32)),
             "multiply by the scale: x_hat = S * (q - Z) (quantize multiplies by 1 / S, dequantize "
             "by S)"),
        Case(dict(q=t([92, 124, 148], torch.int32), scale=t(1.0), zero_point=t(124, torch.int32)),
             "subtract the zero point: x_hat = S * (q - Z)"),
        Case(dict(q=t([92, 124, 148], torch.int32), scale=t(0.034925),
                  zero_point=t(124, torch.int32))),
        Case(dict(q=t([0, 1, 255], torch.uint8), scale=t(0.5), zero_point=t(128, torch.int32)),
             "q is uint8 here: q - zero_point wraps around in uint8; convert q to int32 (or "
             "float) first"),
        Case(dict(q=t([-128, 0, 127], torch.int8), scale=t(0.25), zero_point=t(-3, torch.int32)),
             "q is int8 here: q - zero_point can overflow int8; convert q to int32 first"),
        Case(dict(q=t([32769, 65535, 32767], torch.int32), scale=t(0.1),
                  zero_point=t(32768, torch.int32)),
             "16 bits: compute (q - Z) * S; q * S - Z * S subtracts two large, nearly equal float32 "
             "numbers and loses digits (cancellation)"),
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
                  axis=0, num_bits=8, signed=True),
             "scale[c] belongs to index c of `axis`: reshape scale and zero_point (here to (2, 1)); "
             "as they are, they broadcast along the last axis"),
        Case(dict(x=t([[RECIPROCAL_CASES[0][0]], [RECIPROCAL_CASES[1][0]]]),
                  scale=t([RECIPROCAL_CASES[0][1], RECIPROCAL_CASES[1][1]]), zero_point=zp([0, 128]),
                  axis=0, num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale[c]) as PyTorch does; dividing by the "
             "scale rounds these values to the other integer"),
        Case(dict(x=x3, scale=t([0.1, 0.2, 0.05]), zero_point=zp([1, -2, 0]), axis=1, num_bits=8,
                  signed=True), "per channel along axis 1: reshape scale and zero_point to "
             "broadcast along `axis`, e.g. shape (1, C, 1), not always along axis 0"),
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
