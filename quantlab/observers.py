"""Range estimators ("observers"): which ``[min_val, max_val]`` a QParam quantizes.

Every observer sees batches with ``observe(x)`` and answers ``calculate_range(num_bits, signed,
symmetric)``; the QParam (``quantlab.observer``) turns that range into a scale and zero point with
``calc_scale_zero_point``. Min/max keeps every outlier; the others clip the range, trading a
larger error on the few clipped values for a finer grid (smaller rounding error) on all others.

======================  ========================================================================
``"minmax"``            running min and max (exactly the QParam of notebook d)
``"moving_average"``    ``range <- range + c * (batch_range - range)`` (QAT; PyTorch's observer)
``"percentile"``        the ``(100-p)/2`` and ``100-(100-p)/2`` percentiles of a histogram (ORT)
``"mse"``               the clip ``alpha * [min, max]`` minimising the quantization MSE
                        (per tensor over a histogram, per channel over the weights themselves)
``"entropy"``           TensorRT's KL-divergence threshold over the histogram of ``|x|``
``"histogram"``         PyTorch HistogramObserver's L2 search over start/end bins
======================  ========================================================================

The histogram observers share ONNX Runtime's histogram: 2048 bins over ``[-T, T]``
(``T = max |x|`` of the first batch), widened by whole bins on both sides when a later batch
exceeds it, so the bins never move. Taught in notebook ``da_calibration``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ._validate import check_int, check_real
from .qparams import calc_min_max, calc_scale_zero_point, check_float_tensor, quant_range


class Observer:
    """Base class: ``observe`` batches, then ``calculate_range`` for a bit width.

    Args:
        axis: None for one range per tensor, or the channel axis (only min/max, moving average
            and MSE support it).
    """

    name = "observer"
    per_channel_ok = False

    def __init__(self, axis: int | None = None):
        if axis is not None:
            axis = check_int(axis, "axis")
        if axis is not None and not self.per_channel_ok:
            raise ValueError(f"the {self.name!r} observer is per tensor only (axis=None); "
                             f"got axis={axis!r}; per channel use 'minmax', 'moving_average' or 'mse'")
        self.axis = axis
        self.reset()

    def reset(self):
        """Forget everything observed."""
        self.min_val = self.max_val = None

    @property
    def observed(self) -> bool:
        return self.min_val is not None

    def observe(self, x: torch.Tensor):
        check_float_tensor(x, finite=False)  # calc_min_max checks the min and max
        self.min_val, self.max_val = calc_min_max(x, self.min_val, self.max_val, self.axis)

    def load_range(self, min_val, max_val):
        """Resume from a stored range (after ``load_state_dict``); only min/max kinds can."""

    def calculate_range(self, num_bits: int, signed: bool = False, symmetric: bool = False):
        """``(min_val, max_val)`` to quantize with, float32 tensors of shape () or (C,)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(axis={self.axis})"


class MinMaxObserver(Observer):
    """``min_val = min over all batches of min(x)``, ``max_val = max ... max(x)`` (per tensor or
    per channel): the range covers every value seen. PyTorch: ``MinMaxObserver``."""

    name, per_channel_ok = "minmax", True

    def load_range(self, min_val, max_val):
        self.min_val, self.max_val = min_val.clone(), max_val.clone()

    def calculate_range(self, num_bits, signed=False, symmetric=False):
        return self.min_val, self.max_val


class MovingAverageObserver(MinMaxObserver):
    """``min_val <- min_val + c * (min(x) - min_val)`` (same for max); the first batch (or
    ``c == 1``) sets the range. PyTorch: ``MovingAverageMinMaxObserver(averaging_constant=c)``."""

    name = "moving_average"

    def __init__(self, averaging_constant: float = 0.01, axis: int | None = None):
        self.averaging_constant = check_real(averaging_constant, "averaging_constant", 0, 1,
                                             low_open=True)
        super().__init__(axis)

    def observe(self, x):
        check_float_tensor(x, finite=False)  # calc_min_max checks the min and max
        cur_min, cur_max = calc_min_max(x, axis=self.axis)
        if self.min_val is None or self.averaging_constant == 1.0:
            self.min_val, self.max_val = cur_min, cur_max
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (cur_min - self.min_val)
            self.max_val = self.max_val + c * (cur_max - self.max_val)

    def __repr__(self):
        return f"MovingAverageObserver(averaging_constant={self.averaging_constant}, axis={self.axis})"


