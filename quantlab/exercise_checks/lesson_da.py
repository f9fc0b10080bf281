"""The checks of exercises/da_exercises.ipynb: the percentile range of a histogram, the MSE of every candidate
clip and the best clip, AdaRound's rectified sigmoid and regulariser (notebook da_calibration). Oracles:
quantlab.observers (PercentileObserver, MSEObserver) and quantlab.ptq.rectified_sigmoid.

Where one plausible mistake changes every result (the MSE summed instead of averaged, its square root, the
regulariser inverted), the oracle also computes that mistaken variant and a result equal to it gets the hint
that names it."""

from __future__ import annotations

import math

import torch
from hypothesis import assume
from hypothesis import strategies as st

from ..observers import MSEObserver, PercentileObserver
from ..ptq import rectified_sigmoid
from ..qparams import calc_scale_zero_point
from ..quantize import dequantize, quantize
from .common import Case, Exercise, Mismatch, _shaped, floats32, same_floats, show, t


class _Tuple(tuple):
    """An expected tuple carried with the mistaken variants of the same inputs (``variants``)."""


def _with_variants(value, variants):
    out = _Tuple(value)
    out.variants = variants
    return out


def _close(a, b, rtol, atol=0.0):
    if a.shape != b.shape:
        return False
    a, b = a.to(torch.float64), b.detach().to(torch.float64)
    return bool(((a - b).abs() <= atol + rtol * a.abs()).all())


# -- da1 --------------------------------------------------------------------------------------

def _hist_case(hist, edges, min_val, max_val, percentile):
    return dict(hist=torch.tensor(hist, dtype=torch.int64), edges=t(edges), min_val=t(min_val),
                max_val=t(max_val), percentile=percentile)


def _da1():
    e8 = [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    h8 = [0, 8, 2, 480, 490, 4, 4, 12]
    e4 = [-2.0, -1.0, 0.0, 1.0, 2.0]
    cases = [
        Case(_hist_case(h8, e8, -3.0, 3.5, 99.6), "the range ends are the left edge of the bin where the "
                                                  "cumulative "
             "fraction reaches the cut (edges[j], not edges[j + 1])"),
        Case(_hist_case(h8, e8, -3.0, 3.5, 98.6), "the rest, 100 - percentile, is split between the two "
                                                  "tails: "
             "c = (100 - percentile) / 200 on each side"),
        Case(_hist_case([1, 98, 98, 3], e4, -2.0, 1.5, 99.0), "the first bin where F reaches (>=) the cut: "
             "F_0 = 1/200 = c exactly here, so lo is bin 0's left edge (torch.searchsorted's default, "
             "right=False)"),
        Case(_hist_case([0, 50, 50, 0], e4, -0.7, 0.6, 99.99), "keep the range inside the observed range: "
             "lo = max(lo, min_val), hi = min(hi, max_val)"),
        Case(_hist_case([0, 0, 100, 0], e4, 0.5, 0.5, 99.99), "a constant tensor: every count in one bin, "
                                                              "whose "
             "left edge lies below the value; finally hi = max(hi, lo)"),
        Case(_hist_case([3, 0, 0, 990, 5, 0, 0, 2], e8, -3.9, 3.2, 99.0)),
        Case(_hist_case([1, 2, 3, 4, 5, 6, 7, 8], e8, -4.0, 4.0, 75.0)),
    ]

    @st.composite
    def strat(draw):
        bins = draw(st.sampled_from([16, 32, 64]))
        obs = PercentileObserver(bins=bins)
        for _ in range(draw(st.integers(1, 2))):
            x = draw(_shaped(2, -100.0, 100.0))
            if draw(st.booleans()):
                x = x.relu()
            obs.observe(x)
        percentile = draw(st.sampled_from([99.99, 99.9, 99.0, 98.0, 95.0, 90.0, 75.0]))
        return Case(dict(hist=torch.from_numpy(obs.hist.astype("int64")),
                         edges=torch.from_numpy(obs.edges.copy()),
                         min_val=obs.min_val.clone(), max_val=obs.max_val.clone(), percentile=percentile))

    def oracle(hist, edges, min_val, max_val, percentile=99.99):
        obs = PercentileObserver(percentile, bins=max(16, hist.numel() + hist.numel() % 2))
        obs.hist, obs.edges = hist.numpy().astype("int64"), edges.numpy()
        obs.min_val, obs.max_val = min_val, max_val
        return obs.calculate_range(8)

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(e), show(g), "return the tuple (lo, hi)")
        for name, a, b in zip(("lo", "hi"), e, g):
            m = same_floats(a, b, name)
            if m is not None:
                return m
        return None

    return Exercise("da", 1, "percentile_range", oracle, compare, lambda: cases, strat,
                    "c = (100 - percentile) / 200; lo, hi = left edges of the first bins where the float64 "
                    "cumulative fraction reaches c and 1 - c; clamp into [min_val, max_val]; hi = max(hi, "
                    "lo)")


