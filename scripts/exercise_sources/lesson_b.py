"""Exercises of lesson b (b_model): statements, stubs, worked solutions, and the mistakes the checker must
catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="b_model",
    title="b · Exercises: output sizes and parameter counts (练习: 模型)",
    goal="Compute what notebook b measured with PyTorch: the side of a conv's or a max-pool's output, the parameters "
         "of a (grouped) conv, and how many inputs `fc` needs when the convs are padded. The checks compare your "
         "numbers with PyTorch's own layers.",
    oracle="PyTorch's own layers (run on zeros, or built on the meta device)",
    setup='''\
# setup: torch, and the checker (check.run checks the functions defined so far in this notebook)
import torch

from quantlab import check''',
    exercises=[
        ex(1, "conv_output_size", "the side of a conv's or a max-pool's output",
           r"""
           A conv or a max-pool with a $k\times k$ kernel (`kernel_size`), stride $s$, $p$ zeros of padding on *each*
           side and dilation $d$ (the kernel's taps $d$ pixels apart, so it spans $d(k-1)+1$ pixels) turns a side of
           $n$ pixels into
           $$ n_{out} = \left\lfloor \frac{n + 2p - d\,(k-1) - 1}{s} \right\rfloor + 1 $$
           the number of positions of the kernel that fit, rounded down as PyTorch's `Conv2d` and `MaxPool2d` (whose
           default `ceil_mode=False`) do. Notebook b's layers: a 3×3 conv without padding, 28 → 26; a 2×2 max-pool with
           stride 2, 26 → 13 and 11 → 5. Return a Python int; the inputs always leave $n_{out} \ge 1$.""",
           '''
           def conv_output_size(n, kernel_size, stride=1, padding=0, dilation=1):
               """The side of the output (a Python int) of a conv or max-pool on a side of n pixels."""''',
           '''
           return (n + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1'''),
        ex(2, "conv_param_count", "the parameters of a conv",
           r"""
           A conv with $C_{in}$ input and $C_{out}$ output channels, a $k\times k$ kernel and $g$ groups (`groups`; both
           channel counts are divisible by $g$) has
           $$ C_{out}\cdot\frac{C_{in}}{g}\cdot k^2 $$
           weights, since each output channel reads only the $C_{in}/g$ input channels of its group, and $C_{out}$
           biases when `bias` is true. Notebook b: conv1
           $(1, 40, 3)$ has $360 + 40$, conv2 $(40, 40, 3, g = 20)$ has $720 + 40$. Return a Python int (what
           `sum(p.numel() for p in layer.parameters())` gives for `torch.nn.Conv2d(c_in, c_out, kernel_size,
           groups=groups, bias=bias)`).""",
           '''
           def conv_param_count(c_in, c_out, kernel_size, groups=1, bias=True):
               """The number of parameters (a Python int) of Conv2d(c_in, c_out, kernel_size, groups=, bias=)."""''',
           '''
           weights = c_out * (c_in // groups) * kernel_size * kernel_size
           return weights + (c_out if bias else 0)'''),
        ex(3, "fc_in_features", "how many inputs `fc` needs",
           r"""
           `Net` (notebook b) is conv1 (3×3, stride 1) → ReLU → 2×2 max-pool (stride 2) → conv2 (3×3, stride 1) →
           ReLU → 2×2 max-pool (stride 2) → flatten → `fc`. Give both convs `padding` zeros on each side (the pools
           keep none; ReLU keeps the shape): for a `side`×`side` input, how many inputs does `fc` need? It is
           `channels` (40 in `Net`) times the final side squared: $40\cdot 5^2 = 1000$ for `side=28, padding=0`.
           Use your `conv_output_size` (b1) for every conv and pool. Return a Python int.""",
           '''
           def fc_in_features(side=28, padding=0, channels=40):
               """The inputs of fc (a Python int) when both convs of Net have `padding`, for a side x side input."""''',
           '''
           for _ in range(2):                                    # conv1 + pool, then conv2 + pool
               side = conv_output_size(side, 3, padding=padding)   # 3x3 conv, stride 1
               side = conv_output_size(side, 2, stride=2)          # 2x2 max-pool, stride 2, no padding
           return channels * side * side'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('conv_output_size', '- 1) // stride + 1',
            ') // stride',
            'the first position of the kernel', 'the - 1 and + 1 left out'),
    Mistake('conv_output_size', 'return (n + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1',
            'return -(-(n + 2 * padding - dilation * (kernel_size - 1) - 1) // stride) + 1',
            'round down (floor)', 'ceil instead of floor'),
    Mistake('conv_output_size', '(n + 2 * padding', '(n + padding',
            'on each side: n + 2p', 'padding once'),
    Mistake('conv_output_size', 'dilation * (kernel_size - 1)', '(kernel_size - 1)',
            'spans d(k-1)+1 pixels', 'dilation ignored'),
    Mistake('conv_output_size', '// stride + 1', '/ stride + 1',
            'return a Python int', 'float from /'),
    Mistake('conv_param_count', 'return weights + (c_out if bias else 0)', 'return weights',
            'one bias per output channel', 'bias forgotten'),
    Mistake('conv_param_count', 'return weights + (c_out if bias else 0)', 'return weights + c_out',
            'bias=False', 'bias counted when bias=False'),
    Mistake('conv_param_count', 'c_out * (c_in // groups) *', 'c_out * c_in *',
            'only the C_in / g input channels of its group', 'groups ignored'),
    Mistake('conv_param_count', '* kernel_size * kernel_size', '* kernel_size',
            'k^2 weights', 'k instead of k^2'),
    Mistake('fc_in_features', 'for _ in range(2):', 'for _ in range(1):',
            'two blocks', 'one conv + pool block'),
    Mistake('fc_in_features', 'side = conv_output_size(side, 2, stride=2)', 'side = -(-side // 2)',
            'the pools round down', 'pool rounds up'),
    Mistake('fc_in_features', 'return channels * side * side', 'return side * side',
            'times the channels', 'channels forgotten'),
    Mistake('fc_in_features', 'conv_output_size(side, 2, stride=2)', 'conv_output_size(side, 2, stride=2, padding=padding)',
            'the pools have no padding', 'pools padded'),
]
