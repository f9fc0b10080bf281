"""Build the exercise notebooks from one source: exercises/<lesson>_exercises.ipynb (stubs) and
exercises/solutions/<lesson>_exercises.ipynb (worked solutions), then execute them in place.

Usage: python scripts/build_exercises.py [--no-execute] [--lessons a d e f]
Each exercise is a statement (markdown), a code cell holding the signature and docstring followed by
either ``raise NotImplementedError`` (template) or the solution, and a checking cell. The checks
themselves live in quantlab/exercise_checks/ (one file per lesson); the checker is quantlab/check.py.
Notebooks are stored executed top to bottom, without execution timings and widget state.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import textwrap
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
LESSON_NOTEBOOKS = {"a": "a_basic_quant", "d": "d_post_training_quantize",
                    "e": "e_conv_quantization_walkthrough", "f": "f_quantization_aware_training"}
STUB = "    raise NotImplementedError  # replace this line with your code\n"


def ex(number, name, title, statement, signature, solution):
    return dict(number=number, name=name, title=title, statement=textwrap.dedent(statement).strip(),
                signature=textwrap.dedent(signature).strip("\n") + "\n",
                solution=textwrap.indent(textwrap.dedent(solution).strip("\n"), "    ") + "\n")


LESSONS = {}

LESSONS["a"] = dict(
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

LESSONS["d"] = dict(
    title="d · Exercises: BN folding, int32 bias, requantization, freeze (练习: 训练后量化)",
    goal="Write the pieces `freeze()` computes: a BatchNorm folded into the conv before it, the int32 bias, "
         "the float-multiplier requantization of the accumulator, and everything a `QLinear`'s `freeze()` "
         "stores. `e_exercises.ipynb` imports `quantize_bias` and `requantize` from this notebook.",
    setup='''\
# setup: torch, quantlab's lesson-a functions (for d4), and the checker
import torch

import quantlab
from quantlab import check''',
    exercises=[
        ex(1, "fold_bn", "fold a BatchNorm into the conv before it",
           r"""
           BatchNorm computes $\gamma\,(y - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta$ per output channel. Folded into the
           conv $y = w * x + b$:
           $$ w' = w\,\frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad b' = \beta + (b - \mu)\,\frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} $$
           per output channel (axis 0 of `weight`, which may be a conv's `(C, C_in, k, k)` or a Linear's `(C, C_in)`).
           `bias` may be `None` (then $b = 0$).""",
           '''
           def fold_bn(weight, bias, mean, var, gamma, beta, eps):
               """(weight', bias') of the conv with the BatchNorm folded in."""''',
           '''
           factor = gamma / torch.sqrt(var + eps)
           if bias is None:
               bias = torch.zeros_like(mean)
           w = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
           return w, beta + (bias - mean) * factor'''),
        ex(2, "quantize_bias", "the int32 bias",
           r"""
           The bias is added to the accumulator, whose unit is $S_x S_w$, so its scale is $S_b = S_x S_w$ (per channel)
           and its zero point 0:
           $$ q_b = \mathrm{clamp}\big(\mathrm{round}(b \cdot \tfrac{1}{S_x S_w}),\ -2^{31},\ 2^{31}-1\big) $$
           in float32 (the reciprocal, as PyTorch), rounded half to even, as an int32 tensor. $q_b$ is far larger than
           127: it needs 32 bits. Clamp in int64 or float64 (float32 cannot hold $2^{31}-1$).""",
           '''
           def quantize_bias(bias, scale_x, scale_w):
               """int32 bias at scale S_x * S_w (scale_w: shape () or (C,)), zero point 0."""''',
           '''
           q_b = torch.round(bias * (1.0 / (scale_x * scale_w)))     # float32 reciprocal, as PyTorch
           return torch.clamp(q_b.double(), -2**31, 2**31 - 1).to(torch.int32)'''),
        ex(3, "requantize", "float-multiplier requantization",
           r"""
           From the int32 accumulator (bias included: $\mathrm{acc} + q_b$, as in lesson d's section 0, the integer layer in
           one equation) to the output integers, as qnnpack:
           $$ q_y = \mathrm{clamp}\big(\mathrm{round}(\mathrm{float32}(acc) \cdot M) + Z_y,\ q_{min},\ q_{max}\big), \qquad M = \frac{S_x S_w}{S_y} $$
           rounded half to even. `multiplier` is a float32 tensor of shape `()` or `(C,)` for the channels on axis 1
           of `acc` (`(N, C)` or `(N, C, H, W)`). Return int32.""",
           '''
           def requantize(acc, multiplier, zero_point, quant_min=0, quant_max=255):
               """Output integers (int32) from the accumulator, float multiplier M per tensor or channel."""''',
           '''
           m = multiplier.reshape([1, -1] + [1] * (acc.dim() - 2)) if multiplier.dim() == 1 else multiplier
           y = torch.round(acc.to(torch.float32) * m) + zero_point
           return torch.clamp(y, quant_min, quant_max).to(torch.int32)'''),
        ex(4, "freeze_linear", "what a QLinear's freeze() computes",
           r"""
           For a `Linear(C_in, C_out)` with per-channel symmetric int8 weights, an input scale $S_x$ and an output scale
           $S_y$, return what `QLinear.freeze()` stores:
           - `q_w`, `scale_w`: the weights quantized per output channel, symmetric, signed 8 bits (lesson a: use
             `quantlab.calc_min_max(weight, axis=0)`, `quantlab.calc_scale_zero_point(..., signed=True, symmetric=True)`,
             `quantlab.quantize(..., axis=0)`);
           - `q_b`: the int32 bias of d2;
           - `multiplier`: $M = (S_x S_w) \cdot \tfrac{1}{S_y}$ per channel, in float32 (as qnnpack).""",
           '''
           def freeze_linear(weight, bias, scale_x, scale_y):
               """(q_w, scale_w, q_b, multiplier) of a per-channel int8 Linear layer."""''',
           '''
           min_w, max_w = quantlab.calc_min_max(weight, axis=0)
           scale_w, zero_point_w = quantlab.calc_scale_zero_point(min_w, max_w, num_bits=8, signed=True,
                                                                  symmetric=True)
           q_w = quantlab.quantize(weight, scale_w, zero_point_w, num_bits=8, signed=True, axis=0)
           q_b = quantize_bias(bias, scale_x, scale_w)
           multiplier = (scale_x * scale_w) * (1.0 / scale_y)
           return q_w, scale_w, q_b, multiplier'''),
    ])

LESSONS["e"] = dict(
    title="e · Exercises: the integer convolution and fixed-point requantization (练习: 卷积量化)",
    goal="Compute a quantized convolution with integers only, and requantize it the way TFLite and gemmlowp do: "
         "a Q31 integer multiplier, a rounding doubling high multiply and a rounding right shift. The last "
         "exercise assembles a whole quantized conv from **your own** functions of notebooks a and d, imported "
         "with `import_ipynb` as the original series did; the checker compares it bit for bit with quantlab and "
         "with PyTorch's qnnpack kernel. (After editing a_exercises or d_exercises, save them, then restart "
         "this kernel: the import reads the saved files, once per kernel.)\n\n**Names.** The lesson calls the conv's output $a$; these exercises call it "
         "$y$: $q_y, S_y, Z_y$ here are the lesson's $q_a, S_a, Z_a$, and `shift` is the lesson's right shift $n$. "
         "`acc` in e4 is the lesson's $\\mathrm{acc} + q_b$ (bias included).",
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

LESSONS["f"] = dict(
    title="f · Exercises: fake quantization with a straight-through gradient (练习: 量化感知训练)",
    goal="Write the two pieces quantization-aware training adds: fake quantization, whose gradient is passed "
         "straight through where the value was not clamped, and the moving-average range of the activations.",
    setup='''\
# setup: torch, quant_range from lesson a, and the checker
import torch

from quantlab import check, quant_range''',
    exercises=[
        ex(1, "fake_quantize", "fake quantization with a straight-through gradient",
           r"""
           Forward: $\hat x = S\,\big(\mathrm{clamp}(q, q_{min}, q_{max}) - Z\big)$ with $q = \mathrm{round}(x \cdot \tfrac{1}{S}) + Z$.
           Backward (straight-through estimator): the incoming gradient passes unchanged where $q$ is inside
           $[q_{min}, q_{max}]$ (the mask is on the *rounded* value, as `torch.fake_quantize_per_tensor_affine`) and is 0 where
           it was clamped. `round` itself has zero gradient: one way is `x_hat.detach() + (x - x.detach()) * inside`,
           another a `torch.autograd.Function`.""",
           '''
           def fake_quantize(x, scale, zero_point, num_bits=8, signed=False):
               """dequantize(quantize(x)) in float32, differentiable with a straight-through gradient."""''',
           '''
           quant_min, quant_max = quant_range(num_bits, signed)
           q = torch.round(x * (1.0 / scale)) + zero_point
           inside = (q >= quant_min) & (q <= quant_max)
           x_hat = (torch.clamp(q, quant_min, quant_max) - zero_point) * scale
           return x_hat.detach() + (x - x.detach()) * inside     # value x_hat, gradient 1 inside, 0 outside'''),
        ex(2, "moving_average_range", "the moving-average range of an activation",
           r"""
           During QAT an activation's range follows the batches: on the first batch (`min_val is None`) it is the
           batch's $(\min x, \max x)$; afterwards, with the averaging constant $c$,
           $$ r_{min} \leftarrow r_{min} + c\,(\min x - r_{min}), \qquad r_{max} \leftarrow r_{max} + c\,(\max x - r_{max}) $$
           (PyTorch's `MovingAverageMinMaxObserver`). Return the new `(min_val, max_val)`.""",
           '''
           def moving_average_range(min_val, max_val, x, averaging_constant=0.01):
               """The range after observing batch x: (min_val, max_val) float32 tensors of shape ()."""''',
           '''
           batch_min, batch_max = x.min(), x.max()
           if min_val is None:
               return batch_min, batch_max
           c = averaging_constant
           return min_val + c * (batch_min - min_val), max_val + c * (batch_max - max_val)'''),
    ])


