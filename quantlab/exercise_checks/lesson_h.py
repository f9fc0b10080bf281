"""The checks of exercises/h_exercises.ipynb: the residual add's two multipliers, the integer-only add, and
average pooling's rounding division (notebook h_your_own_model). Oracles: quantlab.ops (``add_multipliers``,
``quantized_add``, ``avg_pool_requantize``), bit-exact with PyTorch's qnnpack kernels (tests/test_ops.py), and
``ops.QAvgPool2d.sums_and_counts`` for the window sums and sizes."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .. import ops, qparams
from .common import Case, Exercise, Mismatch, exact_ints, floats32, show, t


def _h1():
    cases = [
        Case(dict(scale_1=t(1.0), scale_2=t(1.5), scale_a=t(1.0)),
             "e is the exponent of the larger multiplier (2**e <= M < 2**(e + 1)): shift = 21 - e, so that "
             "the larger times 2**shift lands in [2**21, 2**22)"),
        Case(dict(scale_1=t(1.0), scale_2=t(0.25), scale_a=t(1.0)),
             "the shift comes from the larger multiplier (here M_1 = 1): from the smaller one, m_1 would "
             "need more than 22 bits"),
        Case(dict(scale_1=t(1.0), scale_2=t(1.0 / 3.0), scale_a=t(1.0)),
             "round M * 2**shift to the nearest integer: int() truncates (M_2 * 2**21 = 699050.67 here)"),
        Case(dict(scale_1=t(0.1761438250541687), scale_2=t(0.08956307172775269),
                  scale_a=t(0.02558855153620243)),
             "divide by S_a, as qnnpack: M = f32(S_1 / S_a); S_1 * f32(1 / S_a) differs in the last bit here "
             "and moves m_1"),
        Case(dict(scale_1=t(0.014538874849677086), scale_2=t(0.022456999868154526),
                  scale_a=t(0.19324766099452972)),
             "M_1 and M_2 are float32 quotients: in float64 m_2 = round(M_2 * 2**shift) comes out one "
             "higher here"),
    ]

    @st.composite
    def strat(draw):
        s_a = draw(floats32(1e-3, 1.0))
        s_1 = draw(floats32(1e-3, 1.0))
        s_2 = draw(floats32(1e-3, 1.0))
        return Case(dict(scale_1=t(s_1), scale_2=t(s_2), scale_a=t(s_a)))

    def oracle(scale_1, scale_2, scale_a):
        m = ops.add_multipliers(scale_1, scale_2, scale_a)
        return m["quantized_multiplier_a"], m["quantized_multiplier_b"], m["shift"]

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 3:
            return Mismatch(show(e), show(g), "return the tuple (m_1, m_2, shift)")
        if not all(type(v) is int for v in g):
            return Mismatch(show(e), f"{show(tuple(g))} ({', '.join(type(v).__name__ for v in g)})",
                            "return three Python ints (int(...) of the rounded tensors)")
        return None if tuple(g) == e else Mismatch(show(e), show(tuple(g)))

    def valid(case):
        try:
            oracle(**case.kwargs)
        except ValueError:   # a ratio outside qnnpack's [2**-14, 2**8): the statement excludes it
            return False
        return True

    return Exercise("h", 1, "add_multipliers", oracle, compare, lambda: cases, lambda: strat().filter(valid),
                    "M_1 = f32(S_1 / S_a), M_2 = f32(S_2 / S_a); shift = 21 - e with 2**e <= max(M_1, M_2) < "
                    "2**(e + 1); m = round(M * 2**shift); Python ints")


def _h2():
    i32, u8 = torch.int32, torch.uint8
    half = (3 * 2**20, 2**21, 21)                  # M_1 = 1.5, M_2 = 1 on the shift 21: exact ties

    def case(q_1, q_2, z_1, z_2, z_a, m, lo=0, hi=255, dtype=i32, hint=""):
        return Case(dict(q_1=t(q_1, dtype), q_2=t(q_2, dtype), zero_point_1=z_1, zero_point_2=z_2,
                         zero_point_a=z_a, m_1=m[0], m_2=m[1], shift=m[2], quant_min=lo, quant_max=hi), hint)

    cases = [
        case([10, 20, 12], [2, 1, 6], 4, 1, 5, (2**21, 2**21 + 2**19, 21),
             hint="add the output zero point Z_a after the shift"),
        case([11, 25, 13], [4, 0, 9], 4, 1, 5, (2**21 + 2**20 + 2**19, 2**21, 21),
             hint="round: add half of 2**shift to |acc| before shifting (a plain >> rounds down)"),
        case([9, 11, 7, 13], [2, 2, 2, 2], 10, 2, 50, half,
             hint="exact ties (-1.5, 1.5, -4.5, 4.5): ties round away from zero, as qnnpack's rounding "
             "shift, not up and not to even"),
        case([0, 200, 250], [255, 3, 0], 128, 100, 128, (2**21, 2**21 - 2**19, 21), dtype=u8,
             hint="q_1 and q_2 are uint8 here: q - Z wraps around in uint8; convert them to int64 first"),
        case([0, 255, 128, 60], [0, 255, 128, 0], 128, 100, 130, (2**21 + 2**20, 2**21, 21), lo=130, hi=255,
             hint="clamp to [quant_min, quant_max] (with a fused ReLU, quant_min = Z_a)"),
    ]

    @st.composite
    def strat(draw):
        signed = draw(st.booleans())
        lo, hi = qparams.quant_range(8, signed)
        size = draw(st.integers(1, 8))
        q_1 = draw(st.lists(st.integers(lo, hi), min_size=size, max_size=size))
        q_2 = draw(st.lists(st.integers(lo, hi), min_size=size, max_size=size))
        z_1, z_2, z_a = (draw(st.integers(lo, hi)) for _ in range(3))
        s_1, s_2, s_a = (draw(floats32(0.01, 1.0)) for _ in range(3))
        m = ops.add_multipliers(s_1, s_2, s_a)
        relu = draw(st.booleans())
        return case(q_1, q_2, z_1, z_2, z_a, (m["quantized_multiplier_a"], m["quantized_multiplier_b"],
                                              m["shift"]), max(lo, z_a) if relu else lo, hi,
                    dtype=torch.int8 if signed and draw(st.booleans()) else i32)

    def oracle(q_1, q_2, zero_point_1, zero_point_2, zero_point_a, m_1, m_2, shift, quant_min, quant_max):
        return ops.quantized_add(q_1, q_2, zero_point_1, zero_point_2, zero_point_a, m_1, m_2, shift,
                                 quant_min, quant_max)

    return Exercise("h", 2, "quantized_add", oracle, exact_ints, lambda: cases, strat,
                    "acc = m_1 (q_1 - Z_1) + m_2 (q_2 - Z_2) in int64; shift right by s rounding half away "
                    "from zero; + Z_a; clamp; int32")


def _windows(a, k):
    """One (1, 1, k, k) window: k*k // 2 values a, the others a + 1."""
    n = k * k
    return torch.tensor([a] * (n // 2) + [a + 1] * (n - n // 2), dtype=torch.int32).reshape(1, 1, k, k)


def _h3():
    def case(q_x, z_x, s_x, s_a, z_a, k, p=0, include=True, lo=0, hi=255, hint=""):
        return Case(dict(q_x=q_x if isinstance(q_x, torch.Tensor) else t(q_x, torch.int32), zero_point_x=z_x,
                         scale_x=t(s_x), scale_a=t(s_a), zero_point_a=z_a, kernel_size=k, padding=p,
                         count_include_pad=include, quant_min=lo, quant_max=hi), hint)

    ramp = torch.arange(2 * 3 * 5 * 4, dtype=torch.int32).reshape(2, 3, 5, 4) * 7 % 256
    cases = [
        case([[[[13, 14, 20, 21], [15, 14, 21, 23]]]], 3, 0.5, 0.5, 3, 2,
             hint="subtract the input's zero point Z_x from each q_x before summing the window"),
        case([[[[13, 15, 20, 21], [15, 16, 21, 25]]]], 3, 0.5, 0.5, 3, 2,
             hint="round to the nearest integer: truncating (or integer division) drops the fraction"),
        case([[[[3, 3, 1, 1], [2, 2, 2, 2]]]], 2, 0.5, 0.5, 10, 2,
             hint="exact ties (sums 2 and -2 over 4, i.e. 0.5 and -0.5): round half to even "
             "(torch.round), not half up"),
        case([[[[4, 4, 8, 8], [4, 6, 8, 8]]]], 2, 0.5, 0.5, 5, 2,
             hint="round first, then add Z_a: with an odd Z_a an exact tie rounds the other way"),
        case(_windows(100, 6), 200, 0.014297368936240673, 0.014297368936240673, 120, 6,
             hint="M = f32(S_x / f32(S_a n)), qnnpack's formula: f32(f32(S_x / S_a) / n) (PyTorch's "
                  "reference kernel) differs in the last bit for n = 36 and moves this sum"),
        case(_windows(50, 6), 100, 0.18662557005882263, 0.17596125602722168, 100, 6,
             hint="the product f32(acc) * M in float32: in float64 this sum rounds the other way"),
        case(ramp, 11, 0.1, 0.05, 7, 2, hint="a batch of 2, 3 channels, 5 x 4 inputs: the last row fills no "
             "window and is dropped; clamp to [quant_min, quant_max]"),
        case([[[[100, 104, 108], [112, 116, 120], [124, 128, 132]]]], 100, 0.5, 0.5, 100, 2, p=1,
             hint="padding is real 0, i.e. q_x = Z_x: subtract Z_x from each input value and pad with 0 (a "
                  "padded q_x = 0 would add -Z_x per padded place)"),
        case([[[[100, 104, 108], [112, 116, 120], [124, 128, 132]]]], 100, 0.5, 0.5, 100, 2, p=1,
             include=False, hint="count_include_pad=False: n counts only the input values in the window "
             "(1, 2 or 4 here), not the padding"),
    ]

    @st.composite
    def strat(draw):
        k = draw(st.integers(1, 4))
        p = draw(st.integers(0, k // 2))
        n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        h, w = k * draw(st.integers(1, 2)) + draw(st.integers(0, k - 1)), k * draw(st.integers(1, 2))
        q = draw(st.lists(st.integers(0, 255), min_size=n * c * h * w, max_size=n * c * h * w))
        s_x = draw(floats32(1e-3, 1.0))
        s_a = s_x if draw(st.booleans()) else draw(floats32(1e-3, 1.0))
        return case(t(q, torch.int32).reshape(n, c, h, w), draw(st.integers(0, 255)), s_x, s_a,
                    draw(st.integers(0, 255)), k, p, draw(st.booleans()))

    def oracle(q_x, zero_point_x, scale_x, scale_a, zero_point_a, kernel_size, padding, count_include_pad,
               quant_min, quant_max):
        pool = ops.QAvgPool2d(kernel_size, kernel_size, padding, count_include_pad=count_include_pad)
        acc, n = pool.sums_and_counts(q_x.to(torch.int64) - zero_point_x)   # exact sums, window sizes
        return ops.avg_pool_requantize(acc, n, scale_x, scale_a, zero_point_a, quant_min, quant_max)

    return Exercise("h", 3, "avg_pool", oracle, exact_ints, lambda: cases, strat,
                    "acc = sum (q_x - Z_x) over each k x k window (padding adds 0); n = k*k, or the input "
                    "values with count_include_pad=False; q_a = clamp(rne(f32(acc) * f32(S_x / f32(S_a n))) "
                    "+ Z_a), int32")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_h1(), _h2(), _h3()]
