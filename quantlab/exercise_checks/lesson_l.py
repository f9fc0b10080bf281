"""The checks of exercises/l_exercises.ipynb: a value rounded to FP8 E4M3, MXFP4's shared exponent and
E2M1 elements, NF4's absmax and level indices, and one step of Lloyd's k-means (notebook l_number_formats).

The oracles: ``ml_dtypes``' E4M3 cast (saturated first), ``quantlab.block_formats`` for MXFP4 and NF4
(its MXFP4 blocks equal gguf's and its E2M1 rounding ``ml_dtypes``'; its NF4 levels are bitsandbytes'
constants), SciPy's ``kmeans2`` for the k-means step. Most mistakes here change many values at once, so a
failing result is compared with what each known mistake computes on the same input
(``common.diagnose``), and the hint names the mistake it equals; any other wrong result gets the
case's hint.
"""

from __future__ import annotations

import warnings
from functools import partial

import ml_dtypes
import numpy as np
import torch
from hypothesis import strategies as st
from scipy.cluster.vq import kmeans2

from ..block_formats import NF4_LEVELS, mx_quantize, nf4_quantize
from ..minifloat import decode
from .common import (
    Case,
    Exercise,
    Mismatch,
    diagnose,
    exact_ints,
    floats32,
    same_floats,
    same_tuple,
    show,
    t,
    with_inputs,
)


