"""Exercises of lesson fa (fa_learned_step_size): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="fa_learned_step_size",
    title="fa · Exercises: LSQ's step gradient (练习: 学习量化步长)",
    goal="Write LSQ's gradient with respect to the step $S$ by hand (the three cases: below, inside and above the "
         "range), then LSQ's fake quantization with that gradient, scaled by $g = 1/\\sqrt{N Q_p}$.",
    oracle="autograd of quantlab's `learned.lsq_fake_quantize`",
    setup='''\
# setup: math, torch, and the checker
import math

import torch

from quantlab import check''',
    exercises=[
        ex(1, "lsq_step_gradient", "the gradient of LSQ's output with respect to the step",
           r"""
           With $t = x \cdot \tfrac{1}{S}$ (the float32 reciprocal, as `quantize`), $-Q_n = q_{min} - Z$ and $Q_p = q_{max} - Z$
           (the levels below and above the zero point), LSQ takes the derivative of round as 1 (straight through) and gets
           $$\frac{\partial \hat x}{\partial S} = \begin{cases} \mathrm{round}(t) - t & -Q_n < t < Q_p \\ -Q_n & t \le -Q_n \\ Q_p & t \ge Q_p \end{cases}$$
           with `torch.round` (half to even). `scale` is a float32 tensor of shape `()`, `zero_point` an int32 tensor of
           shape `()`, `quant_min`, `quant_max` Python ints. Return a float32 tensor of `x`'s shape: the derivative for
           each value (no gradient scale $g$ here; the check compares it with autograd of quantlab's
           `lsq_fake_quantize` with one step per value).""",
           '''
           def lsq_step_gradient(x, scale, zero_point, quant_min, quant_max):
               """d x_hat / d S for each value of x (float32, x's shape)."""''',
           '''
           t = x * (1.0 / scale)                                         # as quantize: the float32 reciprocal
           low, high = quant_min - zero_point, quant_max - zero_point    # -Q_n and Q_p
           inside = (t > low) & (t < high)
           clipped = torch.where(t <= low, low, high).to(torch.float32)  # -Q_n below, Q_p above
           return torch.where(inside, torch.round(t) - t, clipped)'''),
        ex(2, "lsq_fake_quantize", "LSQ fake quantization with its gradients",
           r"""
           Forward, as notebook f: $\hat x = S\,\big(\mathrm{clamp}(\mathrm{round}(x \cdot \tfrac{1}{S}) + Z,\ q_{min},\ q_{max}) - Z\big)$.
           Backward, LSQ's: $\partial \hat x / \partial x = 1$ where $-Q_n < t < Q_p$ (strictly, on $t$ itself) and 0
           elsewhere; the step's gradient is $g \sum \frac{\partial L}{\partial \hat x} \frac{\partial \hat x}{\partial S}$ with
           $\partial \hat x / \partial S$ from fa1 and LSQ's gradient scale
           $$ g = \frac{1}{\sqrt{N\,Q_p}} $$
           where $N$ is the number of values of **one image** (`x` is a batch: its first axis counts the images) and
           $Q_p = q_{max} - Z \ge 1$. `scale` (shape `()`, it requires grad) and `x` are float32; `zero_point` is an int32 tensor of shape `()`.
           One way: the forward value detached, plus terms that are 0 in value but carry the gradients, such as
           `(x - x.detach()) * inside`; another, a `torch.autograd.Function`.""",
           '''
           def lsq_fake_quantize(x, scale, zero_point, quant_min, quant_max):
               """x_hat (float32, x's shape) with LSQ's gradients for x and for the step `scale`."""''',
           '''
           q = torch.round(x * (1.0 / scale)) + zero_point
           x_hat = (torch.clamp(q, quant_min, quant_max) - zero_point) * scale
           t = x.detach() * (1.0 / scale.detach())
           keep = (t > quant_min - zero_point) & (t < quant_max - zero_point)   # d x_hat / d x: strictly inside
           g = 1.0 / math.sqrt(x[0].numel() * int(quant_max - zero_point))      # N: the values of one image
           ds = lsq_step_gradient(x.detach(), scale.detach(), zero_point, quant_min, quant_max)
           return x_hat.detach() + (x - x.detach()) * keep + (scale - scale.detach()) * (g * ds)'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('lsq_step_gradient', 'torch.where(inside, torch.round(t) - t, clipped)',
            'torch.where(inside, torch.round(t), clipped)',
            "round's derivative as 1", "round's gradient taken as 0"),
    Mistake('lsq_step_gradient', 'torch.where(t <= low, low, high)',
            'torch.where(t <= low, -low, high)',
            'the gradient is -Q_n', 'sign of the lower clamp'),
    Mistake('lsq_step_gradient', 'inside = (t > low) & (t < high)',
            'inside = (t >= low) & (t <= high)',
            'counts as clipped', 'boundaries inside'),
    Mistake('lsq_step_gradient', 'low, high = quant_min - zero_point, quant_max - zero_point',
            'low, high = quant_min, quant_max',
            'counted from the zero point', 'Z ignored in Q_n, Q_p'),
    Mistake('lsq_step_gradient', 'inside = (t > low) & (t < high)',
            'inside = (torch.round(t) >= low) & (torch.round(t) <= high)',
            'not on the rounded value', "notebook f's mask"),
    Mistake('lsq_step_gradient', 't = x * (1.0 / scale)  ',
            't = x / scale  ',
            'dividing by S', 'divides by S'),
    Mistake('lsq_step_gradient', 'return torch.where(inside, torch.round(t) - t, clipped)',
            'return torch.where(inside, torch.round(t) - t, clipped).double()',
            'the statement asks for float32', 'float64'),
    Mistake('lsq_fake_quantize', '(scale - scale.detach()) * (g * ds)',
            '(scale - scale.detach()) * ds',
            'multiply the step\'s gradient by g', 'g forgotten'),
    Mistake('lsq_fake_quantize', 'x[0].numel()',
            'x.numel()',
            'N counts the values of one image', 'N of the whole batch'),
    Mistake('lsq_fake_quantize', 'int(quant_max - zero_point))',
            'quant_max)',
            'Q_p = quant_max - Z', 'Q_p without Z'),
    Mistake('lsq_fake_quantize', 'keep = (t > quant_min - zero_point) & (t < quant_max - zero_point)',
            'keep = (q >= quant_min) & (q <= quant_max)',
            'strictly inside', "notebook f's mask for x"),
    Mistake('lsq_fake_quantize', 'torch.round(x * (1.0 / scale)) + zero_point',
            'torch.round(x / scale) + zero_point',
            'dividing by S', 'forward divides by S'),
]
