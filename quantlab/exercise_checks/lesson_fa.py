"""The checks of exercises/fa_exercises.ipynb: LSQ's step gradient and LSQ fake quantization with its
gradient scale (notebook fa_learned_step_size). The oracle is autograd of quantlab's own
``learned.lsq_fake_quantize`` (with ``learned.lsq_grad_scale``)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .. import qparams
from ..learned import lsq_fake_quantize, lsq_grad_scale
from .common import Case, Exercise, Mismatch, _bits, floats32, same_floats, show, t
from .lesson_a import RECIPROCAL_CASES


def _zp(v):
    return t(v, torch.int32)


def _step_gradient(x, scale, zero_point, quant_min, quant_max):
    """d x_hat / d S per value: autograd of quantlab's LSQ with one step per value (g = 1)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    step = torch.full((n,), float(scale), dtype=torch.float32, requires_grad=True)
    zp = torch.as_tensor(zero_point).to(torch.int32).reshape(()).expand(n)
    y = lsq_fake_quantize(flat, step, zp, quant_min, quant_max, axis=0, grad_scale=1.0)
    y.backward(torch.ones_like(y))
    return step.grad.reshape(x.shape)


@st.composite
def _lsq_range(draw):
    """(quant_min, quant_max, zero_point) with Q_p = quant_max - Z >= 1."""
    b, s = draw(_bits().filter(lambda bs: bs[0] <= 8))
    lo, hi = qparams.quant_range(b, s)
    return lo, hi, draw(st.integers(lo, hi - 1))


def _fa1():
    x_r, s_r = RECIPROCAL_CASES[0]
    cases = [
        Case(dict(x=t([-0.3, 0.1, 0.35]), scale=t(0.5), zero_point=_zp(0), quant_min=-2, quant_max=1),
             "inside the range d x_hat / dS = round(t) - t: the straight-through estimator takes round's "
             "derivative as 1, so the -t term stays (with round's derivative 0 only round(t) would be left)"),
        Case(dict(x=t([-1.4, -0.9]), scale=t(0.5), zero_point=_zp(0), quant_min=-2, quant_max=1),
             "below the range (t <= -Q_n) the gradient is -Q_n, a negative number: the clipped value "
             "S * (-Q_n) falls as S grows"),
        Case(dict(x=t([0.6, 1.2, 0.2]), scale=t(0.5), zero_point=_zp(0), quant_min=-2, quant_max=1),
             "LSQ's boundaries are on t = x / S itself, not on the rounded value (notebook f's mask): "
             "t = 1.2 > Q_p = 1 is clipped, its gradient is Q_p"),
        Case(dict(x=t([0.5, -1.0, 0.25]), scale=t(0.5), zero_point=_zp(0), quant_min=-2, quant_max=1),
             "at t = Q_p or t = -Q_n exactly the value counts as clipped (t >= Q_p, t <= -Q_n): its "
             "gradient is Q_p or -Q_n, not round(t) - t = 0"),
        Case(dict(x=t([-1.0, 0.3, 3.5]), scale=t(0.25), zero_point=_zp(3), quant_min=0, quant_max=15),
             "the levels are counted from the zero point: -Q_n = quant_min - Z and Q_p = quant_max - Z"),
        Case(dict(x=t([x_r]), scale=t(s_r), zero_point=_zp(0), quant_min=0, quant_max=255),
             "t = x * (1 / S) with the float32 reciprocal, as quantize and quantlab; dividing by S "
             "rounds this t (a near-tie) to the other integer"),
        Case(dict(x=t([[-3.0, 0.7], [2.2, 9.0]]), scale=t(0.5), zero_point=_zp(-1), quant_min=-8,
                  quant_max=7), "a 2-d x: the same formula element by element, x's shape"),
    ]

    @st.composite
    def strat(draw):
        lo, hi, z = draw(_lsq_range())
        scale = draw(floats32(1e-3, 1e2))
        x = draw(st.lists(floats32(-300.0, 300.0), min_size=1, max_size=8))
        return Case(dict(x=t(x), scale=t(scale), zero_point=_zp(z), quant_min=lo, quant_max=hi))

    return Exercise("fa", 1, "lsq_step_gradient", _step_gradient,
                    lambda e, g: same_floats(e, g, rtol=1e-6, atol=1e-6), lambda: cases, strat,
                    "t = x * (1 / S); round(t) - t strictly inside (-Q_n, Q_p), -Q_n where t <= -Q_n, "
                    "Q_p where t >= Q_p, with -Q_n = quant_min - Z and Q_p = quant_max - Z")


