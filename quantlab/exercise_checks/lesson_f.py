"""The checks of exercises/f_exercises.ipynb: fake quantization with a straight-through gradient (notebook
f_quantization_aware_training)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .. import qparams
from ..observer import QParam
from ..quantize import fake_quantize
from .common import (
    Case,
    Exercise,
    Mismatch,
    _bits,
    _range_pair,
    close,
    floats32,
    same_floats,
    same_tuple,
    show,
    t,
    vector,
)
from .lesson_a import RECIPROCAL_CASES


def _fq_oracle(x, scale, zero_point, num_bits=8, signed=False, grad=None):
    xx = x.detach().clone().requires_grad_(True)
    y = fake_quantize(xx, scale, zero_point, num_bits, signed)
    y.backward(grad if grad is not None else torch.ones_like(y))
    return y.detach(), xx.grad


def _f1():
    zp = lambda v: t(v, torch.int32)  # noqa: E731
    cases = [
        # each case catches one more mistake (in this order; see lesson_f.py's MISTAKES)
        Case(dict(x=t([0.07, 0.12, 0.0]), scale=t(0.1), zero_point=zp(3), num_bits=4, signed=False),
             "round to the nearest integer (torch.round): torch.trunc and .to(torch.int32) truncate "
             "toward zero (0.7 -> 0 instead of 1)"),
        Case(dict(x=t([-0.3, 0.0, 0.26, 0.5]), scale=t(0.1), zero_point=zp(3), num_bits=4,
                  signed=False)),
        Case(dict(x=t([-10.0, 10.0, 0.5]), scale=t(0.1), zero_point=zp(8), num_bits=4, signed=False,
                  grad=t([0.0, 0.0, 1.0])),
             "do not hard-code 8 bits: quant_min and quant_max come from num_bits and signed "
             "(quant_range; here 4 bits unsigned: [0, 15])"),
        Case(dict(x=t([-10.0, -1.0, 1.0, 10.0]), scale=t(0.1), zero_point=zp(8), num_bits=4,
                  signed=False), "the gradient is 0 where x was clamped (outside the range) and 1 "
             "inside"),
        Case(dict(x=t([0.74, 0.76, -0.34, -0.36]), scale=t(0.1), zero_point=zp(3), num_bits=3,
                  signed=False), "the mask is on the rounded value, as torch.fake_quantize_per_"
             "tensor_affine: round(x * (1 / S)) + Z inside [quant_min, quant_max] has gradient 1"),
        Case(dict(x=t([-0.75, 0.75, 1.75]), scale=t(0.5), zero_point=zp(0), num_bits=8,
                  signed=True), "ties at .5: torch.round rounds half to even, -1.5 -> -2; floor(x + "
             "0.5) rounds it up to -1"),
        Case(dict(x=t([0.25, 0.75, -0.25]), scale=t(0.5), zero_point=zp(1), num_bits=8,
                  signed=True), "round first, then add the zero point: with an odd zero point, "
             "adding it before rounding moves each tie"),
        Case(dict(x=t([0.1, -0.2, 0.3]), scale=t(0.1), zero_point=zp(0), num_bits=8, signed=True,
                  grad=t([2.0, -3.0, 0.5])), "pass the incoming gradient through (multiply it by "
             "the mask), do not replace it by 1"),
        Case(dict(x=t([RECIPROCAL_CASES[0][0]]), scale=t(RECIPROCAL_CASES[0][1]), zero_point=zp(0),
                  num_bits=8, signed=False),
             "multiply by the float32 reciprocal (1 / scale) as a5 and PyTorch do; dividing by the "
             "scale rounds this value to the other integer"),
        Case(dict(x=t([0.1, -0.1, 3276.7]), scale=t(0.1), zero_point=zp(32768), num_bits=16,
                  signed=False),
             "16 bits: compute (clamp(q) - Z) * S; clamp(q) * S - Z * S subtracts two large, nearly "
             "equal float32 numbers and loses digits (cancellation)"),
    ]

    @st.composite
    def strat(draw):
        b, s = draw(_bits())
        lo, hi = qparams.quant_range(b, s)
        x = draw(vector(floats32(-1e3, 1e3)))
        g = draw(vector(floats32(-10.0, 10.0), x.numel(), x.numel()))
        return Case(dict(x=x, scale=t(draw(floats32(1e-3, 1e2))), zero_point=zp(draw(
            st.integers(lo, hi))), num_bits=b, signed=s, grad=g))

    def call(fn, x, scale, zero_point, num_bits=8, signed=False, grad=None):
        xx = x.detach().clone().requires_grad_(True)
        y = fn(xx, scale, zero_point, num_bits, signed)
        if not isinstance(y, torch.Tensor):
            return y, None
        if not y.requires_grad:
            return y.detach(), "no gradient"
        y.backward(grad if grad is not None else torch.ones_like(y))
        return y.detach(), xx.grad

    def compare(e, g):
        y, grad = g
        m = same_floats(e[0], y, "forward", rtol=1e-6)
        if m is not None:
            return m
        ste = ("round() has zero gradient: pass the gradient straight through, e.g. "
               "x_hat.detach() + (x - x.detach()) * inside, or an autograd.Function")
        if grad is None or isinstance(grad, str):
            return Mismatch("gradient " + show(e[1]), "no gradient (the output does not require "
                            "grad)", ste)
        m = same_floats(e[1], grad, "gradient")
        if m is not None and m.hint is None and isinstance(grad, torch.Tensor) and \
                bool((grad == 0).all()) and bool((e[1] != 0).all()):
            m.hint = ste
        return m

    return Exercise("f", 1, "fake_quantize", _fq_oracle, compare, lambda: cases, strat,
                    "forward: scale * (clamp(round(x * (1 / scale)) + Z) - Z); backward: the "
                    "incoming gradient where round(x * (1 / scale)) + Z is inside [quant_min, "
                    "quant_max], else 0",
                    extra={"call": call})


def _f2():
    cases = [
        # each case catches one more mistake (in this order; see lesson_f.py's MISTAKES)
        Case(dict(min_val=None, max_val=None, x=t([-1.0, 2.0, 0.5]), averaging_constant=0.01),
             "the first batch (min_val is None): return the batch's own min and max"),
        Case(dict(min_val=t(-1.0), max_val=t(1.0), x=t([0.0, 0.1]), averaging_constant=0.5),
             "a moving average can shrink the range too: it is not a running min and max"),
        Case(dict(min_val=t(-1.0), max_val=t(1.0), x=t([-3.0, 5.0]), averaging_constant=0.1),
             "min <- min + c * (batch_min - min): c weighs the new batch (0.1 here), 1 - c the old "
             "range"),
        Case(dict(min_val=t(-1.0), max_val=t(1.0), x=t([-3.0, 5.0]), averaging_constant=1.0),
             "c = 1 takes the batch's range"),
    ]

    @st.composite
    def strat(draw):
        first = draw(st.booleans())
        x = draw(vector(floats32(-100.0, 100.0)))
        lo, hi = draw(_range_pair(False))
        c = draw(floats32(0.001, 1.0))
        return Case(dict(min_val=None if first else lo, max_val=None if first else hi, x=x,
                         averaging_constant=c))

    def oracle(min_val, max_val, x, averaging_constant=0.01):
        qp = QParam(averaging_constant=averaging_constant)
        if min_val is not None:
            qp.set_range(min_val, max_val)
        qp.update(x)
        return qp.min_val, qp.max_val

    plain = same_tuple(("min_val", close(1e-5, 1e-6)), ("max_val", close(1e-5, 1e-6)))

    def compare(e, g):
        if isinstance(g, (tuple, list)) and len(g) == 2 and \
                not all(isinstance(v, torch.Tensor) for v in g):
            return Mismatch(f"tensors {show(tuple(e))}", show(tuple(g)) + " (" + ", ".join(
                type(v).__name__ for v in g) + ")", "return float32 tensors of shape () (x.min()), "
                "not Python floats (.item())")
        return plain(e, g)

    return Exercise("f", 2, "moving_average_range", oracle, compare,
                    lambda: cases, strat,
                    "first batch: (x.min(), x.max()); then min + c * (x.min() - min), max + c * "
                    "(x.max() - max)")




def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_f1(), _f2()]
