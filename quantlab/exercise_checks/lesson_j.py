"""The checks of exercises/j_exercises.ipynb: GPTQ's dampened Hessian and one column step, AWQ's scales
and their folding into a LayerNorm (notebook j_gptq_awq).

Several mistakes of these exercises change every output at once (a missing factor, a transposed factor,
an update with the wrong sign), so no choice of inputs tells them apart by which case fails first. Their
hints come from a diagnosis instead: the expected value carries the case's inputs, and a result that
equals what one known mistake computes on them gets that mistake's hint (``common.diagnose``); any other
wrong result gets the case's hint.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from ..awq import awq_scale, fold_scales
from ..gptq import input_stats
from ..models import TinyGPT
from ..weight_only import qparams, quantize_codes
from .common import (
    Case,
    Exercise,
    Mismatch,
    diagnose,
    exact_ints,
    floats32,
    same_floats,
    show,
    t,
    with_inputs,
)


def _float64_first(e, g, what=""):
    if isinstance(g, torch.Tensor) and g.is_floating_point() and g.dtype != torch.float64:
        pre = f"{what}: " if what else ""
        return Mismatch(pre + "a float64 tensor", pre + f"a {str(g.dtype).replace('torch.', '')} tensor",
                        "compute in float64 (x.double()), as the statement asks: float32 loses the digits "
                        "the Cholesky factorization needs")
    return None


# -- j1 dampened_hessian ---------------------------------------------------------------------------

def _xtx(x):
    """X^T X / N (float64) from quantlab.gptq.input_stats on a one-Linear model fed with ``x``."""
    model = nn.Sequential(nn.Linear(x.shape[1], 1))
    return input_stats(model, "0", x)["xtx"]


def _hessian_oracle(x, percdamp=0.01):
    h = 2 * _xtx(x)
    h.diagonal().add_(percdamp * h.diagonal().mean())  # quantlab.gptq._inverse_cholesky's dampening
    return with_inputs(h, dict(x=x, percdamp=percdamp))


def _damped(h, amount, everywhere=False):
    return h + amount if everywhere else h + amount * torch.eye(len(h), dtype=h.dtype)


def _h(x, factor=2.0, mean=True):
    x = x.double()
    return factor * x.T @ x / (x.shape[0] if mean else 1)


J1_VARIANTS = [
    (lambda x, percdamp: _damped(_h(x, 1.0), percdamp * _h(x, 1.0).diagonal().mean()),
     "H = 2 X^T X / N: the factor 2 is part of the Hessian (of the squared error)"),
    (lambda x, percdamp: _damped(_h(x, mean=False), percdamp * _h(x, mean=False).diagonal().mean()),
     "divide by N, the number of inputs (rows of x): H is a mean over the inputs, not a sum"),
    (lambda x, percdamp: _damped(_h(x), percdamp * _h(x).diagonal().sum()),
     "damp = percdamp * the mean of H's diagonal (not its sum)"),
    (lambda x, percdamp: _damped(_h(x), percdamp * _h(x).diagonal().max()),
     "damp = percdamp * the mean of H's diagonal (not its largest entry)"),
    (lambda x, percdamp: _damped(_h(x), percdamp * _h(x).diagonal().mean(), everywhere=True),
     "add the damping to the diagonal only (H + damp * I), not to every entry"),
]


def _j1_compare(e, g):
    m = _float64_first(e, g)
    if m is not None:
        return m
    m = same_floats(e, g, atol=1e-9 * float(e.abs().max()) + 1e-300)
    if m is not None:
        m.hint = diagnose(e.inputs, g, J1_VARIANTS, 1e-9, 1e-9 * float(e.abs().max())) or m.hint
    return m


def _j1():
    cases = [
        Case(dict(x=t([[3.0]]), percdamp=0.01), "H = 2 X^T X / N plus the damping: here 2 * 9 / 1 = 18, "
             "plus 0.01 * 18"),
        Case(dict(x=t([[1.0, 2.0]]), percdamp=0.0),
             "H is (in, in), one row and column per input channel: X^T X (x.T @ x), not x @ x.T (N, N)"),
        Case(dict(x=t([[1.0, -2.0], [3.0, 0.5], [0.0, 1.0]]), percdamp=0.0),
             "divide by N, the number of inputs (rows of x)"),
        Case(dict(x=t([[1.0, -2.0, 0.5], [3.0, 0.5, -1.0], [0.0, 1.0, 2.0], [-1.5, 0.25, 1.0],
                       [2.0, -1.0, 0.0]]), percdamp=0.01),
             "damp = percdamp * mean(diag H), added to the diagonal only"),
        Case(dict(x=t([[1.0, 2.0, -1.0, 0.5], [0.5, -1.0, 2.0, 1.0]]), percdamp=0.1),
             "fewer inputs than channels: X^T X is singular, and the damping is what makes H invertible"),
        Case(dict(x=t([[1.0, 0.0, 2.0], [-1.0, 0.0, 0.5], [0.5, 0.0, -2.0]]), percdamp=0.01),
             "an input channel that is always 0: its row and column of X^T X are 0, its diagonal entry "
             "is the damping alone"),
    ]

    @st.composite
    def strat(draw):
        n, d = draw(st.integers(1, 6)), draw(st.integers(1, 5))
        vals = draw(st.lists(st.one_of(st.just(0.0), floats32(-10.0, 10.0)), min_size=n * d,
                             max_size=n * d))
        return Case(dict(x=t(vals).reshape(n, d),
                         percdamp=draw(st.sampled_from([0.0, 0.001, 0.01, 0.1, 1.0]))))

    return Exercise("j", 1, "dampened_hessian", _hessian_oracle, _j1_compare, lambda: cases, strat,
                    "H = 2 x^T x / N in float64, then H + percdamp * mean(diag H) * I")


# -- j2 gptq_step ----------------------------------------------------------------------------------

def _step(W, H_inv, i, scale, zero_point, bits, factor="upper", divide=True, sign=-1.0, first=None,
          w_hat_scale="float16", u_rows=True):
    """One GPTQ column step (``factor="upper"`` and the defaults), or a known mistake of it."""
    if factor == "upper":
        U = torch.linalg.cholesky(H_inv, upper=True)
    elif factor == "of_H":
        U = torch.linalg.cholesky(torch.linalg.inv(H_inv), upper=True)
    else:  # "H_inv": the rows of the full inverse (1.2's formula at every column)
        U = H_inv
    codes = quantize_codes(W[:, i:i + 1].float(), scale, zero_point.float(), 0, 2 ** bits - 1)[:, 0]
    s = scale.half().double() if w_hat_scale == "float16" else scale.double()
    w_hat = s * (codes - zero_point).double()
    e = (W[:, i] - w_hat) / (U[i, i] if divide else 1.0)
    W = W.clone()
    j0 = i + 1 if first is None else first
    row = U[i, j0:] if u_rows else U[j0:, i]
    W[:, j0:] += sign * e[:, None] * row[None, :]
    return codes, W


def _step_oracle(W, H_inv, i, scale, zero_point, bits):
    inputs = dict(W=W, H_inv=H_inv, i=i, scale=scale, zero_point=zero_point, bits=bits)
    return with_inputs(_step(**inputs), inputs)


def _only_w(**kw):
    return lambda **inputs: _step(**inputs, **kw)[1]


def _col_i_too(W, H_inv, i, scale, zero_point, bits):
    return _step(W, H_inv, i, scale, zero_point, bits, first=i)[1]


J2_VARIANTS = [
    (_only_w(divide=False), "divide the error by U[i, i]: e_i = (w_i - w_hat_i) / U_ii"),
    (_only_w(u_rows=False), "U is the upper Cholesky factor of H^-1 (torch.linalg.cholesky(H_inv, "
     "upper=True)); the update uses row i of U right of the diagonal, U[i, j] for j > i (a lower factor, "
     "or U's column, is 0 there: nothing gets updated)"),
    (_only_w(factor="of_H"), "take the Cholesky factor of H^-1 (H_inv), not of the Hessian H"),
    (_only_w(factor="H_inv"), "use row i of U, not of H^-1: once columns 0..i-1 are fixed, the ratios "
     "[H^-1]_ij / [H^-1]_ii no longer belong to the free columns (they are right only for i = 0)"),
    (_col_i_too, "column i keeps its float value: update only the columns after it (j > i)"),
    (_only_w(w_hat_scale="float32"), "dequantize with the stored float16 scale: w_hat_i = "
     "float64(float16(S)) * (c - Z), as lesson i stores S"),
    (_only_w(sign=1.0), "subtract: w_j <- w_j - e_i * U_ij for j > i"),
]


def _j2_compare(e, g):
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        return Mismatch("a tuple (codes, W)", show(g), "return the tuple (codes, W)")
    m = exact_ints(e[0], g[0], "codes")
    if m is not None:
        return m
    m = _float64_first(e[1], g[1], "W")
    if m is not None:
        return m
    m = same_floats(e[1], g[1], "W", rtol=1e-9, atol=1e-12)
    if m is not None:
        m.hint = diagnose(e.inputs, g[1], J2_VARIANTS, 1e-9, 1e-12) or m.hint
    return m


def _step_inputs(seed, out, n, i, bits, n_x=8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    x = torch.randn(n_x, n, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / n_x
    h.diagonal().add_(0.01 * h.diagonal().mean())
    scale, zero_point, _, _ = qparams(W.float(), bits, False)
    return dict(W=W, H_inv=torch.linalg.inv(h), i=i, scale=scale, zero_point=zero_point.to(torch.int32),
                bits=bits)


def _step_case(seed, out, n, i, bits, hint=""):
    return Case(_step_inputs(seed, out, n, i, bits), hint,
                f"W = randn({out}, {n}) (float64, seed {seed}), H_inv = the inverse of 2 X^T X / 8 dampened "
                f"by 1% for X = randn(8, {n}), i = {i}, bits = {bits}, scale and zero_point of each row's "
                f"asymmetric {bits}-bit grid")


def _j2():
    f64 = lambda v: t(v, torch.float64)  # noqa: E731
    eye = torch.eye(3, dtype=torch.float64)
    cases = [
        _step_case(0, 3, 4, 0, 4, "one step: codes of column i on the row's grid, e = (w_i - w_hat_i) / "
                   "U_ii, then w_j -= e * U_ij for j > i"),
        _step_case(1, 3, 5, 2, 3, "a middle column: the update uses row i of U"),
        _step_case(2, 2, 4, 3, 4, "the last column: nothing is left to update"),
        Case(dict(W=f64([[0.5, 0.125 + 2.0 ** -40, -0.25]]), H_inv=eye, i=1, scale=t([0.25]),
                  zero_point=t([8], torch.int32), bits=4),
             "compute the codes in float32, as lesson i's grid: W[:, i].float() * (1 / scale); in float64 "
             "this weight (0.125 + 2**-40, 0.5 steps + a hair) rounds to the other integer"),
        Case(dict(W=f64([[0.2, 1.0, -0.1], [0.05, -0.9, 0.3]]), H_inv=eye, i=1, scale=t([0.1, 0.1]),
                  zero_point=t([1, 2], torch.int32), bits=2),
             "clamp the codes to [0, 2**bits - 1]: the corrected columns can leave the row's original range"),
        Case(dict(W=f64([[0.25, 0.75, -0.25], [1.25, -0.75, 0.5]]), H_inv=eye * 2, i=0,
                  scale=t([0.5, 0.5]), zero_point=t([2, 3], torch.int32), bits=3),
             "ties: round half to even (torch.round) before adding the zero point"),
        _step_case(3, 4, 6, 1, 8, "8 bits"),
    ]

    @st.composite
    def strat(draw):
        seed, out, n = draw(st.integers(0, 2 ** 16)), draw(st.integers(1, 3)), draw(st.integers(2, 6))
        return _step_case(seed, out, n, draw(st.integers(0, n - 1)), draw(st.sampled_from([2, 3, 4, 8])))

    return Exercise("j", 2, "gptq_step", _step_oracle, _j2_compare, lambda: cases, strat,
                    "codes = clamp(round(W[:, i].float() * (1 / scale)) + zero_point, 0, 2**bits - 1); "
                    "w_hat = float16 scale * (codes - zero_point); e = (W[:, i] - w_hat) / U[i, i]; "
                    "W[:, i+1:] -= e * U[i, i+1:], U the upper Cholesky factor of H_inv",
                    max_examples=20)


# -- j3 awq_scale ----------------------------------------------------------------------------------

def _awq_oracle(x, alpha):
    mean_abs = input_stats(nn.Sequential(nn.Linear(x.shape[1], 1)), "0", x)["mean_abs"]
    return with_inputs(awq_scale(mean_abs, alpha).float(), dict(x=x, alpha=alpha))


def _s(x, alpha, stat="mean_abs", clamp=True, norm="geo"):
    x = x.double()
    m = {"mean_abs": lambda: x.abs().mean(0), "max_abs": lambda: x.abs().amax(0),
         "mean": lambda: x.mean(0), "rows": lambda: x.abs().mean(1)}[stat]()
    s = (m.clamp(min=1e-4) if clamp else m) ** alpha
    s = {"geo": lambda: s / torch.sqrt(s.max() * s.min()), "max": lambda: s / s.max(),
         "none": lambda: s}[norm]()
    return s.float()


J3_VARIANTS = [
    (lambda x, alpha: _s(x, alpha, "max_abs"),
     "AWQ's statistic is the mean of |x| per input channel, not the largest |x|"),
    (lambda x, alpha: _s(x, alpha, "mean"),
     "take the absolute values first: the mean of |x|, not of x (a channel's signs cancel in its mean)"),
    (lambda x, alpha: _s(x, alpha, "rows"),
     "one scale per input channel: average |x| over the N rows (dim 0), not over the channels"),
    (lambda x, alpha: _s(x, alpha, norm="none"),
     "normalize: s / sqrt(max(s) * min(s)), so the scales are centred around 1"),
    (lambda x, alpha: _s(x, alpha, norm="max"),
     "normalize by sqrt(max(s) * min(s)), not by max(s)"),
]


def _j3_compare(e, g):
    if isinstance(g, torch.Tensor) and g.dtype == torch.float64:
        return Mismatch(show(e), f"{show(g)}", "return float32 (s.to(torch.float32)), as the statement "
                        "asks: the scales multiply float32 weights")
    m = same_floats(e, g, rtol=2e-6)
    if m is not None:
        m.hint = diagnose(e.inputs, g, J3_VARIANTS, 2e-6) or m.hint
    return m


def _j3():
    cases = [
        Case(dict(x=t([[1.0, -2.0, 0.5], [-3.0, 2.5, 0.5], [2.0, 0.5, -0.5], [0.0, -4.0, 0.5]]), alpha=0.5),
             "s = clamp(mean|x|, 1e-4) ** alpha per input channel, divided by sqrt(max(s) * min(s))"),
        Case(dict(x=t([[1.0, -2.0, 0.5], [-3.0, 2.5, 0.5]]), alpha=0.0),
             "alpha = 0: every s is 1 (plain round to nearest)"),
        Case(dict(x=t([[1.0, 0.0, -2.0], [3.0, 0.0, 1.0], [-2.0, 0.0, 0.5]]), alpha=0.5),
             "a channel whose inputs are all 0: clamp mean|x| at 1e-4 before the power (otherwise s = 0 "
             "and the normalization divides by 0)"),
        Case(dict(x=t([[1.0, -2.0, 0.5, 8.0, -0.25], [-3.0, 2.5, 0.5, 4.0, 0.25]]), alpha=1.0),
             "alpha = 1: s is mean|x| itself, normalized"),
        Case(dict(x=t([[2.0, -6.0], [-2.0, 6.0]]), alpha=0.75),
             "opposite signs in a channel: the mean of |x|, not of x"),
    ]

    @st.composite
    def strat(draw):
        n, d = draw(st.integers(1, 6)), draw(st.integers(1, 5))
        vals = draw(st.lists(st.one_of(st.just(0.0), floats32(-10.0, 10.0)), min_size=n * d,
                             max_size=n * d))
        return Case(dict(x=t(vals).reshape(n, d), alpha=draw(st.integers(0, 19)) / 20))

    return Exercise("j", 3, "awq_scale", _awq_oracle, _j3_compare, lambda: cases, strat,
                    "s = clamp(x.abs().mean(0), min=1e-4) ** alpha in float64, divided by sqrt(s.max() * "
                    "s.min()), returned as float32")


# -- j4 awq_fold -----------------------------------------------------------------------------------

def _fold_oracle(w, ln_weight, ln_bias, s):
    d = w.shape[1]
    with torch.random.fork_rng():
        model = TinyGPT(vocab_size=2, n_layers=1, d_model=d, n_heads=1, context=2)
    block = model.blocks[0]
    if block.fc.weight.shape != w.shape:
        raise ValueError(f"the checks use the fc of a TinyGPT block: w must be (4d, d); got {tuple(w.shape)}")
    with torch.no_grad():
        block.fc.weight.copy_(w)
        block.ln2.weight.copy_(ln_weight)
        block.ln2.bias.copy_(ln_bias)
    folded = fold_scales(model, {"blocks.0.fc": s}).blocks[0]
    value = (folded.fc.weight.detach(), folded.ln2.weight.detach(), folded.ln2.bias.detach())
    return with_inputs(value, dict(w=w, ln_weight=ln_weight, ln_bias=ln_bias, s=s))


J4_VARIANTS = [
    (lambda w, ln_weight, ln_bias, s: (w / s, ln_weight * s, ln_bias * s),
     "AWQ scales the weights of the large-activation channels UP: W' = W * s (column c times s_c) and the "
     "LayerNorm divided by s, not the other way round"),
    (lambda w, ln_weight, ln_bias, s: (w * s, ln_weight / s, ln_bias),
     "divide the LayerNorm's bias by s too: its output is ln_weight * x_hat + ln_bias, both terms scale"),
    (lambda w, ln_weight, ln_bias, s: (w * s, ln_weight, ln_bias),
     "fold 1 / s into the LayerNorm (its weight and bias), or the float model changes"),
]


def _j4_compare(e, g):
    if not isinstance(g, (tuple, list)) or len(g) != 3:
        return Mismatch("a tuple (w, ln_weight, ln_bias)", show(g),
                        "return the tuple (w, ln_weight, ln_bias)")
    for name, want, got in zip(("w", "ln_weight", "ln_bias"), e, g):
        m = same_floats(want, got, name, rtol=1e-6)
        if m is not None:
            m.hint = diagnose(e.inputs, tuple(g), J4_VARIANTS, 1e-6) or m.hint
            return m
    return None


def _fold_case(seed, d, hint=""):
    g = torch.Generator().manual_seed(seed)
    kw = dict(w=torch.randn(4 * d, d, generator=g) * 0.1, ln_weight=1 + 0.2 * torch.randn(d, generator=g),
              ln_bias=0.1 * torch.randn(d, generator=g), s=torch.rand(d, generator=g) * 3 + 0.25)
    return Case(kw, hint, f"w = 0.1 * randn({4 * d}, {d}), ln_weight = 1 + 0.2 * randn({d}), ln_bias = 0.1 * "
                f"randn({d}), s = 0.25 + 3 * rand({d}) (seed {seed})")


def _j4():
    cases = [
        _fold_case(0, 2, "scale the columns: column c of W (input channel c) times s_c, i.e. w * s "
                   "broadcast along the rows (w is (out, d), s is (d,)), not the rows"),
        _fold_case(1, 3),
        Case(dict(w=torch.arange(16, dtype=torch.float32).reshape(8, 2) / 8 - 1, ln_weight=t([1.0, 0.5]),
                  ln_bias=t([0.0, -0.25]), s=t([4.0, 0.5])), "s = (4, 0.5): powers of two, so W' is exact"),
    ]

    @st.composite
    def strat(draw):
        return _fold_case(draw(st.integers(0, 2 ** 16)), draw(st.integers(1, 4)))

    return Exercise("j", 4, "awq_fold", _fold_oracle, _j4_compare, lambda: cases, strat,
                    "W' = w * s (columns), ln_weight' = ln_weight / s, ln_bias' = ln_bias / s",
                    max_examples=15)


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_j1(), _j2(), _j3(), _j4()]
