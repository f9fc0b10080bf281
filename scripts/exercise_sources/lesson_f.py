"""Exercises of lesson f (f_quantization_aware_training): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="f_quantization_aware_training",
    title="f · Exercises: fake quantization with a straight-through gradient (练习: 量化感知训练)",
    goal="Write the two pieces quantization-aware training adds: fake quantization, whose gradient is passed "
         "straight through where the value was not clamped, and the moving-average range of the activations.",
    oracle="quantlab's `fake_quantize` and `QParam`",
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

#: (exercise, text in its solution, the mistake, words its hint must contain, what)
MISTAKES: list[Mistake] = [
    # f1 fake_quantize
    Mistake('fake_quantize', 'return x_hat.detach() + (x - x.detach()) * inside',
            'return x_hat',
            'round() has zero gradient', 'no straight-through gradient'),
    Mistake('fake_quantize', 'quant_min, quant_max = quant_range(num_bits, signed)',
            'quant_min, quant_max = 0, 255',
            'do not hard-code 8 bits', 'hard-coded [0, 255]'),
    Mistake('fake_quantize', '(x - x.detach()) * inside',
            '(x - x.detach())',
            'the gradient is 0 where x was clamped', 'STE not zeroed'),
    Mistake('fake_quantize', 'inside = (q >= quant_min) & (q <= quant_max)',
            'inside = (x * (1.0 / scale) + zero_point >= quant_min) & (x * (1.0 / scale) + zero_point <= quant_max)',
            'the mask is on the rounded value', 'mask before rounding'),
    Mistake('fake_quantize', 'torch.round(x * (1.0 / scale))',
            'torch.trunc(x * (1.0 / scale))',
            'torch.trunc and .to(torch.int32) truncate', 'truncated'),
    Mistake('fake_quantize', 'torch.round(x * (1.0 / scale))',
            'torch.floor(x * (1.0 / scale) + 0.5)',
            'floor(x + 0.5)', 'ties up'),
    Mistake('fake_quantize', 'q = torch.round(x * (1.0 / scale)) + zero_point',
            'q = torch.round(x * (1.0 / scale) + zero_point)',
            'round first, then add the zero point', 'Z added before rounding'),
    Mistake('fake_quantize', 'torch.round(x * (1.0 / scale))',
            'torch.round(x / scale)',
            'dividing by the scale', 'divides by S'),
    Mistake('fake_quantize', 'x_hat = (torch.clamp(q, quant_min, quant_max) - zero_point) * scale',
            'x_hat = torch.clamp(q, quant_min, quant_max) * scale - zero_point * scale',
            'cancellation', 'q*S - Z*S'),
    # f2 moving_average_range
    Mistake('moving_average_range', 'if min_val is None:\n        return batch_min, batch_max\n    ',
            '',
            'the first batch (min_val is None)', 'first batch not special'),
    Mistake('moving_average_range', 'return min_val + c * (batch_min - min_val), max_val + c * (batch_max - max_val)',
            'return torch.minimum(min_val, batch_min), torch.maximum(max_val, batch_max)',
            'not a running min and max', 'running min and max'),
    Mistake('moving_average_range', 'min_val + c * (batch_min - min_val), max_val + c * (batch_max - max_val)',
            'min_val + (1 - c) * (batch_min - min_val), max_val + (1 - c) * (batch_max - max_val)',
            'c weighs the new batch', 'c and 1 - c swapped'),
    Mistake('moving_average_range', 'batch_min, batch_max = x.min(), x.max()',
            'batch_min, batch_max = x.min().item(), x.max().item()',
            'not Python floats', 'Python floats'),
]
