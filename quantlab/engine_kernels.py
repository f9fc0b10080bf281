"""The NumPy integer kernels of :mod:`quantlab.engine` (no torch): gemmlowp's fixed-point
multiply, the requantization multiplier, windows and max-pooling, and the QLinearConv kernel
(``_Conv``: an im2col matrix product whose sums are exact, then requantization). The engine's
module docstring gives the formulas. Taught in notebook ``g_deploy``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

FLOAT32_EXACT, FLOAT64_EXACT = 2**24, 2**53
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# -- fixed point (gemmlowp / TFLite), NumPy int64 -----------------------------------------------

def quantize_multiplier(multiplier: float) -> tuple[int, int]:
    """``M ~= M0 * 2**(-31 - shift)``, M0 in [2**30, 2**31) (as quantlab.fixed_point)."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) \
            or not math.isfinite(multiplier) or multiplier < 0:
        raise ValueError(f"multiplier must be a finite real number >= 0; got {multiplier!r}")
    if multiplier == 0:
        return 0, 0
    q, exponent = math.frexp(float(multiplier))
    q_fixed = int(math.floor(q * 2**31 + 0.5))
    if q_fixed == 2**31:
        q_fixed //= 2
        exponent += 1
    if exponent < -31:
        return 0, 0
    return q_fixed, -exponent


def multiply_by_quantized_multiplier(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray):
    """TFLite's ``MultiplyByQuantizedMultiplier`` on int64 arrays holding int32 values
    (M0 > 0, so the INT32_MIN * INT32_MIN saturation case cannot occur)."""
    left, right = np.maximum(-shift, 0), np.maximum(shift, 0)
    a = np.clip(acc << left, INT32_MIN, INT32_MAX)
    ab = a * m0                                          # |ab| < 2**62: exact in int64
    x = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))   # the rounding nudge
    high = np.where(x >= 0, x >> 31, -((-x) >> 31))       # / 2**31, truncating toward zero
    mask = (np.int64(1) << right) - 1                    # rounding_divide_by_pot(high, right)
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


def requantization_multiplier(s_x, s_w, s_y, multiplier: str) -> np.ndarray:
    """float32 ``M`` per output channel, by qnnpack's or ONNX Runtime's formula."""
    s_x, s_w, s_y = (np.asarray(v, dtype=np.float32) for v in (s_x, s_w, s_y))
    if multiplier == "qnnpack":
        return (s_w * s_x) * (np.float32(1.0) / s_y)
    return (s_x * s_w) / s_y


def _range(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _nchw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def _nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _windows(x: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """(N, H, W, C) -> (N, OH, OW, C, kh, kw) view of the sliding windows."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(1, 2))
    return win[:, ::sh, ::sw, :, ::dh, ::dw]


def _max_pool(x: np.ndarray, kernel, strides, pads, fill) -> np.ndarray:
    """MaxPool of an (N, H, W, C) array; padding counts as ``fill`` (the dtype's minimum)."""
    if any(pads):
        x = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)),
                   constant_values=fill)
    (kh, kw), (sh, sw) = kernel, strides
    n, h, w, c = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    if (kh, kw) == (sh, sw):  # non-overlapping windows: a reshape, no copy
        x = x[:, :oh * kh, :ow * kw]
        return x.reshape(n, oh, kh, ow, kw, c).max(axis=(2, 4))
    return _windows(x, kernel, strides, (1, 1)).max(axis=(4, 5))