def _check_bins(bins) -> int:
    bins = check_int(bins, "bins", 16)
    if bins % 2:
        raise ValueError(f"bins must be an even int >= 16 (two halves around 0); got {bins}")
    return bins


class _HistogramBase(Observer):
    """ONNX Runtime's histogram (``HistogramCollector.collect_value``): ``hist`` counts of
    ``bins`` equal bins over ``[-T, T]``; a batch beyond ``T`` adds whole bins on both sides."""

    def __init__(self, bins: int = 2048):
        self.bins = _check_bins(bins)
        super().__init__(None)

    def reset(self):
        super().reset()
        self.hist, self.edges, self.threshold = None, None, None

    def observe(self, x):
        super().observe(x)  # exact min and max
        # float32 bins as ONNX Runtime's collector; float64 when the width 2t would overflow
        # float32 (values near +-2e38)
        a = x.detach().to(torch.float32).flatten().numpy()
        t = np.float32(max(abs(a.min()), abs(a.max())))
        wide = self.threshold is not None and self.threshold.dtype == np.float64
        if wide or t > np.finfo(np.float32).max / 4:
            a, t = a.astype(np.float64), np.float64(t)
            if self.hist is not None:
                self.threshold = np.float64(self.threshold)
        if self.hist is None:
            self.hist, self.edges = np.histogram(a, self.bins, range=(-t, t))
            self.threshold = t
        elif t <= self.threshold:
            self.hist = self.hist + np.histogram(a, len(self.hist),
                                                 range=(-self.threshold, self.threshold))[0]
        elif self.threshold == 0:
            hist, self.edges = np.histogram(a, len(self.hist), range=(-t, t))
            self.hist, self.threshold = hist + self.hist, t
        else:  # widen by whole bins of the old width (ORT's merge_histogram)
            n_old = len(self.hist)
            stride = 2 * self.threshold / n_old
            half = int((t - self.threshold) // stride + 1)
            if half <= 4 * n_old:
                t = half * stride + self.threshold
                hist, self.edges = np.histogram(a, n_old + 2 * half, range=(-t, t))
                hist[half:n_old + half] += self.hist
            else:  # a range 9x wider or more: whole bins of a tiny first batch would need
                # millions of bins; re-bin instead, each old bin counted at its centre
                hist, self.edges = np.histogram(a, n_old, range=(-t, t))
                old_edges = np.linspace(-self.threshold, self.threshold, n_old + 1)
                centres = (old_edges[:-1] + old_edges[1:]) / 2
                hist += np.histogram(centres, n_old, range=(-t, t), weights=self.hist)[0].astype(
                    hist.dtype)
            self.hist, self.threshold = hist, t

    def abs_histogram(self):
        """Counts of ``|x|`` in bins ``[k w, (k+1) w)`` and their edges (the two halves folded)."""
        half = len(self.hist) // 2
        h = self.hist[half:].astype(np.float64) + self.hist[:half][::-1]
        return h, self.edges[half:].astype(np.float64)

    def clip(self, t):
        """The observed range clipped to ``[-t, t]``."""
        t = torch.tensor(float(t), dtype=torch.float32)
        return torch.maximum(self.min_val, -t), torch.minimum(self.max_val, t)


class PercentileObserver(_HistogramBase):
    """``min_val``/``max_val`` = the ``(100 - p)/200`` and ``1 - (100 - p)/200`` quantiles of the
    histogram: the left edge of the first bin where the cumulative fraction reaches them, kept
    inside the observed [min, max]. ONNX Runtime: ``PercentileCalibrater(symmetric=False)``."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        self.percentile = check_real(percentile, "percentile", 50, 100, low_open=True)
        super().__init__(bins)

    def calculate_range(self, num_bits, signed=False, symmetric=False):
        cdf = np.cumsum(self.hist / self.hist.sum())
        cut = (100.0 - self.percentile) / 200.0
        lo = self.edges[np.searchsorted(cdf, cut)]
        hi = self.edges[np.searchsorted(cdf, 1.0 - cut)]
        lo = torch.maximum(self.min_val, torch.tensor(float(lo)))
        hi = torch.minimum(self.max_val, torch.tensor(float(hi)))
        # a constant tensor puts every count in one bin, whose left edge lies below the value:
        # the range is then the value itself
        return lo, torch.maximum(hi, lo)

    def __repr__(self):
        return f"PercentileObserver(percentile={self.percentile})"


def _fake_quant_error(x, weight, lo, hi, num_bits, signed, symmetric):
    """``sum weight * (x - fq(x))**2`` for every candidate range: x (..., K), lo/hi (A, ...)."""
    scale, zp = calc_scale_zero_point(lo.flatten(), hi.flatten(), num_bits, signed, symmetric)
    qmin, qmax = quant_range(num_bits, signed)
    shape = lo.shape + (1,)
    scale, zp = scale.reshape(shape), zp.reshape(shape).to(torch.float32)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, qmin, qmax)
    return (weight * (x - (q - zp) * scale) ** 2).sum(-1)


class MSEObserver(_HistogramBase):
    """``alpha* = argmin_alpha E[(x - fq(x; alpha min, alpha max))^2]`` over ``grid`` values of
    alpha in (0, 1]; the range is ``alpha* [min, max]``.

    Per tensor the expectation runs over the histogram's bin centres weighted by their counts;
    per channel (``axis`` given: weights) over the tensor itself, one alpha per channel, for the
    latest tensor observed. min == max or an all-zero channel: every alpha gives the same
    error and alpha = 1 is kept (the first minimum from the top).
    """

    name, per_channel_ok = "mse", True

    def __init__(self, axis: int | None = None, grid: int = 100, bins: int = 8192):
        self.grid = check_int(grid, "grid", 2)
        if axis is None:
            _HistogramBase.__init__(self, bins)
        else:
            self.bins = _check_bins(bins)
            Observer.__init__(self, axis)

    def reset(self):
        _HistogramBase.reset(self)
        self.tensor = None

    def observe(self, x):
        if self.axis is None:
            return super().observe(x)
        check_float_tensor(x)  # per channel: the range of the current tensor only
        self.min_val, self.max_val = calc_min_max(x, axis=self.axis)
        self.tensor = x.detach().to(torch.float32).transpose(0, self.axis).flatten(1)

    @property
    def alphas(self) -> torch.Tensor:
        """The candidate fractions, largest first: 1, 1 - 1/grid, ..., 1/grid."""
        return torch.arange(self.grid, 0, -1, dtype=torch.float32) / self.grid

    def errors(self, num_bits, signed=False, symmetric=False):
        """``(alphas, mse)``: the quantization MSE of every candidate (per channel: (A, C))."""
        a = self.alphas
        if self.axis is None:
            centres = torch.from_numpy((self.edges[:-1] + self.edges[1:]) / 2).to(torch.float32)
            weight = torch.from_numpy(self.hist).to(torch.float32)
            err = _fake_quant_error(centres, weight, a * self.min_val, a * self.max_val,
                                    num_bits, signed, symmetric)
            return a, err / weight.sum()
        x = self.tensor
        lo, hi = a[:, None] * self.min_val[None], a[:, None] * self.max_val[None]
        err = _fake_quant_error(x, torch.ones(()), lo, hi, num_bits, signed, symmetric)
        return a, err / x.shape[1]

    def calculate_range(self, num_bits, signed=False, symmetric=False):
        a, err = self.errors(num_bits, signed, symmetric)
        best = a[err.argmin(0)]  # argmin returns the first minimum: the largest alpha
        return best * self.min_val, best * self.max_val

    def __repr__(self):
        return f"MSEObserver(axis={self.axis}, grid={self.grid})"


def kl_divergence_threshold(hist: np.ndarray, num_levels: int, start_bin: int = 128,
                            stride: int = 1) -> int:
    """TensorRT's entropy calibration: the number of bins ``i`` of a ``|x|`` histogram to keep.

    For each ``i`` from ``start_bin`` (at least 1) to ``len(hist)`` in steps of ``stride``:
    ``P`` = the first ``i`` bins with every outlier count added to bin ``i-1``; ``Q`` = the first
    ``i`` bins merged into ``num_levels`` equal groups (bin ``j`` in group ``floor(j L / i)``),
    each group's count spread evenly over its non-empty bins (empty bins stay 0). Return the
    ``i`` with the smallest ``KL(P || Q) = sum P log(P / Q)`` (the largest ``i`` among ties).
    As NVIDIA's pytorch-quantization (``_compute_amax_entropy``: 2048 bins, ``start_bin=128``,
    ``stride=1``), the zero bin first takes the count of bin 1 (after a ReLU the exact zeros
    would dominate every distribution).
    """
    h = np.asarray(hist, dtype=np.float64).copy()
    num_levels = check_int(num_levels, "num_levels", 1)
    start_bin = check_int(start_bin, "start_bin", 1)
    stride = check_int(stride, "stride", 1)
    if len(h) > 1:
        h[0] = h[1]
    best_i, best_kl = len(h), math.inf
    suffix = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    for i in range(len(h), min(start_bin, len(h)) - 1, -stride):
        p = h[:i].copy()
        p[-1] += suffix[i]
        group = np.minimum((np.arange(i) * num_levels) // i, num_levels - 1)
        nonzero = h[:i] > 0
        sums = np.bincount(group, weights=h[:i], minlength=num_levels)
        counts = np.bincount(group, weights=nonzero, minlength=num_levels)
        q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = math.inf if np.any(q[mask] == 0) else float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:  # from the top down: the largest i among ties
            best_i, best_kl = i, kl
    return best_i


class EntropyObserver(_HistogramBase):
    """TensorRT's KL-divergence calibration: the threshold ``t`` whose clipped, ``2**b``-level
    (one-sided data) or ``2**(b-1)``-level (signed data) requantized histogram of ``|x|`` has the
    smallest KL divergence from the clipped original (:func:`kl_divergence_threshold`, bins 128
    to 2048 of ``|x|``); the range is ``[max(min, -t), min(max, t)]``. ``bins=4096`` over
    ``[-T, T]`` gives NVIDIA's 2048 bins over ``[0, max |x|]`` for one batch. ONNX Runtime's
    ``EntropyCalibrater`` differs (its histogram is signed and keeps the zero spike, its Q is
    integer-truncated and smoothed): see the tests. The criterion compares shapes, not errors:
    with many levels it can clip far into the tail (notebook ``da_calibration``)."""

    name = "entropy"

    def __init__(self, bins: int = 4096, start_bin: int = 128):
        super().__init__(bins)
        self.start_bin = check_int(start_bin, "start_bin", 1)

    def calculate_range(self, num_bits, signed=False, symmetric=False):
        h, edges = self.abs_histogram()
        one_sided = bool(self.min_val >= 0) or bool(self.max_val <= 0)
        levels = 2 ** num_bits if one_sided else 2 ** (num_bits - 1)
        return self.clip(edges[kl_divergence_threshold(h, levels, self.start_bin)])


def l2_param_search(hist: torch.Tensor, min_val: float, max_val: float, dst_nbins: int):
    """PyTorch ``HistogramObserver._non_linear_param_search`` on a histogram over
    ``[min_val, max_val]``: shrink the kept bins ``[start, end]`` from whichever side removes
    more of the distribution (steps of 1e-5 of the mass) while the L2 error of quantizing to
    ``dst_nbins`` levels (values uniform inside each bin) keeps decreasing.

    Returns ``(new_min, new_max)`` floats.
    """
    hist = hist.to(torch.float32)
    bins = hist.numel()
    bin_width = (max_val - min_val) / bins
    total = float(hist.sum())
    csum = torch.cumsum(hist, 0).tolist()
    src = torch.arange(bins, dtype=torch.float32)
    density = hist / bin_width if bin_width > 0 else hist

    def norm(b, e, d):
        return d * (e * e * e - b * b * b) / 3

    def error(s, e):
        dst_w = bin_width * (e - s + 1) / dst_nbins
        if dst_w == 0.0:
            return 0.0
        begin = (src - s) * bin_width
        end = begin + bin_width
        db = torch.clamp(torch.div(begin, dst_w, rounding_mode="floor"), 0, dst_nbins - 1)
        de = torch.clamp(torch.div(end, dst_w, rounding_mode="floor"), 0, dst_nbins - 1)
        n = norm(begin - (db + 0.5) * dst_w, torch.full_like(begin, dst_w / 2), density)
        n = n + (de - db - 1) * norm(torch.tensor(-dst_w / 2), torch.tensor(dst_w / 2), density)
        n = n + norm(torch.tensor(-dst_w / 2), end - (de * dst_w + dst_w / 2), density)
        return n.sum().item()

    alpha, beta, start, end, best = 0.0, 1.0, 0, bins - 1, math.inf
    while alpha < beta:
        na, nb = alpha + 1e-5, beta - 1e-5
        l, r = start, end
        while l < end and csum[l] < na * total:
            l += 1
        while r > start and csum[r] > nb * total:
            r -= 1
        ns, ne = start, end
        if (l - start) > (end - r):
            ns, alpha = l, na
        else:
            ne, beta = r, nb
        if ns == start and ne == end:
            continue
        e = error(ns, ne)
        if e > best:
            break
        best, start, end = e, ns, ne
    return min_val + bin_width * start, min_val + bin_width * (end + 1)


class HistogramObserver(_HistogramBase):
    """PyTorch's ``HistogramObserver`` search (:func:`l2_param_search`, ``2**b`` levels) run on
    the non-empty part of our histogram; the result is kept inside the observed [min, max].
    PyTorch's own histogram spans exactly [min, max] with 2048 bins (ours the bins of [-T, T]
    between the first and last non-empty one), so the two differ by about a bin: see the tests."""

    name = "histogram"

    def calculate_range(self, num_bits, signed=False, symmetric=False):
        nz = np.nonzero(self.hist)[0]
        first, last = int(nz[0]), int(nz[-1]) + 1
        lo, hi = l2_param_search(torch.from_numpy(self.hist[first:last].astype(np.float32)),
                                 float(self.edges[first]), float(self.edges[last]), 2 ** num_bits)
        lo = torch.maximum(self.min_val, torch.tensor(lo, dtype=torch.float32))
        hi = torch.minimum(self.max_val, torch.tensor(hi, dtype=torch.float32))
        return lo, hi


OBSERVERS = {cls.name: cls for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver,
                                       MSEObserver, EntropyObserver, HistogramObserver)}
#: what ``quantize_model(..., weight_observer=...)`` accepts (per-channel weights: min/max or MSE)
WEIGHT_OBSERVERS = ("minmax", "mse")


def make_observer(observer=None, axis: int | None = None,
                  averaging_constant: float | None = None, name: str = "observer",
                  allowed=None) -> Observer:
    """An Observer from a name, an instance or None (min/max, or the moving average when
    ``averaging_constant`` is given).

    An instance is copied and the copy starts empty (``reset()``): one instance given to several
    QParams must not carry one tensor's range into another's, nor what it observed before.

    A name outside ``allowed`` (default: every key of ``OBSERVERS``) raises ValueError naming
    ``name`` (the caller's argument) and the accepted values; anything else that is not an
    ``Observer`` raises TypeError.
    """
    allowed = sorted(OBSERVERS) if allowed is None else list(allowed)
    if observer is None:
        if averaging_constant is None:
            return MinMaxObserver(axis)
        return MovingAverageObserver(averaging_constant, axis)
    if isinstance(observer, Observer):
        if observer.axis != axis:
            raise ValueError(f"{name}={observer!r} has axis={observer.axis}, but this QParam "
                             f"needs axis={axis}")
        fresh = copy.deepcopy(observer)
        fresh.reset()
        return fresh
    if not isinstance(observer, str):
        raise TypeError(f"{name} must be None, one of {allowed} or an Observer; got "
                        f"{type(observer).__name__}")
    if observer not in allowed:
        raise ValueError(f"{name} must be None or one of {allowed}; got {observer!r}")
    cls = OBSERVERS[observer]
    if axis is not None and not cls.per_channel_ok:
        ok = sorted(k for k, c in OBSERVERS.items() if c.per_channel_ok and k in allowed)
        raise ValueError(f"{name}={observer!r} is per tensor only; per channel (axis={axis}) "
                         f"{name} must be one of {ok}")
    if cls is MovingAverageObserver:
        return cls(0.01 if averaging_constant is None else averaging_constant, axis)
    if cls in (MinMaxObserver, MSEObserver):
        return cls(axis=axis)
    return cls()


def check_observer(observer, name: str = "observer", allowed=None):
    """Validate an observer argument early (None, an allowed name or an Observer) and return it."""
    if observer is None or isinstance(observer, Observer):
        return observer
    allowed = sorted(OBSERVERS) if allowed is None else list(allowed)
    if not isinstance(observer, str):
        raise TypeError(f"{name} must be None, one of {allowed} or an Observer; got "
                        f"{type(observer).__name__}")
    if observer not in allowed:
        raise ValueError(f"{name} must be None or one of {allowed}; got {observer!r}")
    return observer
