"""The checks of exercises/k_exercises.ipynb: activations fake-quantized per token or with a static
per-tensor scale, SmoothQuant's scales and fold, LLM.int8()'s mixed product, and the bytes of a
quantized KV cache (notebook k_activations).

The oracles are PyTorch's own fake-quantize kernels (k1) and ``quantlab.act_quant`` (k2-k4). Many
mistakes here change every output at once (a wrong q_max, a swapped exponent, a fold the wrong way),
so no choice of inputs tells them apart by which case fails first. Their hints come from a diagnosis,
as in lesson j: the expected value carries the case's inputs, and a result that equals what one
known mistake computes on them gets that mistake's hint; any other wrong result gets the case's hint.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from ..act_quant import ActQuantLinear, kv_cache_bytes_per_token, smoothquant_scales
from ..act_quant import fake_quantize_activations as aq_fake_quantize
from .common import Case, Exercise, Mismatch, diagnose, floats32, same_floats, show, t, with_inputs

__all__ = ["exercises"]


class _Bytes(float):
    """A float result that also carries the inputs it was computed from."""

    def __new__(cls, value, inputs):
        obj = super().__new__(cls, value)
        obj.inputs = inputs
        return obj


def _close(a, b, rtol=0.0, atol=0.0) -> bool:
    """Tensors (or tuples of them) of the same shapes, equal within rtol/atol (``atol`` may be a
    tensor), NaN equal to NaN."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(
            _close(x, y, rtol, atol) for x, y in zip(a, b))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
            or not b.is_floating_point():
        return False
    a, b = a.double(), b.detach().double()
    ok = ((a - b).abs() <= atol + rtol * a.abs()) | (a.isnan() & b.isnan())
    return bool(ok.all())


def _values(lo: float, hi: float):
    """0, or a float32 of magnitude in [lo, hi] (no tiny values whose scales underflow)."""
    return st.one_of(st.just(0.0), floats32(lo, hi), floats32(-hi, -lo))


@st.composite
def _matrix(draw, rows, cols, lo, hi):
    vals = draw(st.lists(_values(lo, hi), min_size=rows * cols, max_size=rows * cols))
    return t(vals).reshape(rows, cols)


# -- k1 fake_quantize_activations ----------------------------------------------------------------

# x * f32(1/S) = 63.499996 but x / S = 63.5 for x = 0.97 = max|x| / 2 (S = 1.94 / 127): the reciprocal
# rounds to 63, the quotient (half to even) to 64
RECIPROCAL_X = [[0.9700000286102295, -0.38999998569488525, 0.38999998569488525, -1.940000057220459]]


def _k1_oracle(x, bits=8, absmax=None):
    q_max = 2 ** (bits - 1) - 1
    if absmax is None:
        scale = x.abs().amax(dim=1) / q_max
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero row is 0 under any scale
        out = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(len(x), dtype=torch.int32),
                                                     0, -q_max, q_max)
    else:
        scale = torch.tensor(absmax, dtype=torch.float32) / q_max
        out = torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), torch.zeros(1, dtype=torch.int32),
                                                    -q_max, q_max)
    return with_inputs(out, dict(x=x, bits=bits, absmax=absmax))


def _fq(x, bits, absmax, stat="token", q_max_off=1, rounding="even", divide=False, clamp=True,
        guard=True, static=True, dequantize=True):
    """k1 (the defaults), or a known mistake of it."""
    q_max = 2 ** (bits - 1) - q_max_off
    if absmax is None or not static:
        m = {"token": lambda: x.abs().amax(1, keepdim=True), "tensor": lambda: x.abs().amax(),
             "channel": lambda: x.abs().amax(0, keepdim=True), "signed": lambda: x.amax(1, keepdim=True)}[
            stat if absmax is None else "tensor"]()
    else:
        m = torch.tensor(absmax, dtype=torch.float32)
    scale = m / q_max
    inv = torch.where(scale > 0, 1.0 / scale, 0.0) if guard else 1.0 / scale
    y = x / scale if divide else x * inv
    q = {"even": torch.round, "trunc": torch.trunc, "up": lambda v: torch.floor(v + 0.5)}[rounding](y)
    q = torch.clamp(q, -q_max, q_max) if clamp else q
    return q * scale if dequantize else q