class _Conv:
    """A QLinearConv node prepared once: integer weights minus Z_w, multipliers, bounds."""

    def __init__(self, node, consts, multiplier, requantization):
        a = node.attrs
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"{node.name}: auto_pad is not supported; use explicit pads")
        ins = [consts.get(n) if n else None for n in node.input]
        if any(v is None for v in ins[1:8]):
            raise ValueError(f"{node.name}: QLinearConv's qparams and weights must be initializers")
        _, s_x, z_x, w, s_w, z_w, s_y, z_y = ins[:8]
        bias = ins[8] if len(ins) > 8 and ins[8] is not None else np.zeros(w.shape[0], np.int32)
        self.group = int(a.get("group", 1))
        self.kernel = tuple(a.get("kernel_shape", w.shape[2:]))
        self.strides = tuple(a.get("strides", (1, 1)))
        self.dilations = tuple(a.get("dilations", (1, 1)))
        self.pads = tuple(a.get("pads", (0, 0, 0, 0)))
        self.z_x, self.z_y, self.out_dtype = int(z_x), int(z_y), z_y.dtype
        self.x_range = _range(z_x.dtype)
        c_out, self.c_in_g = w.shape[0], w.shape[1]
        wi = w.astype(np.int64) - z_w.astype(np.int64).reshape(-1, 1, 1, 1)
        x_max = max(abs(self.x_range[0] - self.z_x), abs(self.x_range[1] - self.z_x))
        # |acc| <= bound for every input in the uint8/int8 range (the accumulator bound)
        self.bound = int(np.abs(wi).reshape(c_out, -1).sum(1).max()) * x_max
        if self.bound >= FLOAT64_EXACT:
            raise ValueError(f"{node.name}: accumulator bound {self.bound} >= 2**53")
        self.dtype = np.float32 if self.bound < FLOAT32_EXACT else np.float64
        self.bias = bias.astype(np.int64)
        self.bias_in_acc = self.bound + int(np.abs(self.bias).max()) < FLOAT32_EXACT
        g, k = self.group, wi[0].size
        # (G, K, C_out/G): one matrix per group, K = C_in/G * kh * kw in the window order
        self.w = np.ascontiguousarray(wi.reshape(g, c_out // g, k).transpose(0, 2, 1)
                                      ).astype(self.dtype)
        m = requantization_multiplier(s_x, s_w, s_y, multiplier)
        self.m = np.broadcast_to(m, (c_out,)).astype(np.float32)
        self.fixed_point = requantization == "fixed_point"
        if self.fixed_point:
            pairs = [quantize_multiplier(float(v)) for v in self.m]
            self.m0 = np.array([p[0] for p in pairs], np.int64)
            self.shift = np.array([p[1] for p in pairs], np.int64)

    def accumulate(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W, C_in) integers -> (N, OH, OW, C_out) exact ``sum (q_x - Z_x)(q_w - Z_w)``
        (+ q_b when that stays exact in float32), held in float32 or float64."""
        xi = x.astype(self.dtype)
        xi -= self.z_x
        p = self.pads
        if any(p):  # padding is real 0, i.e. q_x = Z_x: 0 after subtracting Z_x
            xi = np.pad(xi, ((0, 0), (p[0], p[2]), (p[1], p[3]), (0, 0)))
        win = _windows(xi, self.kernel, self.strides, self.dilations)
        n, oh, ow = win.shape[:3]
        g, k, c_g = self.w.shape
        if g == 1:
            acc = win.reshape(n * oh * ow, k) @ self.w[0]
        else:
            cols = win.reshape(n * oh * ow, g, k).transpose(1, 0, 2)        # (G, M, K)
            acc = np.matmul(cols, self.w).transpose(1, 0, 2)                 # (M, G, C_out/G)
        acc = acc.reshape(n, oh, ow, g * c_g)
        if self.bias_in_acc:
            acc += self.bias.astype(self.dtype)
        return acc

    def requantize(self, acc: np.ndarray) -> np.ndarray:
        """Exact accumulators -> output integers: + q_b, * M (or M0, shift), rne, + Z_y, clamp."""
        if not self.bias_in_acc:
            acc = acc.astype(np.float64) + self.bias
        if self.fixed_point:
            a = np.clip(acc.astype(np.int64), INT32_MIN, INT32_MAX)
            y = multiply_by_quantized_multiplier(a, self.m0, self.shift).astype(np.float32)
        else:
            y = np.rint(acc.astype(np.float32, copy=False) * self.m)
        y += self.z_y
        lo, hi = _range(self.out_dtype)
        return np.clip(y, lo, hi).astype(self.out_dtype)