# -- da2 --------------------------------------------------------------------------------------

def _fake_quantize(x, lo, hi, num_bits):
    scale, zero_point = calc_scale_zero_point(lo, hi, num_bits)
    return dequantize(quantize(x, scale, zero_point, num_bits), scale, zero_point)


def _mse_oracle(x, num_bits, grid):
    obs = MSEObserver(axis=0, grid=grid)
    obs.observe(x.reshape(1, -1))
    alphas, err = obs.errors(num_bits)
    return alphas, err[:, 0]


def _da2():
    ramp = torch.linspace(0.0, 1.0, 41)
    tail = torch.cat([torch.linspace(0.0, 1.0, 60), t([4.0, 6.0])])
    cases = [
        Case(dict(x=ramp, num_bits=4, grid=20)),
        Case(dict(x=tail, num_bits=3, grid=50)),
        Case(dict(x=torch.cat([-tail, t([0.5, 1.5])]), num_bits=4, grid=25),
             "scale both ends of the range: alpha * [x.min(), x.max()] (the negative tail is clipped too)"),
        Case(dict(x=t([0.0, 0.0, 0.0]), num_bits=8, grid=10), "an all-zero tensor: every clip has error 0"),
        Case(dict(x=t([2.5]), num_bits=2, grid=8)),
        Case(dict(x=torch.sin(torch.arange(64, dtype=torch.float32)) * 3, num_bits=4, grid=100)),
    ]

    @st.composite
    def strat(draw):
        x = draw(_shaped(2, -50.0, 50.0))
        return Case(dict(x=x, num_bits=draw(st.integers(2, 8)), grid=draw(st.integers(2, 40))))

    def oracle(x, num_bits, grid=100):
        alphas, err = _mse_oracle(x, num_bits, grid)

        def variants():  # computed only for a result that does not match
            n = x.numel()
            noclip = torch.stack([((torch.clamp(x, a * x.min(), a * x.max()) -
                                    _fake_quantize(x, a * x.min(), a * x.max(), num_bits)) ** 2).mean()
                                  for a in alphas])
            try:  # only the top clipped (min > alpha max raises for positive data: no variant then)
                top = torch.stack([((x - _fake_quantize(x, x.min(), a * x.max(), num_bits)) ** 2).mean()
                                   for a in alphas])
            except ValueError:
                top = None
            return [
                ("average the squared errors over the N values (mean), do not sum them", err * n),
                ("the mean squared error itself, not its square root", err.sqrt()),
                ("compare x_hat with the original x, the clipped values included (their error is what "
                 "clipping costs)", noclip),
                ("scale both ends of the range: alpha * [x.min(), x.max()]", top),
            ]

        return _with_variants((alphas, err), variants)

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(tuple(e)), show(g), "return the tuple (alphas, errors)")
        alphas, err = e
        if not isinstance(g[0], torch.Tensor) or not _close(alphas, g[0], 1e-6):
            hint = "alphas: k / grid for k = grid, grid - 1, ..., 1, largest first (1 before 1/grid)"
            def head(a):
                return show(a[:3]).replace("]", ", ...]", 1) if isinstance(a, torch.Tensor) and a.dim() == 1 \
                    and a.numel() > 3 else show(a)
            n_got = f" ({g[0].numel()} values)" if isinstance(g[0], torch.Tensor) else ""
            return Mismatch(f"alphas: {head(alphas)} ({alphas.numel()} values)",
                            f"alphas: {head(g[0])}{n_got}", hint)
        m = same_floats(alphas, g[0], "alphas", rtol=1e-6)
        if m is not None:
            return m
        m = same_floats(err, g[1], "errors", rtol=1e-5, atol=1e-30)
        if m is not None and m.hint is None and isinstance(g[1], torch.Tensor):
            for hint, v in e.variants():
                if v is not None and _close(v, g[1], 1e-4, 1e-30) and not _close(err, v, 1e-4, 1e-30):
                    return Mismatch(m.expected, m.got, hint)
        return m

    return Exercise("da", 2, "mse_clip_errors", oracle, compare, lambda: cases, strat,
                    "for alpha = k/grid, k = grid..1: calc_scale_zero_point(alpha min, alpha max), x_hat = "
                    "dequantize(quantize(x)), error = mean((x - x_hat)^2)", max_examples=20)


# -- da3 --------------------------------------------------------------------------------------