def _k1_variant(**kw):
    return lambda x, bits, absmax: _fq(x, bits, absmax, **kw)


K1_VARIANTS = [
    (_k1_variant(stat="tensor"),
     "per token: one scale per row, from that row's largest |x| (one scale for the whole tensor is the "
     "per-tensor dynamic scale)"),
    (_k1_variant(stat="channel"),
     "per token: the largest |x| of each row (over its channels, dim=1), not over each column"),
    (_k1_variant(stat="signed"),
     "m is the row's largest magnitude max|x| (abs first): a row's value of largest magnitude can be "
     "negative"),
    (_k1_variant(q_max_off=0),
     "q_max = 2**(bits-1) - 1 (127 at 8 bits): the symmetric grid [-q_max, q_max] leaves -2**(bits-1) "
     "out, and S = m / q_max puts m exactly on q_max"),
    (_k1_variant(rounding="trunc"),
     "round to nearest (torch.round), not truncate toward zero"),
    (_k1_variant(rounding="up"),
     "ties: round half to even (torch.round), not half up (floor(y + 0.5))"),
    (_k1_variant(static=False),
     "static: S comes from the calibrated absmax given, not from x's own largest |x|"),
    (_k1_variant(clamp=False),
     "clip q to [-q_max, q_max]: with a static absmax, values beyond +-absmax land beyond the grid"),
    (_k1_variant(guard=False),
     "an all-zero row has S = 0: take 1/S as 0 there (q = 0), not 1/0 (0 * inf is nan)"),
    (_k1_variant(divide=True),
     "multiply by the float32 reciprocal 1/S (as PyTorch's fake-quantize kernels do): dividing by S "
     "rounds a value here to the other integer"),
    (_k1_variant(dequantize=False),
     "dequantize: return S * q (the values the Linear multiplies), not the integers q"),
]


def _k1_compare(e, g):
    m = same_floats(e, g, rtol=1e-6)  # one step of the grid is at least |x-hat| / q_max
    if m is not None and isinstance(g, torch.Tensor):
        m.hint = diagnose(e.inputs, g, K1_VARIANTS, same=lambda a, b: _close(a, b, 1e-6)) or m.hint
    return m


def _k1():
    cases = [
        Case(dict(x=t([[0.5, -1.0, 0.25, 0.75], [4.0, -2.0, 1.0, 3.0], [0.1, 0.2, -0.3, 0.05]]), bits=8,
                  absmax=None),
             "per token: S = max|x| of the row / q_max, q = clamp(round(x * (1/S)), -q_max, q_max), then "
             "S * q"),
        Case(dict(x=t([[7.0, 2.5, -0.5, 1.5, -3.5, 0.5]]), bits=4, absmax=None),
             "ties: S = 7 / 7 = 1, so x * (1/S) = 2.5, -0.5, ... exactly; round half to even (torch.round)"),
        Case(dict(x=t([[-4.0, 1.0, 2.0], [0.5, -0.25, 0.125]]), bits=4, absmax=None),
             "m is the largest magnitude max|x| (abs first): the first row's is negative"),
        Case(dict(x=t(RECIPROCAL_X), bits=8, absmax=None),
             "multiply by the float32 reciprocal 1/S: x = 0.97 is max|x| / 2, and x / S = 63.5 but x * (1/S) "
             "= 63.499996"),
        Case(dict(x=t([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]), bits=8, absmax=None),
             "an all-zero row: S = 0 and the row stays 0 (no 0/0)"),
        Case(dict(x=t([[0.5, -3.0, 1.0], [2.5, 0.25, -0.75]]), bits=8, absmax=2.0),
             "static: one S = absmax / q_max for the whole tensor; values beyond +-absmax clip to "
             "+-q_max * S"),
        Case(dict(x=t([[0.3, -0.2], [0.1, 0.05]]), bits=4, absmax=1.0),
             "static: the calibrated absmax sets S even when x stays well inside it"),
        Case(dict(x=t([[0.4, -0.1, 0.05, -0.6], [0.2, 0.3, -0.25, 0.0]]), bits=2, absmax=None),
             "2 bits: q_max = 1, the ternary grid {-S, 0, S}"),
    ]

    @st.composite
    def strat(draw):
        rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
        absmax = draw(st.one_of(st.none(), floats32(0.01, 100.0)))
        bits = draw(st.sampled_from([2, 3, 4, 6, 8]))
        return Case(dict(x=draw(_matrix(rows, cols, 1e-3, 100.0)), bits=bits, absmax=absmax))

    return Exercise("k", 1, "fake_quantize_activations", _k1_oracle, _k1_compare, lambda: cases, strat,
                    "q_max = 2**(bits-1) - 1; m = x.abs().amax(dim=1, keepdim=True) (per token) or absmax "
                    "(static); S = m / q_max; q = clamp(round(x * (1/S)), -q_max, q_max) with 1/S = 0 where "
                    "S = 0; return S * q")


