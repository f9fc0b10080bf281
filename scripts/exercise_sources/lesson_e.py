"""Exercises of lesson e (e_conv_quantization_walkthrough): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="e_conv_quantization_walkthrough",
    title="e · Exercises: the integer convolution and fixed-point requantization (练习: 卷积量化)",
    goal="Compute a quantized convolution with integers only, and requantize it the way TFLite and gemmlowp do: "
         "a Q31 integer multiplier, a rounding doubling high multiply and a rounding right shift. The last "
         "exercise assembles a whole quantized conv from **your own** functions of notebooks a and d, imported "
         "with `import_ipynb` as the original series did; the checker compares it bit for bit with quantlab and "
         "with PyTorch's qnnpack kernel. (After editing a_exercises or d_exercises, save them, then restart "
         "this kernel: the import reads the saved files, once per kernel.)\n\n**Names.** The lesson calls the conv's output $a$; these exercises call it "
         "$y$: $q_y, S_y, Z_y$ here are the lesson's $q_a, S_a, Z_a$, and `shift` is the lesson's right shift $n$. "
         "`acc` in e4 is the lesson's $\\mathrm{acc} + q_b$ (bias included).",
    oracle="quantlab's fixed-point functions and `QConv2d` (itself bit-exact with PyTorch's qnnpack kernel)",
    setup='''\
# setup: torch, your own functions from notebooks a and d (imported with import_ipynb), the checker
import math

import import_ipynb  # lets `import` find notebooks in this folder
import torch
import torch.nn.functional as F

from a_exercises import (calc_min_max, calc_scale_zero_point, calc_scale_zero_point_symmetric,
                         quantize, quantize_per_channel)
from d_exercises import quantize_bias, requantize
from quantlab import check

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1''',
    exercises=[
        ex(1, "quantize_multiplier", "a real multiplier as a Q31 integer and a shift",
           r"""
           As in lesson e, 1.7.1: write $M = f \cdot 2^{e}$ with the mantissa $f \in [0.5, 1)$ (`f, e = math.frexp(M)`), then
           $$ M_0 = \lfloor f \cdot 2^{31} + 0.5 \rfloor \ (\text{half away from zero}), \qquad \text{shift} = -e, \qquad M \approx M_0 \cdot 2^{-31-\text{shift}} $$
           (`shift` is the lesson's $n$; Python's `round` would round a tie half to even, which is not what TFLite does.)
           If rounding gives $M_0 = 2^{31}$, halve it and add 1 to $e$. $M = 0$ gives `(0, 0)`; a multiplier below
           $2^{-32}$ (shift > 31) is flushed to `(0, 0)` as TFLite does. A positive shift is a right shift.""",
           '''
           def quantize_multiplier(multiplier):
               """(M0, shift) as Python ints with multiplier ~= M0 * 2**(-31 - shift)."""''',
           '''
           if multiplier == 0.0:
               return 0, 0
           f, exponent = math.frexp(multiplier)      # multiplier = f * 2**exponent, f in [0.5, 1)
           m0 = math.floor(f * 2**31 + 0.5)          # round half away from zero (f > 0)
           if m0 == 2**31:                           # rounding reached 2**31: renormalise
               m0 //= 2
               exponent += 1
           if exponent < -31:                        # too small to represent: flush to zero
               return 0, 0
           return m0, -exponent'''),
        ex(2, "saturating_rounding_doubling_high_mul", "gemmlowp's rounding doubling high multiply",
           r"""
           $\mathrm{round}(a \cdot b / 2^{31})$ in integers: add the nudge $2^{30}$ (or $1 - 2^{30}$ when $ab < 0$), then divide by
           $2^{31}$ **truncating toward zero** (C++ division; not `//`, which floors). The one product that overflows int32,
           `INT32_MIN * INT32_MIN`, saturates to `INT32_MAX`. `a` is an int64 tensor of int32 values, `b` a Python int
           or tensor; compute in int64 ($|ab| \le 2^{62}$).""",
           '''
           def saturating_rounding_doubling_high_mul(a, b):
               """gemmlowp's SaturatingRoundingDoublingHighMul, element-wise, as int64."""''',
           '''
           a, b = a.to(torch.int64), torch.as_tensor(b, dtype=torch.int64)
           ab = a * b                                            # |ab| <= 2**62: exact in int64
           x = ab + torch.where(ab >= 0, 2**30, 1 - 2**30)       # the rounding nudge
           high = torch.where(x >= 0, x // 2**31, -((-x) // 2**31))   # truncate toward zero
           return torch.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)'''),
        ex(3, "rounding_divide_by_pot", "rounding right shift",
           r"""
           $x / 2^{e}$ rounded to the nearest integer, ties **away from zero** (gemmlowp's `RoundingDivideByPOT`),
           without division: `x >> e` floors, then add 1 when the remainder `x & (2**e - 1)` is above a threshold.
           Which threshold? Work out $3/2 = 1.5 \to 2$ and $-3/2 = -1.5 \to -2$ by hand first (`-3 >> 1` is `-2`).""",
           '''
           def rounding_divide_by_pot(x, exponent):
               """x / 2**exponent rounded half away from zero (x: int64 tensor, exponent: 0..31)."""''',
           '''
           x = x.to(torch.int64)
           mask = (1 << exponent) - 1
           remainder = x & mask
           threshold = (mask >> 1) + (x < 0).to(torch.int64)
           return (x >> exponent) + (remainder > threshold).to(torch.int64)'''),
        ex(4, "requantize_fixed_point", "the whole fixed-point requantization",
           r"""
           Lesson e, 1.7, as one function. `multiplier` is one Python float $M$ for the whole tensor (not per channel),
           `acc` an int64 tensor of int32 values that **already includes the bias** (the lesson's $\mathrm{acc} + q_b$).
           With $(M_0, \text{shift})$ = `quantize_multiplier(M)` (e1), SRDHM = e2's
           `saturating_rounding_doubling_high_mul` (gemmlowp's `SaturatingRoundingDoublingHighMul`) and RDBP = e3's
           `rounding_divide_by_pot` (gemmlowp's `RoundingDivideByPOT`, "rounding divide by power of two"):
           $$ q_y = \mathrm{clamp}\Big(\mathrm{RDBP}\big(\mathrm{SRDHM}(acc \cdot 2^{\max(-\text{shift}, 0)},\ M_0),\ \max(\text{shift}, 0)\big) + Z_y,\ q_{min},\ q_{max}\Big) $$
           A multiplier $M \ge 1$ gives a negative shift: then `acc` is first shifted **left** by $-\text{shift}$ bits and the
           result clamped to $[-2^{31}, 2^{31}-1]$ (saturated to int32), as quantlab does. (TFLite's reference
           `MultiplyByQuantizedMultiplier` shifts in int32 without saturating, so an overflow there is undefined; its callers
           keep $M$ and acc small enough.) For $M < 1$ (every conv in the lesson) there is only the right shift. Return int32.""",
           '''
           def requantize_fixed_point(acc, multiplier, zero_point, quant_min=0, quant_max=255):
               """Output integers (int32) from an int32 accumulator with integer-only arithmetic."""''',
           '''
           m0, shift = quantize_multiplier(multiplier)
           left, right = max(-shift, 0), max(shift, 0)
           acc = torch.clamp(acc.to(torch.int64) << left, INT32_MIN, INT32_MAX)
           y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, m0), right)
           return torch.clamp(y + zero_point, quant_min, quant_max).to(torch.int32)'''),
        ex(5, "conv2d_accumulate", "the integer accumulator with zero points",
           r"""
           $$ acc = \sum_{k=1}^{K} (q_x - Z_x)(q_w - Z_w) $$
           over each output's window of $K = C_{in} \cdot k_h \cdot k_w$ inputs (the lesson's $N$), as an int64 tensor of shape
           `(batch, C_out, H_out, W_out)`. `zero_point_w` is one value or one per output channel. Subtract the zero points in
           int64 (never in uint8). Two conv options the lesson did not need (its conv has stride 1, no padding):
           `stride` is the step between windows, `padding` adds that many rows and columns of real 0 around the input; real 0
           is the integer $Z_x$, so pad $(q_x - Z_x)$ with zeros (`F.conv2d(..., stride=stride, padding=padding)` does both).
           The sums must be exact: float32 holds integers exactly only up to $2^{24}$, so use `F.conv2d` on float64
           (exact below $2^{53}$) or int64 arithmetic.""",
           '''
           def conv2d_accumulate(q_x, zero_point_x, q_w, zero_point_w, stride=1, padding=0):
               """The exact integer accumulator of a conv (int64), zero points subtracted."""''',
           '''
           x = q_x.to(torch.int64) - zero_point_x                       # q_x - Z_x, never in uint8
           zw = torch.as_tensor(zero_point_w).reshape(-1, 1, 1, 1)      # per output channel, or one
           w = q_w.to(torch.int64) - zw
           acc = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)   # exact in float64
           return acc.to(torch.int64)'''),
        ex(6, "quantized_conv2d", "a whole quantized conv from your own functions",
           r"""
           Given a float input `x`, a conv's float `weight` and `bias`, and the output's $(S_y, Z_y)$, compute the output
           integers exactly as PyTorch's qnnpack int8 conv would:
           1. input: per-tensor affine uint8 from its own range (your `calc_min_max`, `calc_scale_zero_point`, `quantize`);
           2. weights: per-channel symmetric int8 (your `calc_min_max(weight, axis=0)`,
              `calc_scale_zero_point_symmetric`, `quantize_per_channel`);
           3. $q_b$ = your `quantize_bias` (shape `(C_out,)`), $acc$ = your `conv2d_accumulate` $+\ q_b$, with $q_b$
              reshaped to `(1, C_out, 1, 1)` so that it broadcasts over the batch, rows and columns of `acc`;
           4. $q_y$ = your `requantize(acc, M, Z_y)` with $M = (S_x S_w) \cdot \tfrac{1}{S_y}$ in float32 (one per channel).""",
           '''
           def quantized_conv2d(x, weight, bias, scale_y, zero_point_y, stride=1, padding=0):
               """Output integers (int32, 0..255) of an int8 conv with per-channel weights."""''',
           '''
           scale_x, zero_point_x = calc_scale_zero_point(*calc_min_max(x), num_bits=8, signed=False)
           q_x = quantize(x, scale_x, zero_point_x, num_bits=8, signed=False)
           min_w, max_w = calc_min_max(weight, axis=0)
           scale_w, zero_point_w = calc_scale_zero_point_symmetric(min_w, max_w, num_bits=8, signed=True)
           q_w = quantize_per_channel(weight, scale_w, zero_point_w, axis=0, num_bits=8, signed=True)
           q_b = quantize_bias(bias, scale_x, scale_w)
           acc = conv2d_accumulate(q_x, zero_point_x, q_w, zero_point_w, stride, padding)
           acc = acc + q_b.reshape(1, -1, 1, 1)
           multiplier = (scale_x * scale_w) * (1.0 / scale_y)
           return requantize(acc, multiplier, zero_point_y)'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain, what)
MISTAKES: list[Mistake] = [
    # e1 quantize_multiplier
    Mistake('quantize_multiplier', 'math.floor(f * 2**31 + 0.5)',
            'int(f * 2**31)',
            'int() truncates', 'M0 truncated'),
    Mistake('quantize_multiplier', 'math.floor(f * 2**31 + 0.5)',
            'round(f * 2**31)',
            "not Python's round()", 'half to even'),
    Mistake('quantize_multiplier', 'return m0, -exponent',
            'return m0, exponent',
            'shift = -e', 'shift sign'),
    Mistake('quantize_multiplier', 'if m0 == 2**31:',
            'if False:',
            'halve M0 and add 1 to the exponent', 'M0 = 2**31 kept'),
    Mistake('quantize_multiplier', 'if exponent < -31:',
            'if False:',
            'flushed to (0, 0)', 'no flush below 2**-32'),
    Mistake('quantize_multiplier', 'math.floor(f * 2**31 + 0.5)',
            '(f * 2**31 + 0.5) // 1',
            'return two Python ints', 'float M0'),
    # e2 saturating_rounding_doubling_high_mul
    Mistake('saturating_rounding_doubling_high_mul',
            'a, b = a.to(torch.int64), torch.as_tensor(b, dtype=torch.int64)',
            'a, b = a.to(torch.int32), torch.as_tensor(b, dtype=torch.int32)',
            'compute in int64', 'int32 product'),
    Mistake('saturating_rounding_doubling_high_mul',
            'high = torch.where(x >= 0, x // 2**31, -((-x) // 2**31))',
            'high = x // 2**31',
            'truncating toward zero', 'floor division'),
    Mistake('saturating_rounding_doubling_high_mul', 'x = ab + torch.where(ab >= 0, 2**30, 1 - 2**30)',
            'x = ab',
            'add the rounding nudge', 'no rounding nudge'),
    Mistake('saturating_rounding_doubling_high_mul', 'torch.where(ab >= 0, 2**30, 1 - 2**30)',
            '2**30',
            'for a negative product the nudge is 1 - 2**30', 'nudge 2**30 for negatives'),
    Mistake('saturating_rounding_doubling_high_mul',
            'return torch.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)',
            'return high',
            'saturates to INT32_MAX', 'no saturation'),
    # e3 rounding_divide_by_pot
    Mistake('rounding_divide_by_pot', 'return (x >> exponent) + (remainder > threshold).to(torch.int64)',
            'return x >> exponent',
            'x >> exponent floors', 'not rounded'),
    Mistake('rounding_divide_by_pot', '(remainder > threshold)',
            '(remainder >= threshold)',
            'not equal to it', '>= threshold'),
    Mistake('rounding_divide_by_pot', 'return (x >> exponent) + (remainder > threshold).to(torch.int64)',
            'return torch.round(x / 2**exponent).to(torch.int64)',
            'not half to even', 'half to even'),
    Mistake('rounding_divide_by_pot', 'threshold = (mask >> 1) + (x < 0).to(torch.int64)',
            'threshold = (mask >> 1)',
            'threshold is one larger', 'wrong for negatives'),
    Mistake('rounding_divide_by_pot', 'threshold = (mask >> 1) + (x < 0).to(torch.int64)',
            'threshold = (1 << (exponent - 1)) - 1 + (x < 0).to(torch.int64)',
            'exponent 0 divides by 1', 'exponent 0'),
    # e4 requantize_fixed_point
    Mistake('requantize_fixed_point',
            'y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, m0), right)',
            'y = torch.round(acc.double() * multiplier).to(torch.int64)',
            'integers only', 'float arithmetic'),
    Mistake('requantize_fixed_point', 'left, right = max(-shift, 0), max(shift, 0)',
            'left, right = max(shift, 0), max(-shift, 0)',
            'a positive shift is a right shift', 'shift direction'),
    Mistake('requantize_fixed_point',
            'y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, m0), right)',
            'y = saturating_rounding_doubling_high_mul(rounding_divide_by_pot(acc, right), m0)',
            'the high multiply first', 'shift before the multiply'),
    Mistake('requantize_fixed_point', 'torch.clamp(y + zero_point, quant_min, quant_max)',
            'torch.clamp(y + zero_point, 0, 255)',
            'do not hard-code [0, 255]', 'hard-coded [0, 255]'),
    Mistake('requantize_fixed_point', 'return torch.clamp(y + zero_point, quant_min, quant_max).to(torch.int32)',
            'return (y + zero_point).to(torch.int32)',
            'clamp to [quant_min, quant_max] after adding', 'no clamp'),
    Mistake('requantize_fixed_point', 'acc = torch.clamp(acc.to(torch.int64) << left, INT32_MIN, INT32_MAX)',
            'acc = acc.to(torch.int64) << left',
            'clamp the shifted value', 'left shift unsaturated'),
    # e5 conv2d_accumulate
    Mistake('conv2d_accumulate', 'w = q_w.to(torch.int64) - zw',
            'w = q_w.to(torch.int64)',
            "subtract the weights' zero point", 'Z_w not subtracted'),
    Mistake('conv2d_accumulate', 'torch.as_tensor(zero_point_w).reshape(-1, 1, 1, 1)',
            'torch.as_tensor(zero_point_w)',
            'reshape Z_w to (C_out, 1, 1, 1)', 'Z_w not reshaped'),
    Mistake('conv2d_accumulate', 'stride=stride, padding=padding)',
            'padding=padding)',
            'pass stride to the conv', 'stride ignored'),
    Mistake('conv2d_accumulate', 'stride=stride, padding=padding)',
            'stride=stride)',
            'pass padding to the conv', 'padding ignored'),
    Mistake('conv2d_accumulate', 'acc = F.conv2d(x.double(), w.double(), stride=stride, padding=padding)',
            'acc = F.conv2d(F.pad(x + zero_point_x, [padding] * 4).double() - zero_point_x, w.double(), '
            'stride=stride)',
            'not q_x', 'q_x padded with 0'),
    Mistake('conv2d_accumulate', 'x = q_x.to(torch.int64) - zero_point_x',
            'x = q_x - zero_point_x',
            'uint8 arithmetic wraps around', 'uint8 wraps'),
    Mistake('conv2d_accumulate', 'F.conv2d(x.double(), w.double()',
            'F.conv2d(x.float(), w.float()',
            'float32 has only even integers', 'float32 accumulation'),
    Mistake('conv2d_accumulate', 'return acc.to(torch.int64)',
            'return acc',
            'integers belong in an integer tensor', 'float result'),
    # e6 quantized_conv2d
    Mistake('quantized_conv2d', 'acc = acc + q_b.reshape(1, -1, 1, 1)',
            'acc = acc + q_b',
            'reshape q_b to (1, C_out, 1, 1)', 'q_b not reshaped'),
    Mistake('quantized_conv2d', 'min_w, max_w = calc_min_max(weight, axis=0)',
            'min_w, max_w = calc_min_max(weight)',
            'weights per channel', 'per-tensor weights'),
    Mistake('quantized_conv2d', 'scale_x, zero_point_x = calc_scale_zero_point(',
            'scale_x, zero_point_x = calc_scale_zero_point_symmetric(',
            'the input is affine', 'symmetric input'),
    Mistake('quantized_conv2d', 'calc_scale_zero_point_symmetric(min_w, max_w, num_bits=8, signed=True)',
            'calc_scale_zero_point(min_w, max_w, num_bits=8, signed=True)',
            'the weights are symmetric', 'affine weights'),
    Mistake('quantized_conv2d', 'conv2d_accumulate(q_x, zero_point_x, q_w, zero_point_w, stride, padding)',
            'conv2d_accumulate(q_x, zero_point_x, q_w, zero_point_w)',
            'pass them to the accumulator', 'stride and padding not passed'),
    Mistake('quantized_conv2d', 'acc = acc + q_b.reshape(1, -1, 1, 1)',
            'acc = acc + bias.reshape(1, -1, 1, 1)',
            'not the float bias', 'float bias in the conv'),
    Mistake('quantized_conv2d', 'multiplier = (scale_x * scale_w) * (1.0 / scale_y)',
            'multiplier = scale_x * scale_w / scale_y',
            "ONNX Runtime's formula", "ONNX Runtime's quotient M"),
    Mistake('quantized_conv2d', 'multiplier = (scale_x * scale_w) * (1.0 / scale_y)',
            'multiplier = (scale_x.double() * scale_w.double()) / scale_y.double()',
            'float64 M', 'float64 M'),
]
