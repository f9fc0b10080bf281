"""Exercises of lesson h (h_your_own_model): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="h_your_own_model",
    title="h · Exercises: the residual add's two multipliers and average pooling's rounding division (练习: 量化你自己的模型)",
    goal="Write the integer arithmetic of the two new layers of lesson h as qnnpack runs it: the residual add's two "
         "multipliers on one shift, the integer-only add with its rounding shift, and average pooling's rounding "
         "division of the zero-point-corrected window sum.",
    oracle="`quantlab.ops` (bit-exact with PyTorch's qnnpack kernels)",
    setup='''\
# setup: torch, and the checker
import torch
import torch.nn.functional as F

from quantlab import check''',
    exercises=[
        ex(1, "add_multipliers", "the residual add's two multipliers on one shift",
           r"""
           The add $q_a = Z_a + \mathrm{round}\big(M_1 (q_1 - Z_1) + M_2 (q_2 - Z_2)\big)$ has two multipliers,
           $M_1 = f_{32}(S_1 / S_a)$ and $M_2 = f_{32}(S_2 / S_a)$ (float32 quotients). qnnpack writes both as integers on
           one power of two: with $e$ the binary exponent of the **larger** one ($2^e \le \max(M_1, M_2) < 2^{e+1}$, e.g.
           `torch.frexp(...).exponent - 1`), the shift is $s = 21 - e$ (so the larger lands in $[2^{21}, 2^{22})$) and
           $m_1 = \mathrm{round}(M_1 \cdot 2^s)$, $m_2 = \mathrm{round}(M_2 \cdot 2^s)$ (`torch.round` of the float32 product, which is exact). `scale_1`, `scale_2`,
           `scale_a` are float32 tensors of shape `()` with both ratios in $[2^{-14}, 2^{8})$. Return
           `(m_1, m_2, shift)` as three Python ints.""",
           '''
           def add_multipliers(scale_1, scale_2, scale_a):
               """(m_1, m_2, shift): the add's two multipliers as integers on one shift, Python ints."""''',
           '''
           M_1, M_2 = scale_1 / scale_a, scale_2 / scale_a                  # float32 quotients
           e = int(torch.frexp(torch.maximum(M_1, M_2)).exponent) - 1       # 2**e <= the larger < 2**(e + 1)
           shift = 21 - e                                                    # the larger * 2**shift in [2**21, 2**22)
           return int(torch.round(M_1 * 2.0**shift)), int(torch.round(M_2 * 2.0**shift)), shift'''),
        ex(2, "quantized_add", "the integer-only add",
           r"""
           $\mathrm{acc} = m_1 (q_1 - Z_1) + m_2 (q_2 - Z_2)$ exactly (in int64), then a right shift by $s$ that rounds
           half **away from zero** (qnnpack's: $\lfloor(|\mathrm{acc}| + 2^{s-1}) / 2^s\rfloor$ with the sign of acc), plus
           $Z_a$, clamped to $[q_{min}, q_{max}]$ (a fused ReLU passes $q_{min} = Z_a$):
           $$ q_a = \mathrm{clamp}\Big(Z_a + \mathrm{sign}(\mathrm{acc})\Big\lfloor \frac{|\mathrm{acc}| + 2^{s-1}}{2^s} \Big\rfloor,\ q_{min},\ q_{max}\Big) $$
           `q_1`, `q_2` are integer tensors of the same shape (any integer dtype, uint8 included), the zero points,
           multipliers, shift and limits Python ints. Return an int32 tensor.""",
           '''
           def quantized_add(q_1, q_2, zero_point_1, zero_point_2, zero_point_a, m_1, m_2, shift, quant_min, quant_max):
               """q_a (int32) of the residual add, with integers only."""''',
           '''
           acc = m_1 * (q_1.to(torch.int64) - zero_point_1) + m_2 * (q_2.to(torch.int64) - zero_point_2)
           shifted = (acc.abs() + 2 ** (shift - 1)) >> shift               # |acc| / 2**shift, ties away from zero
           q_a = zero_point_a + torch.where(acc >= 0, shifted, -shifted)
           return torch.clamp(q_a, quant_min, quant_max).to(torch.int32)'''),
        ex(3, "avg_pool", "average pooling's rounding division",
           r"""
           $k \times k$ windows with stride $k$ and `padding` $p$ on every side ($p \le k/2$; PyTorch's
           `F.avg_pool2d(x, k, k, p)`: rows and columns that do not fill a window are dropped). Padding is real 0,
           i.e. $q_x = Z_x$. The zero point comes off **before** the sum: $\mathrm{acc} = \sum_{\text{window}} (q_x - Z_x)$,
           exact. The window's size $n$ is $k^2$ when `count_include_pad` (PyTorch's default), else the number of input
           values in the window (the padding not counted), as in PyTorch's float `avg_pool2d` and quantlab's `QAvgPool2d`
           (PyTorch's quantized qnnpack kernel ignores `count_include_pad=False` and always divides by $k^2$). qnnpack
           divides by multiplying with the float32 multiplier
           $M = f_{32}\big(S_x / f_{32}(S_a\, n)\big)$ and rounds half to even, then adds $Z_a$:
           $$ q_a = \mathrm{clamp}\big(\mathrm{rne}(f_{32}(\mathrm{acc}) \cdot M) + Z_a,\ q_{min},\ q_{max}\big) $$
           `q_x` is an integer tensor `(N, C, H, W)`, `scale_x`, `scale_a` float32 tensors of shape `()`,
           `count_include_pad` a bool, the rest Python ints. Return an int32 tensor of `F.avg_pool2d`'s output shape.""",
           '''
           def avg_pool(q_x, zero_point_x, scale_x, scale_a, zero_point_a, kernel_size, padding, count_include_pad,
                        quant_min, quant_max):
               """q_a (int32) of a k x k average pool with stride k."""''',
           '''
           k, p = kernel_size, padding
           x = (q_x.to(torch.int64) - zero_point_x).to(torch.float64)        # q_x - Z_x: the padding adds real 0
           acc = F.avg_pool2d(x, k, k, p, divisor_override=1)                  # the window sums, exact in float64
           if count_include_pad:
               n = torch.full_like(acc, k * k)
           else:                                                               # the input values in each window
               n = F.avg_pool2d(torch.ones_like(x), k, k, p, divisor_override=1)
           M = scale_x / (scale_a * n.to(torch.float32))                       # f32(S_x / f32(S_a n)), qnnpack's
           q_a = torch.round(acc.to(torch.float32) * M) + zero_point_a         # half to even, then + Z_a
           return q_a.clamp(quant_min, quant_max).to(torch.int32)'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('add_multipliers', 'e = int(torch.frexp(torch.maximum(M_1, M_2)).exponent) - 1',
            'e = int(torch.frexp(torch.maximum(M_1, M_2)).exponent)',
            'lands in [2**21, 2**22)', 'shift off by one'),
    Mistake('add_multipliers', 'torch.maximum(M_1, M_2)',
            'torch.minimum(M_1, M_2)',
            'the larger multiplier', 'exponent of the smaller'),
    Mistake('add_multipliers', 'int(torch.round(M_2 * 2.0**shift))',
            'int(M_2 * 2.0**shift)',
            'int() truncates', 'm truncated'),
    Mistake('add_multipliers', 'M_1, M_2 = scale_1 / scale_a, scale_2 / scale_a',
            'M_1, M_2 = scale_1 * (1.0 / scale_a), scale_2 * (1.0 / scale_a)',
            'divide by S_a', 'reciprocal of S_a'),
    Mistake('add_multipliers', 'M_1, M_2 = scale_1 / scale_a, scale_2 / scale_a',
            'M_1, M_2 = scale_1.double() / scale_a.double(), scale_2.double() / scale_a.double()',
            'float32 quotients', 'float64 multipliers'),
    Mistake('add_multipliers', 'return int(torch.round(M_1 * 2.0**shift)), int(torch.round(M_2 * 2.0**shift)), shift',
            'return torch.round(M_1 * 2.0**shift), torch.round(M_2 * 2.0**shift), shift',
            'three Python ints', 'tensors, not ints'),
    Mistake('quantized_add', 'q_a = zero_point_a + torch.where(acc >= 0, shifted, -shifted)',
            'q_a = torch.where(acc >= 0, shifted, -shifted)',
            'add the output zero point', 'Z_a not added'),
    Mistake('quantized_add', 'torch.where(acc >= 0, shifted, -shifted)',
            '(acc >> shift)',
            'a plain >> rounds down', 'floor shift'),
    Mistake('quantized_add', 'torch.where(acc >= 0, shifted, -shifted)',
            '((acc + 2 ** (shift - 1)) >> shift)',
            'ties round away from zero', 'ties rounded up'),
    Mistake('quantized_add', 'm_1 * (q_1.to(torch.int64) - zero_point_1)',
            'm_1 * (q_1 - zero_point_1).to(torch.int64)',
            'wraps around in uint8', 'q - Z in uint8'),
    Mistake('quantized_add', 'return torch.clamp(q_a, quant_min, quant_max).to(torch.int32)',
            'return q_a.to(torch.int32)',
            'clamp to [quant_min, quant_max]', 'no clamp'),
    Mistake('quantized_add', 'return torch.clamp(q_a, quant_min, quant_max).to(torch.int32)',
            'return torch.clamp(q_a, quant_min, quant_max)',
            'the statement asks for int32', 'int64, not int32'),
    Mistake('avg_pool', 'x = (q_x.to(torch.int64) - zero_point_x).to(torch.float64)',
            'x = q_x.to(torch.float64)',
            'subtract the input\'s zero point', 'Z_x not subtracted'),
    Mistake('avg_pool', 'torch.round(acc.to(torch.float32) * M)',
            'torch.trunc(acc.to(torch.float32) * M)',
            'truncating', 'truncating division'),
    Mistake('avg_pool', 'torch.round(acc.to(torch.float32) * M)',
            'torch.floor(acc.to(torch.float32) * M + 0.5)',
            'half to even', 'ties rounded up'),
    Mistake('avg_pool', 'torch.round(acc.to(torch.float32) * M) + zero_point_a',
            'torch.round(acc.to(torch.float32) * M + zero_point_a)',
            'then add Z_a', 'Z_a added before rounding'),
    Mistake('avg_pool', 'M = scale_x / (scale_a * n.to(torch.float32))',
            'M = (scale_x / scale_a) / n.to(torch.float32)',
            'qnnpack\'s formula', "the reference kernel's multiplier"),
    Mistake('avg_pool', 'acc.to(torch.float32) * M)',
            'acc.to(torch.float64) * M.double())',
            'in float32', 'float64 product'),
    Mistake('avg_pool', 'if count_include_pad:',
            'if True:',
            'count_include_pad=False', 'count_include_pad ignored'),
    Mistake('avg_pool', 'acc = F.avg_pool2d(x, k, k, p, divisor_override=1)',
            'acc = F.avg_pool2d(x + zero_point_x, k, k, p, divisor_override=1) - zero_point_x * k * k',
            'padding is real 0', 'padding counted as q_x = 0'),
]