# -- k2 smoothquant ------------------------------------------------------------------------------

def _k2_oracle(x, w, alpha=0.5):
    s = smoothquant_scales(x.abs().amax(dim=0), w, alpha)
    return with_inputs((s, x / s, w * s), dict(x=x, w=w, alpha=alpha))


def _sq(x, w, alpha, x_stat="absmax", w_stat="absmax", form="ok", fold="ok", guard=True):
    """k2 (the defaults), or a known mistake of it."""
    stats = {"absmax": lambda v: v.abs().amax(0), "max": lambda v: v.amax(0),
             "mean": lambda v: v.abs().mean(0), "rows": lambda v: v.abs().amax(1)}
    x_max, w_max = stats[x_stat](x), stats[w_stat](w)
    s = {"ok": lambda: x_max ** alpha / w_max ** (1 - alpha),
         "swap": lambda: x_max ** (1 - alpha) / w_max ** alpha,
         "ratio": lambda: (x_max / w_max) ** alpha}[form]()
    if guard:
        s = torch.where((x_max > 0) & (w_max > 0), s, 1.0)
    if fold == "reverse":
        return s, x * s, w / s
    return s, x / s, (w * s[:, None] if fold == "rows" else w * s)


def _k2_variant(**kw):
    return lambda x, w, alpha: _sq(x, w, alpha, **kw)


K2_VARIANTS = [
    (_k2_variant(form="swap"),
     "s_j = max|x_j|**alpha / max|w_j|**(1 - alpha): alpha goes with the activations (alpha = 1 moves "
     "all of the input's range into the weight), 1 - alpha with the weight"),
    (_k2_variant(form="ratio"),
     "s_j = max|x_j|**alpha / max|w_j|**(1 - alpha): the weight's maximum has the exponent 1 - alpha, "
     "not alpha"),
    (_k2_variant(x_stat="max"),
     "take the largest magnitude of input channel j, max|x| (abs first): a channel's outliers can be "
     "negative"),
    (_k2_variant(w_stat="max"),
     "take the largest magnitude of weight column j, max|w| (abs first)"),
    (_k2_variant(x_stat="mean"),
     "SmoothQuant uses the channel's largest |x|, not the mean of |x| (AWQ's statistic): it is the "
     "maximum that sets the quantization step"),
    (_k2_variant(x_stat="rows"),
     "per input channel j: the max of |x[:, j]| over the N rows (dim 0), not the max of each row"),
    (_k2_variant(w_stat="rows"),
     "per weight column j: the max of |w[:, j]| over its out rows (dim 0), not the max of each row of "
     "w"),
    (_k2_variant(fold="reverse"),
     "divide the input by s and multiply the weight by s (x / s, w * s): the outliers of x shrink and "
     "the weight absorbs them"),
    (_k2_variant(fold="rows"),
     "multiply the columns of w by s (w * s, s broadcast along the last dim): column j of w meets "
     "input channel j"),
    (_k2_variant(guard=False),
     "a channel where max|x_j| or max|w_j| is 0 gets s = 1 (otherwise s is 0 or inf and the fold makes "
     "0/0 = nan)"),
]