def _frexp_floor(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) exactly (int32), for a > 0."""
    return torch.frexp(a)[1] - 1


def _round_float(a, mantissa_bits, min_exp, top, ties="even", truncate=False, flush=False):
    """|values| ``a`` (float32) rounded on a float grid: step 2**(max(k, min_exp) - mantissa_bits),
    saturated at ``top`` (None: not saturated); or one of the known mistakes of that rounding."""
    step = 2.0 ** (torch.clamp(_frexp_floor(a), min=min_exp) - mantissa_bits)
    if truncate:
        y = torch.floor(a / step) * step
    else:
        y = (torch.round(a / step) if ties == "even" else torch.floor(a / step + 0.5)) * step
    if flush:
        y = torch.where(a < 2.0 ** min_exp, 0.0, y)
    return y if top is None else torch.clamp(y, max=top)


# -- l1 round_to_e4m3 ------------------------------------------------------------------------------

def _l1_oracle(x):
    with np.errstate(invalid="ignore", over="ignore"):  # values are clamped first: nothing overflows
        cast = x.clamp(-448.0, 448.0).numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return with_inputs(torch.from_numpy(cast), dict(x=x))


def _e4m3(x, sign=True, min_exp=-6, mantissa_bits=3, top=448.0, **mistake):
    y = _round_float(x.abs(), mantissa_bits, min_exp, top, **mistake)
    return torch.copysign(y, x) if sign else y


L1_VARIANTS = [
    (partial(_e4m3, truncate=True), "round to the nearest value (torch.round); do not truncate: "
     "floor(a / step) always rounds down"),
    (partial(_e4m3, ties="away"), "ties to even: a value exactly halfway between two E4M3 values goes to "
     "the even code (torch.round), not away from zero (floor(a / step + 0.5))"),
    (partial(_e4m3, top=None), "saturate: a magnitude that rounds above E4M3's largest value, 448, "
     "becomes 448"),
    (partial(_e4m3, top=240.0), "E4M3 (fn) has no infinity, so its top binade holds numbers: its largest "
     "value is 448, not 240 (the IEEE formats keep that binade for inf and NaN)"),
    (partial(_e4m3, min_exp=-1000), "below 2**-6 (the smallest normal value) the subnormals keep the step "
     "2**-9 down to 0: clamp the exponent k at -6, do not keep refining the step"),
    (partial(_e4m3, flush=True), "the subnormals are values, not flushed to zero: below 2**-6 round to a "
     "multiple of 2**-9"),
    (partial(_e4m3, min_exp=-7), "bias 7: the smallest normal value is 2**(1 - 7) = 2**-6, so clamp the "
     "exponent at -6 (not -7)"),
    (partial(_e4m3, mantissa_bits=2), "3 mantissa bits: 8 values per power of two, step 2**(k - 3) "
     "(2**(k - 2) is E5M2's)"),
    (partial(_e4m3, sign=False), "put the sign back (torch.copysign(y, x)): the rounding works on |x|"),
]


def _l1_compare(e, g):
    m = same_floats(e, g)
    if m is not None and isinstance(g, torch.Tensor):
        m.hint = diagnose(e.inputs, g, L1_VARIANTS, 0.0) or m.hint
    return m


def _l1():
    cases = [
        Case(dict(x=t([0.3, -0.3, 1.0, 3.14159, -100.0, 17.3, -0.05, 0.0])),
             "3 mantissa bits: 8 values per power of two, step 2**(k - 3) for k = floor(log2 |x|) "
             "(0.3 -> 0.3125, 3.14159 -> 3.25, 17.3 -> 18)"),
        Case(dict(x=t([1.0625, 1.1875, -1.0625, 248.0, 0.1171875, -5.25])),
             "ties to even (torch.round): 1.0625 -> 1.0, 1.1875 -> 1.25, 248 -> 256"),
        Case(dict(x=t([2.0**-10, 3 * 2.0**-10, 1.25 * 2.0**-10, -5 * 2.0**-11, 1.3 * 2.0**-7, 0.0146])),
             "below 2**-6 the subnormals keep the step 2**-9 (a tie at 2**-10 goes to 0, the even code)"),
        Case(dict(x=t([448.0, 460.0, 464.0, 470.0, 500.0, -1e6, 3e38, -240.0, 250.0])),
             "saturate at 448, E4M3's largest value (464, halfway to the missing 480, is a tie that goes "
             "to 448)"),
        Case(dict(x=torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) * 10),
             desc="x = 10 * randn(3, 4) (seed 0)"),
    ]

    grid = st.builds(lambda m, e, s: s * m * 2.0 ** e, st.integers(0, 31), st.integers(-14, 6),
                     st.sampled_from([1.0, -1.0]))  # 5 significant bits: many exact ties
    value = st.one_of(floats32(-600.0, 600.0), floats32(-0.02, 0.02), grid)

    @st.composite
    def strat(draw):
        shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
        n = int(np.prod(shape))
        return Case(dict(x=t(draw(st.lists(value, min_size=n, max_size=n))).reshape(shape)))

    return Exercise("l", 1, "round_to_e4m3", _l1_oracle, _l1_compare, lambda: cases, strat,
                    "k = floor(log2 |x|) (torch.frexp), step = 2**(max(k, -6) - 3), round(|x| / step) * step "
                    "ties to even, at most 448, the sign of x")


# -- l2 mxfp4_quantize -----------------------------------------------------------------------------

def _l2_oracle(x, block=32):
    bq = mx_quantize(x, "e2m1", block)
    value = ((bq.scale - 127).to(torch.int32), decode(bq.codes, "e2m1"))
    return with_inputs(value, dict(x=x, block=block))


def _mx_exponent(amax, how="frexp", emax=2, zero=True, clamp=True):
    if how == "frexp":
        X = _frexp_floor(amax) - emax
    elif how == "div6":
        X = torch.floor(torch.log2(amax / 6)).int()
    else:  # "ceil", "log2": a float32 log2, rounded up or down
        X = (torch.ceil if how == "ceil" else torch.floor)(torch.log2(amax)).int() - emax
    if zero:
        X = torch.where(amax > 0, X, -127)
    return torch.clamp(X, -127, 127) if clamp else X


def _mx(x, block, stat="amax", strided=False, sign=True, back=False, exponent=None, saturate=True,
        ties="even"):
    """MXFP4 (X, elements) as l2 asks, or one of its known mistakes."""
    rows, n = x.shape
    if strided:
        blocks = x.reshape(rows, block, n // block).transpose(1, 2)
    else:
        blocks = x.reshape(rows, n // block, block)
    amax = {"amax": lambda: blocks.abs().amax(2), "mean": lambda: blocks.abs().mean(2),
            "max": lambda: blocks.amax(2)}[stat]()
    X = _mx_exponent(amax, **(exponent or {}))
    v = blocks * 2.0 ** (-X[:, :, None])
    q = _round_float(v.abs(), 1, 0, 6.0 if saturate else None, ties=ties)
    q = torch.copysign(q, v) if sign else q
    if back:
        q = q * 2.0 ** X[:, :, None]
    return X.to(torch.int32), q.reshape(rows, n)


L2_VARIANTS = [
    (partial(_mx, exponent=dict(how="log2")), "compute floor(log2 amax) exactly (torch.frexp): a float32 "
     "log2 can round a maximum just below a power of two up to it (log2(1023.99994) is 10.0 in float32)"),
    (partial(_mx, exponent=dict(how="ceil")), "X = floor(log2 amax) - 2: floor, not ceil (with ceil the "
     "block's largest element stays below 4 and the top of E2M1's grid is never used)"),
    (partial(_mx, exponent=dict(emax=8)), "emax = 2 for E2M1 (its largest value 6 = 1.5 * 2**2); 8 is "
     "E4M3's (MXFP8)"),
    (partial(_mx, exponent=dict(how="div6")), "emax = 2: X = floor(log2 amax) - 2, not floor(log2(amax / 6)) "
     "(MX's scale comes from amax's exponent alone)"),
    (partial(_mx, exponent=dict(zero=False)), "an all-zero block has X = -127 (E8M0's smallest), whatever "
     "frexp(0) or log2(0) gives"),
    (partial(_mx, exponent=dict(clamp=False)), "clamp X to E8M0's range [-127, 127]: a block of tiny values "
     "still gets X = -127"),
    (partial(_mx, stat="max"), "take abs first: amax = max|v| (a block's largest magnitude can be negative)"),
    (partial(_mx, stat="mean"), "the shared exponent comes from the block's largest magnitude, amax = "
     "max|v|, not from the mean of |v|"),
    (partial(_mx, strided=True), "a block is `block` consecutive values of a row, x[r, j*block:(j+1)*block] "
     "(reshape to (rows, n // block, block))"),
    (partial(_mx, saturate=False), "saturate at 6: v / 2**X reaches up to just below 8, and E2M1's largest "
     "value is 6"),
    (partial(_mx, ties="away"), "ties to even: 2.5 -> 2, 5 -> 4, 0.25 -> 0 (torch.round), not away from "
     "zero"),
    (partial(_mx, sign=False), "put the sign back (torch.copysign): the rounding works on |v|"),
    (partial(_mx, back=True), "return the elements, v / 2**X rounded to E2M1, not multiplied back by 2**X"),
]


def _l2_compare(e, g):
    m = same_tuple(("X", exact_ints), ("elements", same_floats))(e, g)
    if m is not None and isinstance(g, (tuple, list)) and len(g) == 2:
        m.hint = diagnose(e.inputs, tuple(g), L2_VARIANTS, 0.0) or m.hint
    return m


def _l2():
    cases = [
        Case(dict(x=t([[0.05, -0.1, 2.5, 0.02, 0.7, 0.1, -0.2, 0.45]]), block=4),
             "per block: X = floor(log2 amax) - 2, elements v / 2**X rounded to E2M1 (amax 2.5: X = -1)"),
        Case(dict(x=t([[0.1, 0.2, 0.3, 0.4, 10.0, 20.0, 30.0, 40.0]]), block=4),
             "a block is `block` consecutive values of a row"),
        Case(dict(x=t([[5.0, 0.25, 0.75, 2.5, -3.5, 1.25, -1.75, 0.0]]), block=8),
             "amax 5: X = 0, and every element is a tie: to even, 5 -> 4, 0.25 -> 0, 0.75 -> 1, 2.5 -> 2"),
        Case(dict(x=t([[7.5, 7.0, -6.5, 1.0]]), block=4), "saturate at 6: 7.5 / 2**0 becomes 6"),
        Case(dict(x=t([[0.5, -3.0, 1.0, 0.25]]), block=4), "amax = max|v| = 3 here (a negative value)"),
        Case(dict(x=t([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, -0.5]]), block=4),
             "an all-zero block: X = -127 and its elements 0"),
        Case(dict(x=t([[1.5 * 2.0**-128, -(2.0**-130), 0.0, 2.0**-129]]), block=4),
             "floor(log2 amax) - 2 = -130 here: clamp X to E8M0's range [-127, 127]"),
        Case(dict(x=t([[1023.99994, 100.0, -0.3, 512.5]]), block=4),
             "amax just below 1024: floor(log2 amax) = 9, exactly (torch.frexp)"),
        Case(dict(x=torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), block=32),
             desc="x = randn(2, 64) (seed 0), block = 32"),
    ]

    @st.composite
    def strat(draw):
        rows, n_blocks = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        block = draw(st.sampled_from([1, 2, 4, 8, 32]))
        shift = 2.0 ** draw(st.integers(-12, 12))
        grid = st.integers(-32, 32).map(lambda i: i / 4 * shift)  # many exact ties
        value = st.one_of(st.just(0.0), floats32(-100.0, 100.0), floats32(-1e-3, 1e-3), grid)
        vals = draw(st.lists(value, min_size=rows * n_blocks * block, max_size=rows * n_blocks * block))
        return Case(dict(x=t(vals).reshape(rows, n_blocks * block), block=block))

    return Exercise("l", 2, "mxfp4_quantize", _l2_oracle, _l2_compare, lambda: cases, strat,
                    "per block of consecutive values: X = clamp(floor(log2 amax) - 2, -127, 127) (-127 for "
                    "an all-zero block); elements = v / 2**X rounded to E2M1, ties to even, at most 6")


# -- l3 nf4_encode ---------------------------------------------------------------------------------

# here x * (1 / absmax) and x / absmax fall on different sides of a midpoint (found by search)
RECIPROCAL_X = [[1.588769793510437, -0.7308265566825867, 0.19105790555477142, 0.6185280084609985]]
MIDS32 = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def _l3_oracle(x, block=64):
    bq = nf4_quantize(x, block)
    return with_inputs((bq.scale, bq.codes), dict(x=x, block=block))


def _nf4(x, block, stat="absmax", strided=False, divide=False, zero=True, rule="mids"):
    """NF4 (absmax, codes) as l3 asks, or one of its known mistakes."""
    rows, n = x.shape
    blocks = x.reshape(rows, block, -1).transpose(1, 2) if strided else x.reshape(rows, -1, block)
    absmax = {"absmax": lambda: blocks.abs().amax(2), "mean": lambda: blocks.abs().mean(2),
              "max": lambda: blocks.amax(2),
              "row": lambda: blocks.abs().amax((1, 2))[:, None].expand(rows, n // block)}[stat]()
    if divide:
        y = torch.nan_to_num(blocks / absmax[:, :, None])
    else:
        inv = torch.where(absmax > 0, 1.0 / absmax, 0.0) if zero else 1.0 / absmax
        y = blocks * inv[:, :, None]
    if rule == "argmin":
        codes = (y[..., None] - NF4_LEVELS).abs().argmin(-1)
    else:
        mids = (NF4_LEVELS[1:].double() + NF4_LEVELS[:-1].double()) / 2 if rule == "mids64" else MIDS32
        codes = ((y[..., None] >= mids) if rule == "up" else (y[..., None] > mids)).sum(-1)
    return absmax, codes.reshape(rows, n).to(torch.int32)


L3_VARIANTS = [
    (partial(_nf4, stat="mean"), "the scale is the block's absmax = max|v|, not the mean of |v|"),
    (partial(_nf4, stat="max"), "take abs first: absmax = max|v| (a block's largest magnitude can be "
     "negative)"),
    (partial(_nf4, stat="row"), "one absmax per block of `block` values, not one per row"),
    (partial(_nf4, strided=True), "a block is `block` consecutive values of a row, "
     "x[r, j*block:(j+1)*block]"),
    (partial(_nf4, divide=True), "multiply by the float32 reciprocal 1 / absmax (bitsandbytes' rule): "
     "dividing by absmax puts a value here on the other side of a midpoint"),
    (partial(_nf4, zero=False), "an all-zero block has absmax 0 and every code 7 (the level 0), not "
     "0 * (1 / 0) = NaN"),
    (partial(_nf4, rule="up"), "a value exactly on a midpoint goes to the lower level: count the midpoints "
     "strictly below y (>, not >=)"),
    (partial(_nf4, rule="mids64"), "compare with the float32 midpoints (L[j] + L[j+1]) / 2, as bitsandbytes "
     "(in float64 a midpoint moves, and a value on it changes level)"),
    (partial(_nf4, rule="argmin"), "compare with the float32 midpoints (bitsandbytes' rule), not |y - L|: a "
     "midpoint rounded up in float32 is nearer the upper level"),
]


def _l3_compare(e, g):
    if isinstance(g, (tuple, list)) and len(g) == 2 and isinstance(g[1], torch.Tensor) and \
            g[1].is_floating_point():
        return Mismatch(f"codes: {show(e[1])}", f"codes: {show(g[1])}",
                        "return the codes, the indices 0..15 of the levels (int32), not the levels "
                        "themselves")
    m = same_tuple(("absmax", same_floats), ("codes", exact_ints))(e, g)
    if m is not None and isinstance(g, (tuple, list)) and len(g) == 2:
        m.hint = diagnose(e.inputs, tuple(g), L3_VARIANTS, 0.0) or m.hint
    return m


def _l3():
    cases = [
        Case(dict(x=t([[0.5, -0.2, 0.9, -1.3, 0.05, 0.0, 0.33, -0.7]]), block=8),
             "absmax = max|v| per block; code = the number of midpoints below v * (1 / absmax)"),
        Case(dict(x=t([[0.1, -0.2, 0.3, 0.05, 10.0, -20.0, 5.0, 1.0]]), block=4),
             "one absmax per block of `block` consecutive values of a row"),
        Case(dict(x=t([[0.3, -2.0, 1.0, 0.5]]), block=4), "absmax = max|v| = 2 here (a negative value)"),
        Case(dict(x=t([[1.0] + MIDS32.tolist()]), block=16),
             "absmax 1 and every other value exactly on a float32 midpoint: each goes to the lower level"),
        Case(dict(x=t(RECIPROCAL_X), block=4), "y = v * (1 / absmax) with the float32 reciprocal"),
        Case(dict(x=t([[0.0, 0.0, 0.0, 0.0, 0.5, -1.0, 0.25, 0.0]]), block=4),
             "an all-zero block: absmax 0, every code 7"),
        Case(dict(x=torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), block=64),
             desc="x = randn(2, 128) (seed 0), block = 64"),
    ]

    value = st.one_of(st.just(0.0), floats32(-10.0, 10.0), st.sampled_from(MIDS32.tolist() + [1.0, -1.0]))

    @st.composite
    def strat(draw):
        rows, n_blocks = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        block = draw(st.sampled_from([1, 2, 4, 8, 64]))
        vals = draw(st.lists(value, min_size=rows * n_blocks * block, max_size=rows * n_blocks * block))
        return Case(dict(x=t(vals).reshape(rows, n_blocks * block), block=block))

    return Exercise("l", 3, "nf4_encode", _l3_oracle, _l3_compare, lambda: cases, strat,
                    "per block of consecutive values: absmax = max|v|; codes = the number of float32 "
                    "midpoints of NF4_LEVELS strictly below v * (1 / absmax) (7 in an all-zero block)")


# -- l4 kmeans_step --------------------------------------------------------------------------------

def _l4_oracle(w, centroids):
    with warnings.catch_warnings():  # an empty cluster: SciPy warns, and keeps its centroid
        warnings.simplefilter("ignore")
        code_book, label = kmeans2(w.double().numpy(), centroids.double().numpy().copy(), iter=1,
                                   minit="matrix", missing="warn")
    value = (torch.from_numpy(label).to(torch.int64), torch.from_numpy(code_book).to(torch.float32))
    return with_inputs(value, dict(w=w, centroids=centroids))


def _lloyd(w, centroids, nearest="argmin", empty="keep", mean=True, moved=False):
    """One Lloyd step as l4 asks (index, new centroids), or one of its known mistakes."""
    w, c = w.double(), centroids.double()
    d = w[:, None] - c[None, :]
    index = {"argmin": lambda: d.abs().argmin(1), "argmax": lambda: d.abs().argmax(1),
             "signed": lambda: d.argmin(1)}[nearest]()
    sums = torch.zeros_like(c).index_add_(0, index, w)
    counts = torch.bincount(index, minlength=len(c)).double()
    new = sums / counts.clamp(min=1) if mean else sums
    new = {"keep": torch.where(counts > 0, new, c), "zero": new, "nan": sums / counts}[empty]
    if moved:
        index = (w[:, None] - new[None, :]).abs().argmin(1)
    return index, new.float()


L4_VARIANTS = [
    (partial(_lloyd, empty="zero"), "an empty cluster keeps its centroid (it has no value to average), "
     "it does not move to 0"),
    (partial(_lloyd, empty="nan"), "an empty cluster keeps its centroid (it has no value to average): "
     "0 / 0 gives NaN"),
    (partial(_lloyd, mean=False), "move each centroid to the mean of its values (their sum / their count)"),
    (partial(_lloyd, nearest="argmax"), "assign each value to its nearest centroid (argmin), not the "
     "farthest"),
    (partial(_lloyd, nearest="signed"), "the distance |w - c| (abs) decides: the smallest signed difference "
     "w - c is always the largest centroid's"),
    (partial(_lloyd, moved=True), "return the assignment to the centroids given (the one the step used to "
     "move them), not a new assignment to the moved centroids"),
]


def _l4_compare(e, g):
    m = same_tuple(("index", exact_ints), ("new_centroids", lambda a, b, w: same_floats(a, b, w, 1e-6)))(e, g)
    if m is not None and isinstance(g, (tuple, list)) and len(g) == 2:
        m.hint = diagnose(e.inputs, tuple(g), L4_VARIANTS, 1e-6) or m.hint
    return m


def _l4():
    cases = [
        Case(dict(w=t([0.1, 0.4, 0.35, 2.0, 2.2, -1.0]), centroids=t([0.0, 1.0, 2.0])),
             "index: the nearest centroid; each centroid moves to the mean of the values assigned to it"),
        Case(dict(w=t([0.1, 0.2, 3.0]), centroids=t([0.0, 10.0, 3.0])),
             "the centroid 10 gets no value: an empty cluster keeps its centroid"),
        Case(dict(w=t([0.5, 1.5, -0.5]), centroids=t([0.0, 1.0, 2.0, -1.0])),
             "ties: 0.5 is as near 0 as 1, and goes to the first of them (index 0)"),
        Case(dict(w=t([0.3, 0.7, -1.0, 2.0, 1.9]), centroids=t([1.0, 0.0, 1.0])),
             "centroids in any order, two equal: a tie goes to the first, the second stays empty"),
        Case(dict(w=torch.randn(20, generator=torch.Generator().manual_seed(0)),
                  centroids=t([-1.5, -0.5, 0.5, 1.5])),
             desc="w = randn(20) (seed 0), centroids = [-1.5, -0.5, 0.5, 1.5]"),
    ]

    value = st.one_of(floats32(-10.0, 10.0), st.integers(-8, 8).map(lambda i: i / 4))  # ties, repeats

    @st.composite
    def strat(draw):
        w = draw(st.lists(value, min_size=1, max_size=12))
        c = draw(st.lists(value, min_size=1, max_size=5))
        return Case(dict(w=t(w), centroids=t(c)))

    return Exercise("l", 4, "kmeans_step", _l4_oracle, _l4_compare, lambda: cases, strat,
                    "index = argmin_j |w_i - c_j| (first on ties) against the centroids given; new c_j = "
                    "mean of its values in float64, an empty cluster keeps c_j; float32 centroids, int64 "
                    "index")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_l1(), _l2(), _l3(), _l4()]
