"""Exercises of lesson a (a_basic_quant): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="a_basic_quant",
    title="a · Exercises: ranges, scale, zero point, quantize (练习: 基础量化)",
    goal="Write the functions of lesson a yourself: the integer range, the range of a tensor, affine and "
         "symmetric scale and zero point, quantize, dequantize, and per-channel quantization. "
         "Lessons d and e build on them: `e_exercises.ipynb` imports your functions from this notebook.",
    setup='''\
# setup: torch, and the checker (check.run checks the functions defined so far in this notebook)
import math

import torch

from quantlab import check

EPS = torch.finfo(torch.float32).eps  # the smallest scale we ever return (as PyTorch's observers)''',
    exercises=[
        ex(1, "quant_range", "the integer range",
           r"""
           With $n_{bits}$ = `num_bits` bits an unsigned integer covers $[0,\ 2^{n_{bits}}-1]$ and a signed one
           $[-2^{n_{bits}-1},\ 2^{n_{bits}-1}-1]$. Return `(quant_min, quant_max)` as Python ints.""",
           '''
           def quant_range(num_bits=8, signed=False):
               """(quant_min, quant_max) of a num_bits integer, as Python ints."""''',
           '''
           if signed:
               return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
           return 0, 2**num_bits - 1'''),
        ex(2, "calc_min_max", "the range of a tensor, per tensor and per channel",
           r"""
           Per tensor: $(\min x, \max x)$ as float32 tensors of shape `()`. Per channel along `axis`: one
           $(\min, \max)$ per index $c$ of that axis, over all other axes, as tensors of shape `(x.shape[axis],)`.
           A negative `axis` counts from the end, as in PyTorch.""",
           '''
           def calc_min_max(x, axis=None):
               """(min_val, max_val) of x: shape () per tensor, (x.shape[axis],) per channel."""''',
           '''
           if axis is None:
               return x.min(), x.max()
           flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)   # channel first, the rest flattened
           return flat.min(dim=1).values, flat.max(dim=1).values'''),
        ex(3, "calc_scale_zero_point", "affine scale and zero point",
           r"""
           1. Widen the range to include 0: $r_{min} \leftarrow \min(r_{min}, 0)$, $r_{max} \leftarrow \max(r_{max}, 0)$
              (real 0, i.e. zero padding and ReLU's output, must be exactly representable).
           2. $S = \dfrac{r_{max} - r_{min}}{q_{max} - q_{min}}$, floored at `EPS` (so $\min = \max$ gives no 0/0).
           3. $Z = q_{min} - \mathrm{round}(r_{min} / S)$, rounded half to even (`torch.round`), clamped to
              $[q_{min}, q_{max}]$, as int32.

           `min_val`, `max_val` are float32 tensors of shape `()` or `(C,)` (per channel): compute element-wise
           with float32 tensor operations, as PyTorch does.""",
           '''
           def calc_scale_zero_point(min_val, max_val, num_bits=8, signed=False):
               """Affine (scale, zero_point): float32 and int32 tensors of min_val's shape."""''',
           '''
           quant_min, quant_max = quant_range(num_bits, signed)
           min_neg = torch.clamp(min_val, max=0.0)   # the range always includes 0
           max_pos = torch.clamp(max_val, min=0.0)
           scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=EPS)
           zero_point = quant_min - torch.round(min_neg / scale)
           zero_point = torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)
           return scale, zero_point'''),
        ex(4, "calc_scale_zero_point_symmetric", "symmetric scale and zero point",
           r"""
           The range $[-\max(|r_{min}|, |r_{max}|),\ \max(|r_{min}|, |r_{max}|)]$ is symmetric around 0, so it always
           contains 0 (no widening step as in a3 is needed):
           $S = \dfrac{\max(|r_{min}|, |r_{max}|)}{(q_{max} - q_{min})/2}$, floored at `EPS`, and $Z = 0$ when `signed`,
           the middle $2^{n_{bits}-1}$ when unsigned (128 for 8 bits, as PyTorch's default `quint8` range; for other
           widths PyTorch's observers take $\lfloor(q_{min} + q_{max})/2\rfloor$, one less: quantlab keeps $2^{n_{bits}-1}$ at
           every width, and so must you). The zero point is an int32 tensor of the scale's shape.

           Note where the largest $|x|$ lands: at $\pm(q_{max} - q_{min})/2 = \pm127.5$ for 8 signed bits in exact
           arithmetic, a tie. In float32 ($S$ = `amax / 127.5` rounded, then $x \cdot f32(1/S)$ rounded) the product lands
           on 127.5 or one float32 step either side, depending on `amax`, so `quantize` (a5) gives 127 or 128 there (and
           $+128$ is clamped to $127$): either way the largest weight is off by about half a step.""",
           '''
           def calc_scale_zero_point_symmetric(min_val, max_val, num_bits=8, signed=True):
               """Symmetric (scale, zero_point): float32 and int32 tensors of min_val's shape."""''',
           '''
           quant_min, quant_max = quant_range(num_bits, signed)
           amax = torch.maximum(-torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0))
           scale = torch.clamp(amax / ((quant_max - quant_min) / 2), min=EPS)
           middle = 0 if signed else 2 ** (num_bits - 1)
           return scale, torch.full_like(scale, middle, dtype=torch.int32)'''),
        ex(5, "quantize", "quantize",
           r"""
           $$ q = \mathrm{clamp}\big(\mathrm{round}(x \cdot \tfrac{1}{S}) + Z,\ q_{min},\ q_{max}\big) $$
           rounded half to even. Like PyTorch, multiply by the float32 reciprocal $1/S$ instead of dividing by $S$:
           the two differ in the last bit of rare products, which moves a .5 tie to the other integer.
           `scale` and `zero_point` are tensors that broadcast against `x`: shape `()` per tensor (what the checks of a5
           use), or one per channel reshaped as in a7. Return an int32 tensor.""",
           '''
           def quantize(x, scale, zero_point, num_bits=8, signed=False):
               """Integers of x (int32); scale and zero_point broadcast against x (per tensor: shape ())."""''',
           '''
           quant_min, quant_max = quant_range(num_bits, signed)
           q = torch.round(x * (1.0 / scale)) + zero_point   # the float32 reciprocal, as PyTorch
           return torch.clamp(q, quant_min, quant_max).to(torch.int32)'''),
        ex(6, "dequantize", "dequantize",
           r"""
           $$ \hat x = S\,(q - Z) $$
           in float32. `q` may be any integer dtype, including `uint8`: there $q - Z$ would wrap around, so convert
           `q` to int32 first.""",
           '''
           def dequantize(q, scale, zero_point):
               """Reals (float32) of the integers q."""''',
           '''
           return (q.to(torch.int32) - zero_point).to(torch.float32) * scale'''),
        ex(7, "quantize_per_channel", "per-channel quantization",
           r"""
           One $(S_c, Z_c)$ per index $c$ of `axis`: $q = \mathrm{clamp}(\mathrm{round}(x \cdot \tfrac{1}{S_c}) + Z_c)$.
           `scale` and `zero_point` have shape `(x.shape[axis],)`; reshape them so they broadcast along `axis`
           (e.g. `(1, C, 1)` for `axis=1` of a 3-d tensor), then reuse your `quantize` (a5), whose element-wise
           operations broadcast the reshaped scale and zero point against `x`.""",
           '''
           def quantize_per_channel(x, scale, zero_point, axis, num_bits=8, signed=False):
               """Integers of x (int32) with one scale and zero point per index of `axis`."""''',
           '''
           shape = [1] * x.dim()
           shape[axis] = -1
           return quantize(x, scale.reshape(shape), zero_point.reshape(shape), num_bits, signed)'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('calc_scale_zero_point', 'quant_min - torch.round(min_neg / scale)',
            'quant_min - (min_neg / scale).int()',
            'int() truncates', 'Z truncated by int()'),
    Mistake('calc_scale_zero_point', 'min_neg = torch.clamp(min_val, max=0.0)',
            'min_neg = min_val',
            'widen it to include 0', 'range not widened to 0'),
    Mistake('quantize', 'return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            'return q.to(torch.int32)',
            'clamp to [quant_min, quant_max]', 'no clamp'),
    Mistake('quantize', 'torch.round(x * (1.0 / scale))',
            'torch.round(x / scale)',
            'dividing by the scale', 'divides by S'),
    Mistake('calc_scale_zero_point_symmetric', '/ 2), min=EPS)',
            '/ 2), min=0.0)',
            'floor the scale at EPS', 'no EPS floor'),
    Mistake('dequantize', '(q.to(torch.int32) - zero_point)',
            '(q - zero_point)',
            'wraps around in uint8', 'uint8 wraps'),
    Mistake('quant_range', 'return 0, 2**num_bits - 1',
            'return 0.0, 2.0**num_bits - 1',
            'two Python ints', 'floats'),
    Mistake('quantize', 'q = torch.round(x * (1.0 / scale)) + zero_point',
            'q = torch.round(x * (1.0 / scale) + zero_point)',
            'then add the zero point', 'Z added before rounding'),
    Mistake('quantize_per_channel', 'return quantize(x, scale.reshape(shape), zero_point.reshape(shape), num_bits, signed)',
            'lo, hi = quant_range(num_bits, signed)\n    return torch.clamp(torch.round(x / scale.reshape(shape)) + zero_point.reshape(shape), lo, hi).to(torch.int32)',
            'dividing by the scale', 'per channel: divides by S'),
    Mistake('quantize', 'return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            'return torch.clamp(q, quant_min, quant_max).to(torch.int64)',
            'the statement asks for int32', 'int64, not int32'),
    Mistake('dequantize', '(q.to(torch.int32) - zero_point).to(torch.float32) * scale',
            '(q.to(torch.int32) - zero_point).double() * scale.double()',
            'the statement asks for float32', 'float64 values'),
]