K2_NAMES = ("s", "x_smooth", "w_smooth")


def _k2_compare(e, g):
    if not isinstance(g, (tuple, list)) or len(g) != 3:
        return Mismatch("a tuple (s, x_smooth, w_smooth)", show(g),
                        "return the tuple (s, x_smooth, w_smooth)")
    for name, want, got in zip(K2_NAMES, e, g):
        m = same_floats(want, got, name, rtol=1e-5)
        if m is not None:
            m.hint = diagnose(e.inputs, tuple(g), K2_VARIANTS, same=lambda a, b: _close(a, b, 1e-5)) or m.hint
            return m
    return None


def _k2():
    cases = [
        Case(dict(x=t([[1.0, -8.0, 0.5], [-2.0, 4.0, 0.25], [0.5, 1.0, -1.0]]),
                  w=t([[0.5, -0.1, 2.0], [-1.0, 0.2, 0.5], [0.25, 0.05, -4.0]]), alpha=0.5),
             "s_j = sqrt(max|x_j| / max|w_j|) at alpha = 0.5: channel 1's input (max 8) shrinks, its weight "
             "column (max 0.2) grows"),
        Case(dict(x=t([[1.0, -8.0, 0.5], [-2.0, 4.0, 0.25], [0.5, 1.0, -1.0], [3.0, 0.5, 0.125]]),
                  w=t([[0.5, -0.1, 2.0], [-1.0, 0.2, 0.5]]), alpha=0.75),
             "alpha = 0.75: s_j = max|x_j|**0.75 / max|w_j|**0.25"),
        Case(dict(x=t([[2.0, -6.0], [-3.0, 1.0]]), w=t([[0.5, 0.25], [-2.0, 0.125]]), alpha=1.0),
             "alpha = 1: s_j = max|x_j| (the weight's maximum to the power 0 is 1): every input channel ends "
             "with max 1"),
        Case(dict(x=t([[2.0, -6.0], [-3.0, 1.0]]), w=t([[0.5, 0.25], [-2.0, 0.125]]), alpha=0.0),
             "alpha = 0: s_j = 1 / max|w_j|: every weight column ends with max 1"),
        Case(dict(x=t([[1.0, 0.0, -2.0], [0.5, 0.0, 4.0]]), w=t([[1.0, 0.5, 0.0], [-0.5, 2.0, 0.0]]),
                  alpha=0.5),
             "input channel 1 is always 0 and weight column 2 is 0: s = 1 there (no 0/0)"),
        Case(dict(x=t([[-9.0, 0.5], [3.0, -0.25]]), w=t([[0.5, -1.5], [-0.25, 1.0]]), alpha=0.5),
             "the largest magnitudes here are negative: max|x|, max|w| (abs first)"),
    ]

    @st.composite
    def strat(draw):
        n, d, out = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
        return Case(dict(x=draw(_matrix(n, d, 1e-2, 100.0)), w=draw(_matrix(out, d, 1e-2, 10.0)),
                         alpha=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.85, 1.0]))))

    return Exercise("k", 2, "smoothquant", _k2_oracle, _k2_compare, lambda: cases, strat,
                    "s = x.abs().amax(0) ** alpha / w.abs().amax(0) ** (1 - alpha), 1 where either max is 0; "
                    "return (s, x / s, w * s)")


# -- k3 llm_int8_linear --------------------------------------------------------------------------

def _k3_oracle(x, w, threshold=6.0):
    with torch.random.fork_rng():
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
        y = ActQuantLinear(linear, 8, 8, "token", outlier_threshold=threshold)(x)
    return with_inputs(y, dict(x=x, w=w, threshold=threshold))