def _fa2():
    x_r, s_r = RECIPROCAL_CASES[0]

    def oracle(x, scale, zero_point, quant_min, quant_max, grad=None):
        xx = x.detach().clone().requires_grad_(True)
        s = scale.detach().clone().requires_grad_(True)
        g = lsq_grad_scale(x[0].numel(), int(quant_max - zero_point))
        y = lsq_fake_quantize(xx, s, zero_point, quant_min, quant_max, grad_scale=g)
        grad = grad if grad is not None else torch.ones_like(y)
        y.backward(grad)
        ds = _step_gradient(x, scale, zero_point, quant_min, quant_max)
        bound = float((grad * ds).abs().sum()) * g     # the size of the step gradient's terms
        return y.detach(), xx.grad, s.grad, bound

    def call(fn, x, scale, zero_point, quant_min, quant_max, grad=None):
        xx = x.detach().clone().requires_grad_(True)
        s = scale.detach().clone().requires_grad_(True)
        y = fn(xx, s, zero_point, quant_min, quant_max)
        if not isinstance(y, torch.Tensor):
            return y, None, None
        if not y.requires_grad:
            return y.detach(), "no gradient", None
        y.backward(grad if grad is not None else torch.ones_like(y))
        return y.detach(), xx.grad, s.grad

    def compare(e, g):
        y, gx, gs = g
        m = same_floats(e[0], y, "forward", rtol=1e-6)
        if m is not None:
            return m
        for what, want, got in (("gradient of x", e[1], gx), ("gradient of scale", e[2], gs)):
            if not isinstance(got, torch.Tensor):
                return Mismatch(f"{what}: {show(want)}", f"{what}: {got if isinstance(got, str) else None}",
                                "the output must depend on x and on scale through autograd: add "
                                "(x - x.detach()) * inside and (scale - scale.detach()) * (g * ds) to the "
                                "detached forward value, or write a torch.autograd.Function")
        m = same_floats(e[1], gx, "gradient of x")
        if m is not None:
            return m
        # a sum of float32 terms: its rounding depends on the order, so a tolerance relative to the terms
        return same_floats(e[2], gs, "gradient of scale", atol=1e-5 * e[3] + 1e-12)

    cases = [
        Case(dict(x=t([[-0.75, 0.5, 1.25, 2.0]]), scale=t(0.5), zero_point=_zp(0), quant_min=-8,
                  quant_max=7), "multiply the step's gradient by g = 1 / sqrt(N * Q_p), LSQ's gradient "
             "scale (here N = 4, Q_p = 7)"),
        Case(dict(x=t([[-0.75, 0.5], [1.25, 2.0], [0.3, -0.2]]), scale=t(0.5), zero_point=_zp(0),
                  quant_min=-8, quant_max=7),
             "N counts the values of one image (x[0].numel(), here 2), not those of the whole batch "
             "(6): g = 1 / sqrt(N * Q_p)"),
        Case(dict(x=t([[-10.0, 3.3, 20.1]]), scale=t(0.25), zero_point=_zp(100), quant_min=0,
                  quant_max=255), "Q_p = quant_max - Z, the levels above the zero point (155 here), "
             "not quant_max"),
        Case(dict(x=t([[0.6, -1.0, 0.2, 1.0]]), scale=t(0.5), zero_point=_zp(0), quant_min=-2,
                  quant_max=1),
             "the gradient of x is 1 only strictly inside -Q_n < t < Q_p, on t = x / S itself (LSQ's "
             "boundaries), not where the rounded value lies in the range (notebook f's mask)"),
        Case(dict(x=t([[x_r]]), scale=t(s_r), zero_point=_zp(0), quant_min=0, quant_max=255),
             "multiply by the float32 reciprocal (1 / S) as quantlab and PyTorch do; dividing by S "
             "rounds this value to the other integer"),
        Case(dict(x=t([[0.1, -0.2, 0.3], [5.0, -5.0, 0.0]]), scale=t(0.1), zero_point=_zp(0),
                  quant_min=-8, quant_max=7, grad=t([[2.0, -3.0, 0.5], [1.0, 1.0, -1.0]])),
             "pass the incoming gradient through: x's gradient is it times the mask, the step's "
             "g * sum(grad * d x_hat / dS)"),
    ]

    @st.composite
    def strat(draw):
        lo, hi, z = draw(_lsq_range())
        rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 5))
        scale = draw(floats32(1e-3, 1e2))
        vals = draw(st.lists(floats32(-300.0, 300.0), min_size=rows * cols, max_size=rows * cols))
        grad = draw(st.lists(floats32(-10.0, 10.0), min_size=rows * cols, max_size=rows * cols))
        return Case(dict(x=t(vals).reshape(rows, cols), scale=t(scale), zero_point=_zp(z), quant_min=lo,
                         quant_max=hi, grad=t(grad).reshape(rows, cols)))

    return Exercise("fa", 2, "lsq_fake_quantize", oracle, compare, lambda: cases, strat,
                    "forward: S * (clamp(round(x * (1 / S)) + Z) - Z); x's gradient where -Q_n < t < Q_p; "
                    "the step's: g * sum(grad * d x_hat / dS), g = 1 / sqrt(x[0].numel() * (quant_max - Z))",
                    max_examples=20, extra={"call": call})


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_fa1(), _fa2()]
