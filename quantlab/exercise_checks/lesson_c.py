"""The checks of exercises/c_exercises.ipynb: the Wilson interval, the discordant counts and McNemar's exact
p-value (notebook c_train_and_test). Oracles: quantlab.stats and scipy.stats.binomtest.

Every plausible mistake of c1 and c3 changes the result on every input, so hand-picked cases cannot tell
them apart by which case fails first; instead the oracle also computes each mistaken variant, and a result
that equals one of them gets the hint that names that mistake."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from scipy.stats import binomtest

from ..stats import compare_predictions, wilson_interval
from .common import Case, Exercise, Mismatch, show

Z = 1.959964


class _Tuple(tuple):
    """An expected tuple carried with the mistaken variants ``[(hint, [values])]`` of the same inputs."""


class _Float(float):
    """An expected float carried with the mistaken variants ``[(hint, [values])]`` of the same inputs."""


def _with_variants(value, variants):
    out = _Tuple(value) if isinstance(value, tuple) else _Float(value)
    out.variants = variants
    return out


def _floats_close(e, g, rel, abs_):
    return all(abs(a - b) <= abs_ + rel * abs(a) for a, b in zip(e, g))


# -- c1 ---------------------------------------------------------------------------------------

def _wilson_variants(correct, total):
    p, n = correct / total, total

    def wilson(z=Z, centre_den=None, half_den=True, term=True):
        den = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / (den if centre_den is None else centre_den)
        half = z * math.sqrt(p * (1 - p) / n + (z * z / (4 * n * n) if term else 0.0))
        half = half / den if half_den else half
        return centre - half, centre + half

    wald = Z * math.sqrt(p * (1 - p) / n)
    return [
        ("use z = 1.959964 (the constant Z), not 1.96 nor the exact quantile 1.95996398...",
         [wilson(1.96), wilson(1.959963984540054)]),
        ("this is the textbook (Wald) interval p -/+ z sqrt(p(1-p)/n); Wilson's centre is (p + z^2/(2n)) / "
         "(1 + z^2/n) and its half-width has z^2/(4n^2) under the root", [(p - wald, p + wald)]),
        ("divide the half-width by 1 + z^2/n too, not only the centre", [wilson(half_den=False)]),
        ("the half-width has z^2/(4n^2) under the root: z sqrt(p(1-p)/n + z^2/(4n^2))", [wilson(term=False)]),
        ("the denominator 1 + z^2/n divides the centre (not 1 + z^2/(2n))",
         [wilson(centre_den=1 + Z * Z / (2 * n))]),
    ]


def _c1():
    cases = [Case(dict(correct=979, total=1000)), Case(dict(correct=5, total=10)),
             Case(dict(correct=0, total=20)), Case(dict(correct=1000, total=1000)),
             Case(dict(correct=0, total=1000)),
             Case(dict(correct=20, total=20)),
             Case(dict(correct=1, total=1)), Case(dict(correct=0, total=1)), Case(dict(correct=3, total=7))]

    @st.composite
    def strat(draw):
        total = draw(st.integers(1, 100_000))
        return Case(dict(correct=draw(st.integers(0, total)), total=total))

    def oracle(correct, total):
        return _with_variants(wilson_interval(correct, total), _wilson_variants(correct, total))

    def compare(e, g):
        want = tuple(e)
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(want), show(g), "return the tuple (lo, hi)")
        if not all(isinstance(v, float) for v in g):
            return Mismatch(show(want), f"{show(tuple(g))} ({', '.join(type(v).__name__ for v in g)})",
                            "return two Python floats (math.sqrt on Python numbers), not tensors or ints")
        if want[0] == 0.0 and g[0] != 0.0:
            return Mismatch(show(want), show(tuple(g)), "correct = 0: the lower end is exactly 0.0 (set it: "
                            "the formula gives 0 only up to rounding)")
        if want[1] == 1.0 and g[1] != 1.0:
            return Mismatch(show(want), show(tuple(g)), "correct = total: the upper end is exactly 1.0 "
                                                        "(set it: "
                            "the formula gives 1 only up to rounding)")
        if _floats_close(want, g, 0.0, 1e-12):
            return None
        for hint, values in e.variants:
            if any(_floats_close(v, g, 1e-9, 1e-13) for v in values):
                return Mismatch(show(want), show(tuple(g)), hint)
        return Mismatch(show(want), show(tuple(g)))

    return Exercise("c", 1, "wilson_interval", oracle, compare, lambda: cases, strat,
                    "(p + z^2/(2n) -/+ z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n) with z = Z, "
                    "lo = 0.0 at correct = 0, hi = 1.0 at correct = total")


# -- c2 ---------------------------------------------------------------------------------------

def _labels(v):
    return torch.tensor(v, dtype=torch.int64)


def _c2():
    cases = [
        Case(dict(pred_a=_labels([0, 0, 1]), pred_b=_labels([1, 1, 0]), labels=_labels([0, 0, 0])),
             "return (only_a, only_b): model a right and model b wrong first"),
        Case(dict(pred_a=_labels([0, 0, 1, 0, 3]), pred_b=_labels([1, 1, 0, 0, 3]),
                  labels=_labels([0, 0, 0, 0, 3])),
             "digits both models get right count for neither (the last two here)"),
        Case(dict(pred_a=_labels([0, 0, 1, 2, 5]), pred_b=_labels([1, 1, 0, 3, 5]),
                  labels=_labels([0, 0, 0, 0, 0])),
             "a digit both models get wrong counts for neither, also both wrong with different answers (2 "
             "vs 3 here)"),
        Case(dict(pred_a=_labels([7]), pred_b=_labels([7]), labels=_labels([7]))),
    ]

    @st.composite
    def strat(draw):
        n = draw(st.integers(1, 300))
        classes = draw(st.integers(2, 10))
        labels = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
        pa = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
        pb = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
        return Case(dict(pred_a=_labels(pa), pred_b=_labels(pb), labels=_labels(labels)))

    def oracle(pred_a, pred_b, labels):
        c = compare_predictions(pred_a, pred_b, labels)
        return c.only_a, c.only_b

    def compare(e, g):
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            return Mismatch(show(e), show(g), "return the tuple (only_a, only_b)")
        if not all(type(v) is int for v in g):
            return Mismatch(show(e), f"{show(tuple(g))} ({', '.join(type(v).__name__ for v in g)})",
                            "return two Python ints: int(...) of each count, not tensors")
        return None if tuple(g) == e else Mismatch(show(e), show(tuple(g)))

    return Exercise("c", 2, "discordant_counts", oracle, compare, lambda: cases, strat,
                    "only_a = digits with pred_a == label and pred_b != label; only_b the reverse")


# -- c3 ---------------------------------------------------------------------------------------

def _p_variants(only_a, only_b):
    m, k = only_a + only_b, min(only_a, only_b)

    prefix, c, total = [], 1, 0  # prefix[j] = sum_{i <= j} C(m, i), built term by term (fast for large m)
    for i in range(max(only_a, only_b) + 1):
        total += c
        prefix.append(total)
        c = c * (m - i) // (i + 1)

    def tail(kk):
        return prefix[kk] if kk >= 0 else 0

    def chi2(correction):
        if m == 0:
            return 1.0
        d = max(abs(only_a - only_b) - (1 if correction else 0), 0)
        return math.erfc(d / math.sqrt(2 * m))

    return [
        ("two-sided: twice the tail 2 sum_{i<=k} C(m, i) / 2^m (the split could be as uneven the other way)",
         [min(1.0, tail(k) / 2**m)]),
        ("cap it at 1: p = min(1, 2 sum ...) (with equal counts, or none, twice the tail exceeds 1)",
         [2 * tail(k) / 2**m]),
        ("sum i = 0, ..., k (k included): range(k + 1)", [min(1.0, 2 * tail(k - 1) / 2**m) if k else 0.0]),
        ("k is the smaller of the two counts, min(only_a, only_b)",
         [min(1.0, 2 * tail(only_a) / 2**m), min(1.0, 2 * tail(only_b) / 2**m)]),
        ("use McNemar's exact binomial sum, not the normal (chi-square) approximation",
         [chi2(True), chi2(False)]),
    ]


def _c3():
    cases = [
        Case(dict(only_a=10, only_b=2)), Case(dict(only_a=3, only_b=9)), Case(dict(only_a=4, only_b=4)),
        Case(dict(only_a=0, only_b=0)), Case(dict(only_a=0, only_b=7)), Case(dict(only_a=18, only_b=6)),
        Case(dict(only_a=600, only_b=540), "for large m floats fail: 0.5**m underflows to 0, and 2.0**m or a "
             "float of the huge tail overflows; divide the exact integers, 2 * tail / 2**m"),
        Case(dict(only_a=1500, only_b=1450), "for large m floats fail: 0.5**m underflows to 0, and 2.0**m "
                                             "or a "
             "float of the huge tail overflows; divide the exact integers, 2 * tail / 2**m"),
    ]

    @st.composite
    def strat(draw):
        return Case(dict(only_a=draw(st.integers(0, 300)), only_b=draw(st.integers(0, 300))))

    def oracle(only_a, only_b):
        m = only_a + only_b
        p = 1.0 if m == 0 else float(binomtest(only_a, m).pvalue)
        return _with_variants(p, _p_variants(only_a, only_b))

    def compare(e, g):
        want = float(e)
        if type(g) is not float:
            return Mismatch(show(want), f"{show(g)} ({type(g).__name__})",
                            "return a Python float: float(...) of the result (not a Fraction, an int or a "
                            "tensor)")
        if math.isclose(g, want, rel_tol=1e-9, abs_tol=0.0):
            return None
        for hint, values in e.variants:
            if any(math.isclose(g, v, rel_tol=1e-9, abs_tol=0.0) for v in values):
                return Mismatch(show(want), show(g), hint)
        return Mismatch(show(want), show(g))

    return Exercise("c", 3, "mcnemar_p_value", oracle, compare, lambda: cases, strat,
                    "p = min(1, 2 sum_{i=0..k} C(m, i) / 2^m) with m = only_a + only_b, k = min(only_a, "
                    "only_b)")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_c1(), _c2(), _c3()]