def build(lesson: str, solution: bool) -> nbformat.NotebookNode:
    spec = LESSONS[lesson]
    up = "../../" if solution else "../"
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "quantlab": {"lesson": lesson}}
    title = spec["title"] + (" · solutions" if solution else "")
    lesson_nb = LESSON_NOTEBOOKS[lesson]
    how = (f"**Worked solutions.** Every function here passes every check: "
           f"`python -m quantlab.check {lesson}_exercises.ipynb --strict`." if solution else
           "**How to work.** Replace each stub's `raise NotImplementedError` with your code, run the cell, then run the "
           "check cell under it: it compares your function with quantlab and PyTorch on tricky and random inputs and "
           "prints `passed`, `not attempted`, or the smallest input it found that fails, with what was expected, what "
           "you returned and a hint. From a shell: "
           f"`python -m quantlab.check {lesson}_exercises.ipynb` (add `--strict` to fail unattempted exercises too).")
    nb.cells.append(nbformat.v4.new_markdown_cell(
        f"# {title}\n\nLesson: [{lesson_nb}]({up}notebooks/{lesson_nb}.ipynb). {spec['goal']}\n\n{how}"))
    nb.cells.append(nbformat.v4.new_code_cell(spec["setup"]))
    for e in spec["exercises"]:
        nb.cells.append(nbformat.v4.new_markdown_cell(
            f"## {lesson}{e['number']} · `{e['name']}`: {e['title']}\n\n{e['statement']}"))
        nb.cells.append(nbformat.v4.new_code_cell(
            (e["signature"] + (e["solution"] if solution else STUB)).rstrip("\n")))
        nb.cells.append(nbformat.v4.new_code_cell(
            f'# NBVAL_CHECK_OUTPUT\ncheck.run("{lesson}", "{e["name"]}")'))
    nb.cells.append(nbformat.v4.new_markdown_cell(
        "## All exercises of this notebook\n\nThe same checks for every function defined above, and a summary."))
    nb.cells.append(nbformat.v4.new_code_cell(f'# NBVAL_CHECK_OUTPUT\ncheck.run("{lesson}")'))
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild changes only what changed
        cell.id = f"{lesson}-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, folder: pathlib.Path) -> None:
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            store_widget_state=False, resources={"metadata": {"path": str(folder)}})
    client.execute(stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-execute", action="store_true", help="write the notebooks without outputs")
    p.add_argument("--lessons", nargs="+", default=list(LESSONS), choices=list(LESSONS),
                   help="rebuild only these lessons (default: all)")
    args = p.parse_args()
    for solution in (False, True):
        folder = ROOT / "exercises" / ("solutions" if solution else "")
        folder.mkdir(parents=True, exist_ok=True)
        for lesson in args.lessons:  # a, d before e: e imports them
            nb = build(lesson, solution)
            path = folder / f"{lesson}_exercises.ipynb"
            nbformat.write(nb, path)  # siblings must exist on disk before e imports them
            if not args.no_execute:
                start = time.perf_counter()
                execute(nb, folder)
                nbformat.write(nb, path)
                print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