def _int8(x, w, threshold, mask="any", keep=False, float_weight=True, per_token=True, w_scale="row",
          float16=False, add_float=True):
    """k3 (the defaults), or a known mistake of it."""
    outliers = {"any": lambda: (x.abs() > threshold).any(0), "mean": lambda: x.abs().mean(0) > threshold,
                "signed": lambda: (x > threshold).any(0),
                "geq": lambda: (x.abs() >= threshold).any(0)}[mask]()
    m = {"row": lambda: w.abs().amax(1, keepdim=True), "tensor": lambda: w.abs().amax(),
         "rest": lambda: torch.where(outliers, 0.0, w).abs().amax(1, keepdim=True)}[w_scale]()
    scale = m / 127
    q = torch.clamp(torch.round(w / torch.where(scale > 0, scale, 1.0)), -127, 127)
    w_hat = q * (scale.half().float() if float16 else scale)
    y_float = x[:, outliers] @ (w if float_weight else w_hat)[:, outliers].T
    x_rest = x if keep else torch.where(outliers, 0.0, x)
    x_hat = aq_fake_quantize(x_rest, 8, "token" if per_token else "tensor")
    return (y_float if add_float else 0.0) + x_hat @ w_hat.T


def _k3_variant(**kw):
    return lambda x, w, threshold: _int8(x, w, threshold, **kw)


K3_VARIANTS = [
    (_k3_variant(mask="mean"),
     "a column is an outlier when |x| exceeds the threshold in any token (its largest |x| over the "
     "tokens), not on average"),
    (_k3_variant(mask="signed"),
     "compare the magnitude |x| with the threshold: a large negative value makes an outlier column too"),
    (_k3_variant(mask="geq"),
     "strictly greater: a column whose largest |x| equals the threshold stays in the 8-bit part (|x| > "
     "threshold, as LLM.int8() and quantlab)"),
    (_k3_variant(keep=True),
     "set the outlier columns to 0 in the 8-bit part: they are multiplied in float already, and kept "
     "they count twice (and set every token's scale)"),
    (_k3_variant(float_weight=False),
     "the float part multiplies the float weight w, not the 8-bit weight: the outlier columns keep "
     "full precision on both sides"),
    (_k3_variant(per_token=False),
     "the 8-bit part quantizes x per token (one scale per row: k1 with absmax=None), not with one "
     "scale for the whole call"),
    (_k3_variant(w_scale="tensor"),
     "the weight is quantized per output channel: one scale per row of w, not one for the whole weight"),
    (_k3_variant(w_scale="rest"),
     "the weight's scale comes from its whole row: the weight is quantized once, before any input, so "
     "its scale cannot depend on which columns a call sends to float"),
    (_k3_variant(float16=True),
     "dequantize the weight with its float32 scale, as ONNX Runtime stores int8 weights: w_hat = S_w * q "
     "(a float16 scale is lesson i's weight-only storage)"),
    (_k3_variant(add_float=False),
     "add the float part: y = x[:, outliers] @ w[:, outliers].T + the 8-bit part"),
]


def _k3_tolerance(x, w):
    """Float rounding of the two products: 1e-5 of sum_j |x_tj| |w_oj| for each output."""
    return 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-12


def _k3_compare(e, g):
    atol = _k3_tolerance(e.inputs["x"], e.inputs["w"])
    m = same_floats(e, g, atol=atol)
    if m is not None and isinstance(g, torch.Tensor):
        m.hint = diagnose(e.inputs, g, K3_VARIANTS, same=lambda a, b: _close(a, b, 0.0, atol)) or m.hint
    return m


W3 = [[0.5, -0.25, 0.3, 0.125, -0.6], [-0.05, 0.2, 0.9, -0.1, 0.15]]