def _da3():
    tail = torch.cat([torch.linspace(0.0, 1.0, 60), t([4.0, 6.0])])
    cases = [
        Case(dict(x=torch.cat([-tail, tail]), num_bits=3, grid=50),
             "alpha is alphas[i] for the index i of the smallest error (alphas run from 1 down), not i / "
             "grid"),
        Case(dict(x=tail + 1.0, num_bits=3, grid=50), "the range is alpha times the observed min and max, "
                                                      "not widened "
             "to 0 (calc_scale_zero_point widens it later)"),
        Case(dict(x=t([0.0, 0.0]), num_bits=8, grid=10)),
        Case(dict(x=torch.sin(torch.arange(64, dtype=torch.float32)) * 3, num_bits=4, grid=100)),
    ]

    @st.composite
    def strat(draw):
        x = draw(_shaped(2, -50.0, 50.0))
        if draw(st.booleans()):
            x = x.abs() + draw(floats32(0.0, 10.0))
        num_bits, grid = draw(st.integers(2, 8)), draw(st.integers(2, 40))
        # a clear minimum: no other candidate within 1e-4 of the smallest error (float32 sums in another order
        # could otherwise pick another alpha)
        _, err = _mse_oracle(x, num_bits, grid)
        e = err.to(torch.float64)
        best = int(torch.argmin(err))
        others = torch.cat([e[:best], e[best + 1:]])
        assume(e.max() == 0 or bool((others > e[best] * (1 + 1e-4) + 1e-30).all()))
        return Case(dict(x=x, num_bits=num_bits, grid=grid))

    def oracle(x, num_bits, grid=100):
        obs = MSEObserver(axis=0, grid=grid)
        obs.observe(x.reshape(1, -1))
        lo, hi = obs.calculate_range(num_bits)
        return lo.reshape(()), hi.reshape(())

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(e), show(g), "return the tuple (min_val, max_val)")
        for name, a, b in zip(("min_val", "max_val"), e, g):
            m = same_floats(a, b, name, rtol=1e-6)
            if m is not None:
                return m
        return None

    return Exercise("da", 3, "mse_range", oracle, compare, lambda: cases, strat,
                    "best = alphas[argmin(errors)] (the first minimum); return best * x.min(), best * "
                    "x.max()",
                    max_examples=15)


# -- da4 --------------------------------------------------------------------------------------

def _da4():
    cases = [
        Case(dict(v=t([-2.0, -0.5, 0.0, 0.3, 1.0, 2.0]), beta=2.5),
             "h(V) is the sigmoid stretched to [-0.1, 1.1]: sigmoid(V) * (zeta - gamma) + gamma, then "
             "clamped"),
        Case(dict(v=t([[-6.0, -3.0], [3.0, 8.0]]), beta=20.0),
             "clamp h to [0, 1] after the stretch: for |V| > 2.4 the stretched sigmoid leaves [0, 1]"),
        Case(dict(v=t([0.0]), beta=2.0)),
        Case(dict(v=t([0.1, -0.1, 4.0]), beta=7.3)),
    ]

    @st.composite
    def strat(draw):
        shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
        n = math.prod(shape)
        v = draw(st.lists(floats32(-12.0, 12.0), min_size=n, max_size=n))
        return Case(dict(v=t(v).reshape(shape), beta=draw(floats32(1.0, 20.0))))

    def oracle(v, beta):
        h = rectified_sigmoid(v)
        reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
        variants = [("the regulariser is sum(1 - |2h - 1|^beta): 0 where h is 0 or 1, largest at h = 0.5",
                     h.numel() - reg),
                    ("the regulariser is a sum over the weights, not a mean", reg / h.numel())]
        return _with_variants((h, reg), variants)

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(tuple(e)), show(g), "return the tuple (h, reg)")
        h, reg = e
        m = same_floats(h, g[0], "h", rtol=1e-6, atol=1e-7)
        if m is not None:
            return m
        m = same_floats(reg, g[1], "reg", rtol=1e-5, atol=1e-6)
        if m is not None and m.hint is None and isinstance(g[1], torch.Tensor):
            if bool(torch.isnan(g[1]).any()):
                return Mismatch(m.expected, m.got, "take the absolute value |2h - 1| before the power: a "
                                                   "negative "
                                "base to a fractional power beta is NaN")
            for hint, v in e.variants:
                if _close(v.reshape(-1), g[1].reshape(-1), 1e-5, 1e-6):
                    return Mismatch(m.expected, m.got, hint)
        return m

    return Exercise("da", 4, "adaround_h_and_regularizer", oracle, compare, lambda: cases, strat,
                    "h = clamp(sigmoid(v) * 1.2 - 0.1, 0, 1); reg = sum(1 - |2h - 1|^beta)")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_da1(), _da2(), _da3(), _da4()]
