"""Exercises of lesson c (c_train_and_test): statements, stubs, worked solutions, and the mistakes the checker
must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="c_train_and_test",
    title="c · Exercises: an accuracy's interval and the paired test (练习: 训练与测试)",
    goal="Write the two statistics every later lesson relies on: the 95% Wilson interval of one accuracy, and "
         "McNemar's exact paired test of two models on the same test digits (its discordant counts, then its "
         "p-value). The checks compare your numbers with `quantlab.stats` and `scipy.stats.binomtest`.",
    oracle="`quantlab.stats` and SciPy's `binomtest`",
    setup='''\
# setup: math, torch, and the checker (check.run checks the functions defined so far in this notebook)
import math

import torch

from quantlab import check

Z = 1.959964  # the 97.5% quantile of the standard normal distribution, to 6 decimals (quantlab's z)''',
    exercises=[
        ex(1, "wilson_interval", "the 95% Wilson interval of an accuracy",
           r"""
           With $p$ = `correct / total`, $n$ = `total` and $z$ = `Z` (1.959964, what quantlab uses; the lesson's
           formula rounds it to 1.96):
           $$ \frac{p + \frac{z^2}{2n} \pm z\sqrt{\frac{p(1-p)}{n} + \frac{z^2}{4n^2}}}{1 + \frac{z^2}{n}} $$
           The lower end is exactly `0.0` when `correct == 0` and the upper end exactly `1.0` when `correct == total`
           (the formula gives them only up to rounding). Return `(lo, hi)` as Python floats (float64: `math.sqrt`),
           within $10^{-12}$ of quantlab's.""",
           '''
           def wilson_interval(correct, total):
               """The 95% Wilson interval (lo, hi) of the accuracy correct / total, as Python floats."""''',
           '''
           p, n = correct / total, total
           centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
           half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
           lo = 0.0 if correct == 0 else centre - half
           hi = 1.0 if correct == total else centre + half
           return lo, hi'''),
        ex(2, "discordant_counts", "the discordant digits of two models",
           r"""
           `pred_a`, `pred_b` are the classes two models predict for the same test digits, `labels` the true classes
           (1-D int64 tensors of one length). Only the **discordant** digits count in the paired test: `only_a`, the
           digits model a gets right and model b wrong, and `only_b`, the reverse. Digits both get right, or both get
           wrong (even with different wrong answers), count for neither. Return `(only_a, only_b)` as Python ints.""",
           '''
           def discordant_counts(pred_a, pred_b, labels):
               """(only_a, only_b): digits only model a gets right, digits only model b gets right (Python ints)."""''',
           '''
           right_a, right_b = pred_a == labels, pred_b == labels
           only_a = int((right_a & ~right_b).sum())
           only_b = int((right_b & ~right_a).sum())
           return only_a, only_b'''),
        ex(3, "mcnemar_p_value", "McNemar's exact two-sided p-value",
           r"""
           With $m$ = `only_a + only_b` discordant digits, of which the less favoured model has $k = \min($`only_a`,
           `only_b`$)$, the chance under "neither model is better" (each discordant digit a fair coin) of a split at
           least that uneven, in either direction:
           $$ p = \min\Big(1,\; 2 \sum_{i=0}^{k} \binom{m}{i} \Big/ 2^m\Big) $$
           ($p = 1$ when $m = 0$). `math.comb(m, i)` gives $\binom{m}{i}$ exactly; divide the exact integers (Python's
           `int / int` is correctly rounded even for $2^{2000}$), so nothing underflows or overflows for large $m$.
           Return a Python float, within a relative $10^{-9}$ of `scipy.stats.binomtest(only_a, m).pvalue` (and of quantlab's
           `mcnemar_p_value`).""",
           '''
           def mcnemar_p_value(only_a, only_b):
               """McNemar's exact two-sided p-value (a Python float) for the discordant counts only_a, only_b."""''',
           '''
           m, k = only_a + only_b, min(only_a, only_b)
           tail = sum(math.comb(m, i) for i in range(k + 1))   # exact integers
           return min(1.0, 2 * tail / 2**m)'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('wilson_interval', 'Z = 1.959964  #', 'Z = 1.96  #',
            'z = 1.959964', 'z = 1.96'),
    Mistake('wilson_interval', 'centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)\n'
            '    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)',
            'centre = p\n    half = Z * math.sqrt(p * (1 - p) / n)',
            'Wald', 'the textbook (Wald) interval'),
    Mistake('wilson_interval', 'half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)',
            'half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))',
            'divide the half-width by 1 + z^2/n', 'half-width not divided by 1 + z^2/n'),
    Mistake('wilson_interval', ' + Z**2 / (4 * n**2))', ')',
            'z^2/(4n^2) under the root', 'z^2/4n^2 term missing'),
    Mistake('wilson_interval', 'centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)',
            'centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / (2 * n))',
            'the denominator 1 + z^2/n', 'centre divided by 1 + z^2/2n'),
    Mistake('wilson_interval', 'lo = 0.0 if correct == 0 else centre - half',
            'lo = torch.tensor(centre - half)',
            'Python floats', 'a tensor, not a float'),
    Mistake('wilson_interval', 'hi = 1.0 if correct == total else centre + half', 'hi = centre + half',
            'exactly 1.0', 'upper end not set to 1.0'),
    Mistake('wilson_interval', 'lo = 0.0 if correct == 0 else centre - half', 'lo = centre - half',
            'exactly 0.0', 'lower end not set to 0.0'),
    Mistake('discordant_counts', 'only_a = int((right_a & ~right_b).sum())',
            'only_a = int(right_a.sum())',
            'digits both models get right count for neither', 'concordant digits counted'),
    Mistake('discordant_counts', 'only_b = int((right_b & ~right_a).sum())',
            'only_b = int(((pred_a != pred_b) & ~right_a).sum())',
            'both wrong with different answers', 'disagreements counted'),
    Mistake('discordant_counts', 'return only_a, only_b', 'return only_b, only_a',
            'model a right and model b wrong first', 'swapped'),
    Mistake('discordant_counts', 'only_a = int((right_a & ~right_b).sum())',
            'only_a = (right_a & ~right_b).sum()',
            'Python ints', 'a tensor, not an int'),
    Mistake('mcnemar_p_value', 'return min(1.0, 2 * tail / 2**m)', 'return min(1.0, tail / 2**m)',
            'two-sided', 'one-sided'),
    Mistake('mcnemar_p_value', 'return min(1.0, 2 * tail / 2**m)', 'return 2 * tail / 2**m',
            'cap it at 1', 'not capped at 1'),
    Mistake('mcnemar_p_value', 'range(k + 1)', 'range(k)',
            'i = 0, ..., k (k included)', 'k left out of the sum'),
    Mistake('mcnemar_p_value', 'm, k = only_a + only_b, min(only_a, only_b)', 'm, k = only_a + only_b, only_a',
            'the smaller of the two counts', 'k = only_a'),
    Mistake('mcnemar_p_value', 'return min(1.0, 2 * tail / 2**m)', 'return min(1.0, 2 * tail * 0.5**m)',
            'underflows', '0.5**m underflows'),
    Mistake('mcnemar_p_value', 'return min(1.0, 2 * tail / 2**m)',
            'return math.erfc(max(abs(only_a - only_b) - 1, 0) / math.sqrt(2 * m)) if m else 1.0',
            'normal (chi-square) approximation', 'normal approximation'),
]
