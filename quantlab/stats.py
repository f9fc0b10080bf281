"""The statistics of comparing models on test digits: a 95% Wilson interval for one accuracy, and
McNemar's exact test for two models scored on the same digits (the series' one rule for "better").

Taught in notebook ``c_train_and_test``; every later lesson uses them.
"""

from __future__ import annotations

import fractions
import math
from typing import NamedTuple

import torch

from ._validate import (
    check_real,
)


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``correct / total`` (95% for the default ``z``).

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct/total``:
    unlike ``p -/+ z sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not empty at 0% or 100%.
    On 1,000 test digits at 98% it is about [97.0%, 98.7%]. It describes one accuracy; two models
    scored on the same digits are compared with :func:`compare_predictions`. Taught in notebook
    ``c_train_and_test``.
    """
    if isinstance(correct, bool) or isinstance(total, bool) or not isinstance(correct, int) \
            or not isinstance(total, int):
        raise TypeError(f"correct and total must be ints; got {correct!r}, {total!r}")
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0; got {correct}, {total}")
    p, n = correct / total, total
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return lo, hi


class PairedComparison(NamedTuple):
    """Two models compared on the same test digits (see :func:`compare_predictions`).

    ``only_a``: digits ``a`` classifies right and ``b`` wrong; ``only_b``: the reverse;
    ``p_value``: McNemar's exact two-sided p-value; ``verdict``: ``"better"`` (``a`` beats ``b``
    at the level ``alpha``), ``"worse"`` or ``"no measurable difference"``.
    """

    only_a: int
    only_b: int
    p_value: float
    verdict: str

    def __str__(self) -> str:
        return (f"{self.verdict} (right only in a: {self.only_a}, right only in b: {self.only_b}, "
                f"McNemar exact p = {self.p_value:.3g})")


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value for ``only_a`` digits that only model a gets right and
    ``only_b`` that only model b gets right.

    Digits both get right or both get wrong say nothing about which is better; under "neither is
    better" each of the ``n = only_a + only_b`` discordant digits is a fair coin, so the p-value is
    ``min(1, 2 P(X <= min(only_a, only_b)))`` for ``X ~ Binomial(n, 1/2)`` (1 when ``n = 0``),
    which is what ``scipy.stats.binomtest(only_a, n).pvalue`` computes. Exact integers: no
    normal approximation, so it is right for the handful of digits quantization moves.
    """
    for value, name in ((only_a, "only_a"), (only_b, "only_b")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (a count of digits); got {value!r}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(fractions.Fraction(2 * tail, 2 ** n)))


def compare_predictions(pred_a, pred_b, labels, alpha: float = 0.05) -> PairedComparison:
    """Is model a better than model b on the same test digits? McNemar's exact test.

    ``pred_a``, ``pred_b``: each model's predicted classes (as :func:`predict` returns them);
    ``labels``: the true classes, all three the same length. The two models are compared digit
    by digit: only the digits where exactly one of them is right count (the *discordant* digits),
    and a model is ``"better"`` only when the exact test rejects "neither is better" at the level
    ``alpha`` (5%) and it has more of them. This is the series' one rule for "better"; a 95%
    interval (:func:`wilson_interval`) stays the way to report one accuracy. Two models whose
    intervals overlap can still differ measurably: this paired test uses that both saw the same
    digits.
    """
    def as_labels(x, name):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
        else:
            try:
                t = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"{name} must be a 1-D tensor or array of class indices; got "
                                f"{type(x).__name__}") from err
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of class indices; got dtype "
                             f"{t.dtype} and shape {tuple(t.shape)}")
        return t.long()

    a, b, y = as_labels(pred_a, "pred_a"), as_labels(pred_b, "pred_b"), as_labels(labels, "labels")
    if not len(a) == len(b) == len(y) or len(y) == 0:
        raise ValueError(f"pred_a, pred_b and labels must have the same length > 0 (the same test "
                         f"digits); got {len(a)}, {len(b)} and {len(y)}")
    alpha = check_real(alpha, "alpha", 0.0, 1.0, low_open=True, high_open=True)
    right_a, right_b = a == y, b == y
    only_a = int((right_a & ~right_b).sum())
    only_b = int((right_b & ~right_a).sum())
    p = mcnemar_p_value(only_a, only_b)
    verdict = ("no measurable difference" if p >= alpha or only_a == only_b
               else "better" if only_a > only_b else "worse")
    return PairedComparison(only_a, only_b, p, verdict)