def _k3():
    cases = [
        Case(dict(x=t([[0.5, -1.2, 9.0, 0.3, -0.7], [1.1, 0.4, 7.5, -0.9, 0.2], [-0.6, 0.8, 8.2, 0.1, 1.3]]),
                  w=t(W3), threshold=6.0),
             "column 2 is the outlier: x[:, 2] * w[:, 2] in float, the other four columns W8A8 (per token x "
             "per output channel), and the two parts added"),
        Case(dict(x=t([[0.5, -7.0, 0.4, 0.3, -0.7], [1.1, -8.5, 0.2, -0.9, 0.2],
                       [-0.6, -6.5, 0.5, 0.1, 1.3]]), w=t(W3), threshold=6.0),
             "a negative outlier column: column 1 goes to float (its |x| exceeds 6)"),
        Case(dict(x=t([[0.5, -1.2, 0.4, 0.3, -0.7], [1.1, 0.4, 0.2, 8.0, 0.2], [-0.6, 0.8, 0.5, 0.1, 1.3]]),
                  w=t(W3), threshold=6.0),
             "an outlier in one token only: column 3 goes to float (its |x| exceeds 6 in some token)"),
        Case(dict(x=t([[0.5, 6.0, 0.4], [-1.0, 0.3, 2.0]]), w=t([[0.5, -0.25, 0.3], [0.2, 0.7, -0.1]]),
                  threshold=6.0),
             "|x| = 6.0 equals the threshold: not an outlier (strictly greater)"),
        Case(dict(x=t([[0.5, -1.0, 0.25, 0.75], [4.0, -2.0, 1.0, 3.0]]),
                  w=t([[0.3, -0.7, 0.1, 0.2], [1.5, 0.25, -0.5, 0.05]]), threshold=6.0),
             "no outliers: plain W8A8, x per token and w per output channel"),
        Case(dict(x=t([[7.0, -9.0], [0.5, 6.5]]), w=t([[0.3, -0.7], [1.5, 0.25]]), threshold=6.0),
             "every column is an outlier: the product is all float, x @ w.T"),
        Case(dict(x=t([[0.5, 3.0, -0.25, 1.0], [-2.5, 0.1, 0.75, -0.5], [0.2, -0.4, 0.3, 0.125]]),
                  w=t([[0.3, -0.7, 0.1, 0.2], [1.5, 0.25, -0.5, 0.05], [0.0, 0.0, 0.0, 0.0]]), threshold=2.0),
             "threshold 2: columns 0 and 1 go to float; an all-zero weight row gives 0"),
    ]

    @st.composite
    def strat(draw):
        n, d, out = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
        return Case(dict(x=draw(_matrix(n, d, 1e-2, 10.0)), w=draw(_matrix(out, d, 1e-2, 1.0)),
                         threshold=draw(st.sampled_from([2.0, 4.0, 6.0]))))

    return Exercise("k", 3, "llm_int8_linear", _k3_oracle, _k3_compare, lambda: cases, strat,
                    "outliers = (x.abs() > threshold).any(dim=0); y = x[:, outliers] @ w[:, outliers].T + "
                    "fake_quantize_activations(x with those columns 0, 8) @ w_hat.T, w_hat per row of w with "
                    "its float32 scale", max_examples=20)


# -- k4 kv_cache_bytes_per_token -----------------------------------------------------------------

def _k4_oracle(n_layers, d_model, n_heads, bits, key_axis="channel", value_axis="token", group=32):
    inputs = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, bits=bits, key_axis=key_axis,
                  value_axis=value_axis, group=group)
    return _Bytes(kv_cache_bytes_per_token(**inputs), inputs)


def _kv(n_layers, d_model, n_heads, bits, key_axis, value_axis, group, zero_point="bits", scale_bytes=2,
        code_bits=False, token_grids="heads", channel_shared=True, values_axis=True, layers=True,
        fp16_values=True):
    """k4 (the defaults), or a known mistake of it."""
    if bits is None:
        return (2 if fp16_values else 1) * n_layers * d_model * 2.0
    total = 0.0
    for axis in (key_axis, value_axis if values_axis else key_axis):
        codes = d_model * bits if code_bits else d_model * bits / 8
        if axis == "token":
            grids = n_heads if token_grids == "heads" else 1
        else:
            grids = d_model / group if channel_shared else d_model
        zp = {"bits": bits / 8, "none": 0, "byte": 1}[zero_point]
        total += codes + grids * (scale_bytes + zp)
    return (n_layers if layers else 1) * total


