"""Exercises of lesson da (da_calibration): statements, stubs, worked solutions, and the mistakes the checker
must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="da_calibration",
    title="da · Exercises: percentile and MSE ranges, AdaRound's rounding variable (练习: 校准方法)",
    goal="Write three of notebook da's rules yourself: the percentile range read from a histogram, the "
         "MSE of every candidate clip and the clip that minimises it, and AdaRound's rectified sigmoid with its "
         "regulariser. The checks compare your results with `quantlab.observers` and `quantlab.ptq`.",
    oracle='`quantlab.observers` and `quantlab.ptq`',
    setup='''\
# setup: torch, lesson a's functions (from quantlab), and the checker
import torch

from quantlab import calc_scale_zero_point, check, dequantize, quantize''',
    exercises=[
        ex(1, "percentile_range", "the percentile range of a histogram",
           r"""
           The `percentile` observer (as ONNX Runtime's percentile calibrator) keeps the middle `percentile` % of the
           values and splits the rest between the two tails: the cut is $c = (100 - \text{percentile})/200$ on each
           side (0.005% for 99.99). From a histogram, `hist` (the counts of $B$ bins, int64) and `edges` (their
           $B+1$ increasing edges, float32), with the cumulative fraction
           $$ F_j = \sum_{i \le j} h_i \Big/ \sum_i h_i \qquad \text{(float64: } \texttt{torch.cumsum(hist.double() / hist.sum(), 0)}\text{)} $$
           - $lo$ = the **left** edge of the first bin $j$ where $F_j \ge c$, and $hi$ = the left edge of the first bin
             where $F_j \ge 1 - c$ (`torch.searchsorted(F, values)` finds these first bins);
           - then kept inside the observed range: $lo \leftarrow \max(lo, r_{min})$, $hi \leftarrow \min(hi, r_{max})$
             (`min_val`, `max_val`), and finally $hi \leftarrow \max(hi, lo)$: all the values of a constant tensor fall
             in one bin, whose left edge lies below the value.

           Return `(lo, hi)` as float32 tensors of shape `()`.""",
           '''
           def percentile_range(hist, edges, min_val, max_val, percentile=99.99):
               """(lo, hi): the percentile observer's range from a histogram, float32 tensors of shape ()."""''',
           '''
           cdf = torch.cumsum(hist.double() / hist.sum(), 0)   # float64, as ONNX Runtime's NumPy
           cut = (100.0 - percentile) / 200.0                  # the rest, split between the two tails
           lo_bin, hi_bin = torch.searchsorted(cdf, torch.tensor([cut, 1.0 - cut], dtype=torch.float64))
           lo = torch.maximum(edges[lo_bin], min_val)          # left edges, kept inside the observed range
           hi = torch.minimum(edges[hi_bin], max_val)
           return lo, torch.maximum(hi, lo)'''),
        ex(2, "mse_clip_errors", "the MSE of every candidate clip",
           r"""
           Section 2.1's search, over the values themselves (the per-value search `MSEObserver` runs for each weight
           channel; here on lesson a's affine unsigned grid, while for weights quantlab scores the symmetric signed grid): the
           candidate fractions are $\alpha = k/\text{grid}$ for $k = \text{grid}, \text{grid}-1, \dots, 1$, largest
           first (`torch.arange(grid, 0, -1, dtype=torch.float32) / grid`). For each, the range is
           $\alpha\,[\min x, \max x]$ (**both** ends scaled), its affine scale and zero point come from
           `calc_scale_zero_point(alpha * x.min(), alpha * x.max(), num_bits)` (lesson a: it widens the range to
           include 0), and
           $$ \mathrm{MSE}(\alpha) = \frac1N \sum_i \big(x_i - \hat x_i(\alpha)\big)^2, \qquad \hat x = \mathrm{dequantize}(\mathrm{quantize}(x)) $$
           with lesson a's `quantize` and `dequantize` (imported from quantlab above), averaged over all $N$ values of
           `x`, the clipped ones included (their error is what clipping costs). Return `(alphas, errors)`: two float32
           tensors of shape `(grid,)`; `errors` within a relative $10^{-5}$ of quantlab's.""",
           '''
           def mse_clip_errors(x, num_bits, grid=100):
               """(alphas, errors): the candidate fractions, largest first, and the MSE of each clip (float32, (grid,))."""''',
           '''
           alphas = torch.arange(grid, 0, -1, dtype=torch.float32) / grid   # 1, 1 - 1/grid, ..., 1/grid
           errors = []
           for alpha in alphas:
               scale, zero_point = calc_scale_zero_point(alpha * x.min(), alpha * x.max(), num_bits)
               x_hat = dequantize(quantize(x, scale, zero_point, num_bits), scale, zero_point)
               errors.append(((x - x_hat) ** 2).mean())
           return alphas, torch.stack(errors)'''),
        ex(3, "mse_range", "the clip with the smallest MSE",
           r"""
           The MSE observer's range: $\alpha^\ast [\min x, \max x]$ with $\alpha^\ast$ the candidate of smallest error
           from your `mse_clip_errors` (da2); among equal errors the first, i.e. the largest $\alpha$ (what
           `torch.argmin` returns). The range is $\alpha^\ast$ times the *observed* $\min x$ and $\max x$, not widened to
           0 (the scale and zero point widen it later). Return `(min_val, max_val)` as float32 tensors of shape `()`.""",
           '''
           def mse_range(x, num_bits, grid=100):
               """(min_val, max_val): the clip alpha * [x.min(), x.max()] of the smallest MSE (float32, shape ())."""''',
           '''
           alphas, errors = mse_clip_errors(x, num_bits, grid)
           best = alphas[torch.argmin(errors)]                 # the first minimum: the largest alpha
           return best * x.min(), best * x.max()'''),
        ex(4, "adaround_h_and_regularizer", "AdaRound's rectified sigmoid and its regulariser",
           r"""
           AdaRound rounds $W/S$ up by $h(V) \in [0, 1]$, the logistic sigmoid $\sigma(V) = 1/(1+e^{-V})$ stretched to
           $[\gamma, \zeta] = [-0.1, 1.1]$ and clamped, so that it reaches exactly 0 and 1:
           $$ h(V) = \mathrm{clamp}\big(\sigma(V)\,(\zeta - \gamma) + \gamma,\ 0,\ 1\big), \qquad
              f_{reg}(V) = \sum_i \big(1 - |2h(V_i) - 1|^{\beta}\big) $$
           The regulariser is 0 where every $h$ is 0 or 1 and largest at $h = 0.5$; $\beta$ (20 falling to 2 in
           notebook da) sets how wide its flat top is. Return `(h, reg)`: `h` a float32 tensor of `v`'s shape, `reg` a
           float32 tensor of shape `()`.""",
           '''
           def adaround_h_and_regularizer(v, beta):
               """(h, reg): the rectified sigmoid h(v) (float32, v's shape) and sum(1 - |2h - 1|^beta) (float32, shape ())."""''',
           '''
           zeta, gamma = 1.1, -0.1
           h = torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)
           reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
           return h, reg'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('percentile_range', 'lo = torch.maximum(edges[lo_bin], min_val)', 'lo = torch.maximum(edges[lo_bin + 1], min_val)',
            'the left edge', 'right edge (lo)'),
    Mistake('percentile_range', 'cut = (100.0 - percentile) / 200.0', 'cut = (100.0 - percentile) / 100.0',
            'split between the two tails', 'cut not split between the tails'),
    Mistake('percentile_range', 'dtype=torch.float64))', 'dtype=torch.float64), right=True)',
            'reaches (>=)', 'first bin where F > c, not >='),
    Mistake('percentile_range', 'lo = torch.maximum(edges[lo_bin], min_val)', 'lo = edges[lo_bin]',
            'inside the observed range', 'lo not kept inside [min, max]'),
    Mistake('percentile_range', 'return lo, torch.maximum(hi, lo)', 'return lo, hi',
            'hi = max(hi, lo)', 'constant tensor: hi below lo'),
    Mistake('mse_clip_errors', 'calc_scale_zero_point(alpha * x.min(), alpha * x.max(), num_bits)',
            'calc_scale_zero_point(x.min(), alpha * x.max(), num_bits)',
            'scale both ends', 'only the top clipped'),
    Mistake('mse_clip_errors', 'torch.arange(grid, 0, -1, dtype=torch.float32) / grid',
            'torch.arange(1, grid + 1, dtype=torch.float32) / grid',
            'largest first', 'alphas ascending'),
    Mistake('mse_clip_errors', 'errors.append(((x - x_hat) ** 2).mean())', 'errors.append(((x - x_hat) ** 2).sum())',
            'average', 'sum, not mean'),
    Mistake('mse_clip_errors', 'errors.append(((x - x_hat) ** 2).mean())',
            'errors.append(((x - x_hat) ** 2).mean().sqrt())',
            'not its square root', 'RMSE, not MSE'),
    Mistake('mse_clip_errors', 'errors.append(((x - x_hat) ** 2).mean())',
            'errors.append(((torch.clamp(x, alpha * x.min(), alpha * x.max()) - x_hat) ** 2).mean())',
            'the clipped values included', 'clipping error left out'),
    Mistake('mse_range', 'return best * x.min(), best * x.max()',
            'return best * torch.clamp(x.min(), max=0.0), best * x.max()',
            'not widened to 0', 'range widened to 0'),
    Mistake('mse_range', 'best = alphas[torch.argmin(errors)]', 'best = torch.argmin(errors) / len(alphas)',
            'alphas[i]', 'index taken for alpha'),
    Mistake('mse_range', 'return best * x.min(), best * x.max()', 'return best.double() * x.min(), best.double() * x.max()',
            'the statement asks for float32', 'float64'),
    Mistake('adaround_h_and_regularizer', 'torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)',
            'torch.sigmoid(v)',
            'stretched to [-0.1, 1.1]', 'no stretch'),
    Mistake('adaround_h_and_regularizer', 'torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)',
            'torch.sigmoid(v) * (zeta - gamma) + gamma',
            'clamp h to [0, 1]', 'no clamp'),
    Mistake('adaround_h_and_regularizer', '(2 * h - 1).abs().pow(beta)', '(2 * h - 1).pow(beta)',
            'absolute value', 'no abs'),
    Mistake('adaround_h_and_regularizer', 'reg = (1 - (2 * h - 1).abs().pow(beta)).sum()',
            'reg = (2 * h - 1).abs().pow(beta).sum()',
            '1 - |2h - 1|^beta', 'regulariser inverted'),
    Mistake('adaround_h_and_regularizer', 'reg = (1 - (2 * h - 1).abs().pow(beta)).sum()',
            'reg = (1 - (2 * h - 1).abs().pow(beta)).mean()',
            'a sum over the weights', 'mean, not sum'),
]
