"""Exercises of lesson d (d_post_training_quantize): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="d_post_training_quantize",
    title="d · Exercises: BN folding, int32 bias, requantization, freeze (练习: 训练后量化)",
    goal="Write the pieces `freeze()` computes: a BatchNorm folded into the conv before it, the int32 bias, "
         "the float-multiplier requantization of the accumulator, and everything a `QLinear`'s `freeze()` "
         "computes. `e_exercises.ipynb` imports `quantize_bias` and `requantize` from this notebook.",
    oracle=("PyTorch's BN fold (`fuse_conv_bn_weights`) and int32 quantization "
            "(`quantize_per_channel`), the checker's float32 requantization and quantlab's `QLinear`"),
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
           127: it needs 32 bits. Clamp in int64 or float64 (float32 cannot hold $2^{31}-1$). The clamp only keeps the
           result a valid int32: a bias that needs it would make another layer, and quantlab's `freeze()` refuses such a
           bias (an error naming the layer) instead of clamping it.""",
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
           $$ q_y = \mathrm{clamp}\big(\mathrm{round}(\mathrm{float32}(acc) \cdot M) + Z_y,\ q_{min},\ q_{max}\big), \qquad M = (S_x S_w) \cdot \tfrac{1}{S_y} $$
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
           $S_y$, return what `QLinear.freeze()` computes:
           - `q_w`, `scale_w`: the weights quantized per output channel, symmetric, signed 8 bits (lesson a: use
             `quantlab.calc_min_max(weight, axis=0)`, `quantlab.calc_scale_zero_point(..., signed=True, symmetric=True)`,
             `quantlab.quantize(..., axis=0)`);
           - `q_b`: the int32 bias of d2, as int32 (`freeze()` keeps the same integers in an int64 tensor);
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