def _k4_variant(**kw):
    return lambda **inputs: _kv(**inputs, **kw)


K4_VARIANTS = [
    (_k4_variant(zero_point="none"),
     "each grid also stores its zero point (the KV grids are asymmetric, min/max): bits / 8 bytes per "
     "grid beside its 2-byte scale"),
    (_k4_variant(zero_point="byte"),
     "the zero point is a `bits`-bit code like the others: bits / 8 bytes, not a whole byte"),
    (_k4_variant(scale_bytes=4),
     "each grid's scale is a float16 scale: 2 bytes, not 4"),
    (_k4_variant(code_bits=True),
     "a b-bit code takes bits / 8 bytes: count bytes, not bits"),
    (_k4_variant(token_grids="one"),
     "per token means one grid per head in each token: n_heads grids per token, not one"),
    (_k4_variant(channel_shared=False),
     "per channel: each channel's grid is shared by the `group` tokens of its group, so d_model / "
     "group grids per token, not d_model"),
    (_k4_variant(values_axis=False),
     "the values use the grids of value_axis (the keys those of key_axis)"),
    (_k4_variant(layers=False),
     "every layer has its own cache: multiply by n_layers"),
    (_k4_variant(fp16_values=False),
     "float16: keys and values, 2 bytes per number: 2 * n_layers * d_model * 2"),
]


def _k4_compare(e, g):
    if isinstance(g, bool) or not isinstance(g, (int, float)):
        return Mismatch(repr(float(e)), show(g), "return the bytes per token as a Python float")
    if abs(g - e) <= 1e-9 * max(1.0, abs(e)):
        return None
    hint = diagnose(e.inputs, g, K4_VARIANTS, same=lambda a, b: abs(a - b) <= 1e-9 * max(1.0, abs(a)))
    return Mismatch(repr(float(e)), repr(g), hint)


def _k4():
    def case(n_layers, d_model, n_heads, bits, key_axis, value_axis, group, hint=""):
        return Case(dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, bits=bits, key_axis=key_axis,
                         value_axis=value_axis, group=group), hint)

    cases = [
        case(4, 128, 4, 8, "channel", "token", 32, "the tiny GPT at 8 bits: per layer, keys and values of "
             "d codes each, plus the grids' float16 scales and 8-bit zero points"),
        case(4, 128, 4, None, "channel", "token", 32,
             "float16: 2 bytes per number, keys and values of every layer"),
        case(2, 64, 2, 4, "token", "token", 32, "4 bits, per token: n_heads grids per token for the keys "
             "and for the values, each a float16 scale and a 4-bit zero point"),
        case(3, 64, 4, 4, "token", "channel", 16,
             "keys per token, values per channel: each uses its own axis"),
        case(1, 96, 3, 2, "channel", "channel", 8, "2 bits, per channel over groups of 8 tokens: "
             "d_model / group grids per token"),
        case(2, 48, 6, 3, "channel", "token", 4, "3 bits: fractions of a byte per token are fine"),
    ]

    @st.composite
    def strat(draw):
        n_heads = draw(st.sampled_from([1, 2, 4, 8]))
        axis = st.sampled_from(["token", "channel"])
        return case(draw(st.integers(1, 8)), n_heads * draw(st.sampled_from([8, 16, 32, 64])), n_heads,
                    draw(st.sampled_from([None, 2, 3, 4, 6, 8])), draw(axis), draw(axis),
                    draw(st.sampled_from([1, 8, 16, 32, 64, 128])))

    return Exercise("k", 4, "kv_cache_bytes_per_token", _k4_oracle, _k4_compare, lambda: cases, strat,
                    "per layer, for the keys (key_axis) and the values (value_axis): d_model * bits / 8 "
                    "bytes of codes + grids * (2 + bits / 8), grids = n_heads per token or d_model / group "
                    "per channel; float16: 2 * n_layers * d_model * 2")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_k1(), _k2(), _k3(), _k4()]
