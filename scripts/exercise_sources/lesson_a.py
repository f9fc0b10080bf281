"""Exercises of lesson a (a_basic_quant): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="a_basic_quant",
    title="a · Exercises: ranges, scale, zero point, quantize (练习: 基础量化)",
    goal="Write the functions of lesson a yourself: the integer range, the range of a tensor, affine and "
         "symmetric scale and zero point, quantize, dequantize, and per-channel quantization. "
         "Lessons d and e build on them: `e_exercises.ipynb` imports your functions from this notebook.",
    oracle=("quantlab's own functions (`quant_range`, `calc_min_max`, `calc_scale_zero_point`, "
            '`quantize`, `dequantize`)'),
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
           3. $Z = q_{min} - \mathrm{round}(r_{min} / S)$, rounded half to even (`torch.round`), as int32. PyTorch
              also clamps it to $[q_{min}, q_{max}]$, a guard: with 0 in the range, $Z$ lies there already (lesson a,
              1.4.2), so the clamp never changes it.

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
           rounded half to even. Like PyTorch, multiply by the float32 reciprocal $1/S$ instead of dividing by $S$, and
           compute in float32 (not float64): the three differ in the last bit of rare products, which moves a .5 tie to the
           other integer.
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

#: (exercise, text in its solution, the mistake, words its hint must contain, what)
MISTAKES: list[Mistake] = [
    # a1 quant_range
    Mistake('quant_range', 'return 0, 2**num_bits - 1',
            'return 0.0, 2.0**num_bits - 1',
            'two Python ints', 'floats'),
    Mistake('quant_range', 'return 0, 2**num_bits - 1',
            'return 0, 2**num_bits',
            'off by one', 'unsigned max 2**b'),
    Mistake('quant_range', 'return -(2 ** (num_bits - 1)), ',
            'return -(2 ** (num_bits - 1)) + 1, ',
            'one more negative number', 'signed min -(2**(b-1) - 1)'),
    Mistake('quant_range', 'return 0, 2**num_bits - 1',
            'return 0, 255',
            'do not hard-code 8 bits', 'hard-coded 255'),
    Mistake('quant_range', 'if signed:',
            'if not signed:',
            'signed and unsigned swapped', 'signed/unsigned swapped'),
    # a2 calc_min_max
    Mistake('calc_min_max', 'return x.min(), x.max()',
            'return x.min().item(), x.max().item()',
            'not a Python float', 'Python floats'),
    Mistake('calc_min_max', 'return x.min(), x.max()',
            'return x.max(), x.min()',
            'min and max swapped', 'min and max swapped'),
    Mistake('calc_min_max', 'flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)   # channel first, the rest flattened\n'
            '    return flat.min(dim=1).values, flat.max(dim=1).values',
            'return x.amin(dim=axis), x.amax(dim=axis)',
            'reduces over `axis` itself', 'reduces over axis'),
    Mistake('calc_min_max', 'x.movedim(axis, 0).reshape(',
            'x.reshape(',
            'move `axis` to the front', 'reshape without movedim'),
    Mistake('calc_min_max', 'flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)   # channel first, the rest flattened\n'
            '    return flat.min(dim=1).values, flat.max(dim=1).values',
            'dims = [d for d in range(x.dim()) if d != axis]\n'
            '    return x.amin(dim=dims), x.amax(dim=dims)',
            'a negative axis counts from the end', 'negative axis'),
    Mistake('calc_min_max', 'flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)   # channel first, the rest flattened\n'
            '    return flat.min(dim=1).values, flat.max(dim=1).values',
            'dims = [d for d in range(x.dim()) if d != axis % x.dim()]\n'
            '    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)',
            'keepdim=False', 'keepdim'),
    # a3 calc_scale_zero_point
    Mistake('calc_scale_zero_point', '/ (quant_max - quant_min), min=EPS)',
            '/ (quant_max - quant_min + 1), min=EPS)',
            'not by 2**8 = 256', 'S over 2**b levels'),
    Mistake('calc_scale_zero_point', 'zero_point = quant_min - torch.round(min_neg / scale)',
            'zero_point = quant_min + torch.round(min_neg / scale)',
            'Z = q_min - round(r_min / S): subtract', 'Z sign'),
    Mistake('calc_scale_zero_point', 'quant_min - torch.round(min_neg / scale)',
            'quant_min - (min_neg / scale).int()',
            'truncate toward zero', 'Z truncated by int()'),
    Mistake('calc_scale_zero_point', 'quant_min - torch.round(min_neg / scale)',
            'quant_min - torch.floor(min_neg / scale + 0.5)',
            'floor(x + 0.5)', 'ties up'),
    Mistake('calc_scale_zero_point', 'quant_min - torch.round(min_neg / scale)',
            'quant_min - torch.sign(min_neg) * torch.floor((min_neg / scale).abs() + 0.5)',
            'half away from zero', 'ties away from zero'),
    Mistake('calc_scale_zero_point', 'quant_min, quant_max = quant_range(num_bits, signed)\n'
            '    min_neg = torch.clamp(min_val, max=0.0)',
            'quant_min, quant_max = 0, 255\n'
            '    min_neg = torch.clamp(min_val, max=0.0)',
            'do not hard-code 8 bits', 'hard-coded [0, 255]'),
    Mistake('calc_scale_zero_point', 'zero_point = quant_min - torch.round(min_neg / scale)',
            'zero_point = -torch.round(min_neg / scale)',
            'without q_min', 'Z without q_min'),
    Mistake('calc_scale_zero_point', 'min_neg = torch.clamp(min_val, max=0.0)',
            'min_neg = min_val',
            'widen r_min to 0', 'r_min not widened'),
    Mistake('calc_scale_zero_point', 'max_pos = torch.clamp(max_val, min=0.0)',
            'max_pos = max_val',
            'widen r_max to 0', 'r_max not widened'),
    Mistake('calc_scale_zero_point', '/ (quant_max - quant_min), min=EPS)',
            '/ (quant_max - quant_min), min=0.0)',
            'floor the scale at EPS', 'no EPS floor'),
    Mistake('calc_scale_zero_point', 'torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)',
            'torch.clamp(zero_point, quant_min, quant_max)',
            'integers belong in an integer tensor', 'float Z'),
    Mistake('calc_scale_zero_point', 'torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)',
            'torch.clamp(zero_point, quant_min, quant_max).to(torch.int64)',
            'the statement asks for int32', 'int64 Z'),
    Mistake('calc_scale_zero_point', 'scale = torch.clamp((max_pos - min_neg) / ',
            'scale = torch.clamp((max_pos.double() - min_neg.double()) / ',
            'the statement asks for float32', 'float64 S'),
    # a4 calc_scale_zero_point_symmetric
    Mistake('calc_scale_zero_point_symmetric', '/ 2), min=EPS)',
            '/ 2), min=0.0)',
            'floor the scale at EPS', 'no EPS floor'),
    Mistake('calc_scale_zero_point_symmetric', 'amax / ((quant_max - quant_min) / 2)',
            'amax / quant_max',
            'not by q_max = 127', 'S = amax / q_max'),
    Mistake('calc_scale_zero_point_symmetric', 'scale = torch.clamp(amax / ((quant_max - quant_min) / 2), min=EPS)',
            'scale = torch.clamp((max_val - min_val) / (quant_max - quant_min), min=EPS)',
            'not (r_max - r_min) / 255', 'affine range'),
    Mistake('calc_scale_zero_point_symmetric',
            'amax = torch.maximum(-torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0))',
            'amax = torch.clamp(max_val, min=0.0)',
            '|r_min| = 1 is the larger', 'amax = r_max'),
    Mistake('calc_scale_zero_point_symmetric', 'amax / ((quant_max - quant_min) / 2)',
            'amax / 127.5',
            'do not hard-code 127.5', 'hard-coded 127.5'),
    Mistake('calc_scale_zero_point_symmetric', 'middle = 0 if signed else 2 ** (num_bits - 1)',
            'middle = 0',
            'not 0 (0 is the signed zero point)', 'unsigned Z = 0'),
    Mistake('calc_scale_zero_point_symmetric', 'middle = 0 if signed else 2 ** (num_bits - 1)',
            'middle = 0 if signed else (quant_min + quant_max) // 2',
            '(q_min + q_max) // 2', "PyTorch's floor midpoint"),
    Mistake('calc_scale_zero_point_symmetric', 'torch.full_like(scale, middle, dtype=torch.int32)',
            'torch.full_like(scale, middle)',
            'integers belong in an integer tensor', 'float Z'),
    Mistake('calc_scale_zero_point_symmetric', 'torch.full_like(scale, middle, dtype=torch.int32)',
            'torch.full_like(scale, middle, dtype=torch.int64)',
            'the statement asks for int32', 'int64 Z'),
    Mistake('calc_scale_zero_point_symmetric', 'scale = torch.clamp(amax / ',
            'scale = torch.clamp(amax.double() / ',
            'the statement asks for float32', 'float64 S'),
    # a5 quantize
    Mistake('quantize', 'q = torch.round(x * (1.0 / scale)) + zero_point',
            'q = (x * (1.0 / scale)).to(torch.int32) + zero_point',
            'truncate toward zero', 'truncated'),
    Mistake('quantize', 'q = torch.round(x * (1.0 / scale)) + zero_point',
            'q = torch.round(x * (1.0 / scale)) - zero_point',
            'add the zero point: q = round(x * (1 / S)) + Z', 'Z subtracted'),
    Mistake('quantize', 'torch.round(x * (1.0 / scale))',
            'torch.floor(x * (1.0 / scale) + 0.5)',
            'floor(x + 0.5)', 'ties up'),
    Mistake('quantize', 'torch.round(x * (1.0 / scale))',
            'torch.sign(x) * torch.floor((x * (1.0 / scale)).abs() + 0.5)',
            'rounding half away from zero', 'ties away from zero'),
    Mistake('quantize', 'q = torch.round(x * (1.0 / scale)) + zero_point',
            'q = torch.round(x * (1.0 / scale) + zero_point)',
            'round first, then add the zero point', 'Z added before rounding'),
    Mistake('quantize', ' + zero_point   # the float32 reciprocal, as PyTorch\n'
            '    return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            '   # the float32 reciprocal, as PyTorch\n'
            '    return (torch.clamp(q, quant_min, quant_max) + zero_point).to(torch.int32)',
            'add the zero point, then clamp', 'clamped before adding Z'),
    Mistake('quantize', 'return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            'return q.to(torch.int32)',
            'clamp to [quant_min, quant_max]', 'no clamp'),
    Mistake('quantize', 'return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            'return torch.clamp(q, 0, 255).to(torch.int32)',
            'do not hard-code 8 bits', 'hard-coded [0, 255]'),
    Mistake('quantize', 'torch.round(x * (1.0 / scale))',
            'torch.round(x.double() * (1.0 / scale.double()))',
            'in float64 rounds', 'float64 product'),
    Mistake('quantize', 'torch.round(x * (1.0 / scale))',
            'torch.round(x / scale)',
            'dividing by the scale', 'divides by S'),
    Mistake('quantize', 'return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            'return torch.clamp(q, quant_min, quant_max).to(torch.int64)',
            'the statement asks for int32', 'int64, not int32'),
    Mistake('quantize', 'return torch.clamp(q, quant_min, quant_max).to(torch.int32)',
            'return torch.clamp(q, quant_min, quant_max)',
            'integers belong in an integer tensor', 'float result'),
    # a6 dequantize
    Mistake('dequantize', '.to(torch.float32) * scale',
            '.to(torch.float32) / scale',
            'multiply by the scale', 'divides by S'),
    Mistake('dequantize', '(q.to(torch.int32) - zero_point)',
            '(q.to(torch.int32) + zero_point)',
            'subtract the zero point', 'Z added'),
    Mistake('dequantize', '(q.to(torch.int32) - zero_point)',
            '(q - zero_point)',
            'wraps around in uint8', 'uint8 wraps'),
    Mistake('dequantize', '(q.to(torch.int32) - zero_point).to(torch.float32) * scale',
            'q.to(torch.float32) * scale - zero_point * scale',
            'cancellation', 'q*S - Z*S'),
    Mistake('dequantize', '(q.to(torch.int32) - zero_point).to(torch.float32) * scale',
            '(q.to(torch.int32) - zero_point).double() * scale.double()',
            'the statement asks for float32', 'float64 values'),
    # a7 quantize_per_channel
    Mistake('quantize_per_channel', 'return quantize(x, scale.reshape(shape), zero_point.reshape(shape), num_bits, signed)',
            'return quantize(x, scale, zero_point, num_bits, signed)',
            'as they are, they broadcast along the last axis', 'not reshaped'),
    Mistake('quantize_per_channel', 'return quantize(x, scale.reshape(shape), zero_point.reshape(shape), num_bits, signed)',
            'lo, hi = quant_range(num_bits, signed)\n    return torch.clamp(torch.round(x / scale.reshape(shape)) + zero_point.reshape(shape), lo, hi).to(torch.int32)',
            'dividing by the scale', 'per channel: divides by S'),
    Mistake('quantize_per_channel', 'shape[axis] = -1',
            'shape[0] = -1',
            'not always along axis 0', 'always axis 0'),
]