#: (exercise, text in its solution, the mistake, words its hint must contain, what)
MISTAKES: list[Mistake] = [
    # d1 fold_bn
    Mistake('fold_bn', 'beta + (bias - mean) * factor',
            'beta + bias * factor - mean',
            'the mean is scaled with the bias', 'mean not scaled'),
    Mistake('fold_bn', 'gamma / torch.sqrt(var + eps)',
            'gamma / var',
            'not by the variance', 'BN folded with var'),
    Mistake('fold_bn', 'gamma / torch.sqrt(var + eps)',
            'gamma / torch.sqrt(var)',
            'divides by 0', 'eps dropped'),
    Mistake('fold_bn', 'gamma / torch.sqrt(var + eps)',
            'gamma / (torch.sqrt(var) + eps)',
            'not sqrt(var) + eps', 'eps outside the root'),
    Mistake('fold_bn', 'gamma / torch.sqrt(var + eps)',
            'gamma / torch.sqrt(var + 1e-5)',
            'do not hard-code 1e-5', 'eps hard-coded'),
    Mistake('fold_bn', 'if bias is None:\n        bias = torch.zeros_like(mean)\n    ',
            '',
            'use 0 for b', 'bias None not handled'),
    Mistake('fold_bn', 'factor.reshape([-1] + [1] * (weight.dim() - 1))',
            'factor.reshape(-1, 1, 1, 1)',
            'for any weight dimension', 'factor reshaped for 4-d only'),
    # d2 quantize_bias
    Mistake('quantize_bias', 'q_b = torch.round(bias * (1.0 / (scale_x * scale_w)))',
            'q_b = bias * (1.0 / (scale_x * scale_w))',
            '.to(torch.int32) truncates', 'truncated'),
    Mistake('quantize_bias', 'torch.round(bias * (1.0 / (scale_x * scale_w)))',
            'torch.floor(bias * (1.0 / (scale_x * scale_w)) + 0.5)',
            'floor(x + 0.5) rounds ties up', 'ties up'),
    Mistake('quantize_bias', 'torch.clamp(q_b.double(), -2**31, 2**31 - 1).to(torch.int32)',
            'torch.clamp(q_b.double(), -128, 127).to(torch.int32)',
            'never clamp it to int8', 'bias clamped to int8'),
    Mistake('quantize_bias', 'torch.round(bias * (1.0 / (scale_x * scale_w)))',
            'torch.round(bias.double() * (1.0 / (scale_x.double() * scale_w.double())))',
            'in float64 rounds', 'float64'),
    Mistake('quantize_bias', 'torch.round(bias * (1.0 / (scale_x * scale_w)))',
            'torch.round(bias / (scale_x * scale_w))',
            'dividing rounds', 'divides'),
    Mistake('quantize_bias', 'torch.clamp(q_b.double(), -2**31, 2**31 - 1).to(torch.int32)',
            'q_b',
            'integer tensor', 'float bias'),
    Mistake('quantize_bias', 'torch.clamp(q_b.double(), -2**31, 2**31 - 1).to(torch.int32)',
            'torch.clamp(q_b.double(), -2**31, 2**31 - 1).to(torch.int64)',
            'the statement asks for int32', 'int64'),
    # d3 requantize
    Mistake('requantize', 'torch.round(acc.to(torch.float32) * m)',
            '(acc.to(torch.float32) * m)',
            'casting to int truncates', 'not rounded'),
    Mistake('requantize', 'y = torch.round(acc.to(torch.float32) * m) + zero_point\n'
            '    return torch.clamp(y, quant_min, quant_max).to(torch.int32)',
            'y = torch.round(acc.to(torch.float32) * m)\n'
            '    return (torch.clamp(y, quant_min, quant_max) + zero_point).to(torch.int32)',
            'add Z_y, then clamp', 'clamped before adding Z'),
    Mistake('requantize', 'torch.round(acc.to(torch.float32) * m)',
            'torch.floor(acc.to(torch.float32) * m + 0.5)',
            'floor(x + 0.5) rounds ties up', 'ties up'),
    Mistake('requantize', 'torch.round(acc.to(torch.float32) * m) + zero_point',
            'torch.round(acc.to(torch.float32) * m + zero_point)',
            'round first, then add Z_y', 'Z added before rounding'),
    Mistake('requantize', 'torch.clamp(y, quant_min, quant_max)',
            'torch.clamp(y, 0, 255)',
            'do not hard-code [0, 255]', 'hard-coded [0, 255]'),
    Mistake('requantize', 'return torch.clamp(y, quant_min, quant_max).to(torch.int32)',
            'return y.to(torch.int32)',
            'clamp to [quant_min, quant_max] after adding', 'no clamp'),
    Mistake('requantize', 'multiplier.reshape([1, -1] + [1] * (acc.dim() - 2))',
            'multiplier.reshape([-1] + [1] * (acc.dim() - 1))',
            'not to axis 0', 'M along axis 0'),
    Mistake('requantize', 'm = multiplier.reshape([1, -1] + [1] * (acc.dim() - 2)) if multiplier.dim() == 1 else multiplier',
            'm = multiplier',
            'reshape M to (1, C, 1, 1)', 'M not reshaped'),
    Mistake('requantize', 'torch.round(acc.to(torch.float32) * m)',
            'torch.round(acc.double() * m.double())',
            'float64 rounds this value', 'float64'),
    Mistake('requantize', 'return torch.clamp(y, quant_min, quant_max).to(torch.int32)',
            'return torch.clamp(y, quant_min, quant_max).to(torch.int64)',
            'the statement asks for int32', 'int64'),
    # d4 freeze_linear
    Mistake('freeze_linear', 'quantlab.calc_min_max(weight, axis=0)\n'
            '    scale_w, zero_point_w = quantlab.calc_scale_zero_point(min_w, max_w, num_bits=8, signed=True,\n'
            '                                                           symmetric=True)\n'
            '    q_w = quantlab.quantize(weight, scale_w, zero_point_w, num_bits=8, signed=True, axis=0)',
            'quantlab.calc_min_max(weight)\n'
            '    scale_w, zero_point_w = quantlab.calc_scale_zero_point(min_w, max_w, num_bits=8, signed=True,\n'
            '                                                           symmetric=True)\n'
            '    q_w = quantlab.quantize(weight, scale_w, zero_point_w, num_bits=8, signed=True)',
            'one scale per output channel', 'per-tensor weights'),
    Mistake('freeze_linear', 'symmetric=True)',
            'symmetric=False)',
            'symmetric weights', 'affine weights'),
    Mistake('freeze_linear', 'max_w, num_bits=8, signed=True,\n'
            '                                                           symmetric=True)\n'
            '    q_w = quantlab.quantize(weight, scale_w, zero_point_w, num_bits=8, signed=True, axis=0)',
            'max_w, num_bits=8, signed=False,\n'
            '                                                           symmetric=True)\n'
            '    q_w = quantlab.quantize(weight, scale_w, zero_point_w, num_bits=8, signed=False, axis=0)',
            'signed int8 weights have zero point 0', 'unsigned weights'),
    Mistake('freeze_linear', 'multiplier = (scale_x * scale_w) * (1.0 / scale_y)',
            'multiplier = scale_x * scale_w / scale_y',
            "ONNX Runtime's formula", "ONNX Runtime's quotient M"),
    Mistake('freeze_linear', 'multiplier = (scale_x * scale_w) * (1.0 / scale_y)',
            'multiplier = (scale_x.double() * scale_w.double()) / scale_y.double()',
            'float64 M', 'float64 M'),
]
