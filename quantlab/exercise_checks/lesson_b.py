"""The checks of exercises/b_exercises.ipynb: the side of a conv's or max-pool's output, the parameters of a
(grouped) conv, and the inputs of fc with padded convs (notebook b_model). The oracle is PyTorch itself: its
conv and max-pool run on zeros (the shapes), its Conv2d built on the meta device (the parameters, no data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from .common import Case, Exercise, Mismatch, show


def python_int(e, g):
    """``g`` must be exactly a Python int (not a float, a bool or a tensor) equal to ``e``."""
    if type(g) is not int:
        return Mismatch(show(e), f"{show(g)} ({type(g).__name__})",
                        "return a Python int: floor division // keeps ints, / gives a float")
    return None if g == e else Mismatch(show(e), show(g))


def _torch_side(n, kernel_size, stride=1, padding=0, dilation=1):
    """The output side PyTorch's conv2d gives (run on zeros: at most 64 x 64, so it is cheap)."""
    x = torch.zeros(1, 1, n, n)
    w = torch.zeros(1, 1, kernel_size, kernel_size)
    return int(F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation).shape[-1])


def _b1():
    C = lambda n, k, s=1, p=0, d=1: dict(n=n, kernel_size=k, stride=s, padding=p, dilation=d)  # noqa: E731
    cases = [
        Case(C(28, 3)),
        Case(C(26, 2, 2), "the + 1 counts the first position of the kernel: floor((n + 2p - d(k-1) - 1) / "
                          "s) + 1 "
             "(26 -> 13 under a 2x2 pool with stride 2)"),
        Case(C(11, 2, 2), "round down (floor), as PyTorch's default ceil_mode=False: a 2x2 pool with "
                          "stride 2 "
             "turns 11 into 5, not 6"),
        Case(C(28, 3, 1, 1), "padding adds p zeros on each side: n + 2p (a 3x3 conv with padding 1 keeps "
                             "28)"),
        Case(C(28, 3, 1, 0, 2), "a dilated kernel spans d(k-1)+1 pixels: 28 -> 24 for k = 3, d = 2"),
        Case(C(7, 3, 2, 1)), Case(C(5, 5)), Case(C(13, 3, 3, 2, 2)),
    ]

    @st.composite
    def strat(draw):
        k, s, p, d = (draw(st.integers(1, 7)), draw(st.integers(1, 4)), draw(st.integers(0, 3)),
                      draw(st.integers(1, 3)))
        n = draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 64))
        return Case(C(n, k, s, p, d))

    return Exercise("b", 1, "conv_output_size", _torch_side, python_int, lambda: cases, strat,
                    "floor((n + 2 padding - dilation (kernel_size - 1) - 1) / stride) + 1, as a Python int")


def _b2():
    C = lambda ci, co, k, g=1, b=True: dict(c_in=ci, c_out=co, kernel_size=k, groups=g, bias=b)  # noqa: E731
    cases = [
        Case(C(3, 4, 1), "one bias per output channel: + C_out when bias=True"),
        Case(C(3, 4, 1, 1, False), "bias=False: the conv has no biases, only weights"),
        Case(C(1, 40, 3), "a k x k kernel has k^2 weights per (output, input) pair: 40 * 1 * 3^2 = 360"),
        Case(C(40, 40, 3, 20), "groups: each output channel reads only the C_in / g input channels of its "
                               "group "
             "(conv2: 40 * 2 * 9 weights)"),
        Case(C(8, 16, 5, 4)), Case(C(6, 12, 2, 3, False)), Case(C(4, 4, 3, 4)),
    ]

    @st.composite
    def strat(draw):
        g = draw(st.integers(1, 8))
        return Case(C(g * draw(st.integers(1, 8)), g * draw(st.integers(1, 8)), draw(st.integers(1, 7)), g,
                      draw(st.booleans())))

    def oracle(c_in, c_out, kernel_size, groups=1, bias=True):
        conv = nn.Conv2d(c_in, c_out, kernel_size, groups=groups, bias=bias, device="meta")
        return sum(p.numel() for p in conv.parameters())

    return Exercise("b", 2, "conv_param_count", oracle, python_int, lambda: cases, strat,
                    "C_out * (C_in / groups) * kernel_size^2 weights, plus C_out biases when bias")


def _b3():
    C = lambda side, p, ch: dict(side=side, padding=p, channels=ch)  # noqa: E731
    cases = [
        Case(C(30, 0, 1), "two blocks: conv1 + pool, then conv2 + pool (30 -> 28 -> 14 -> 12 -> 6)"),
        Case(C(28, 0, 1), "the pools round down: 11 -> 5 (use conv_output_size with kernel 2, stride 2)"),
        Case(C(28, 0, 40), "fc reads every channel: the final side squared times the channels (40 * 5 * 5)"),
        Case(C(28, 1, 40), "padding goes to the two convs; the pools have no padding (28 -> 28 -> 14 -> "
                           "14 -> 7)"),
        Case(C(32, 2, 20)), Case(C(10, 0, 3)),
    ]

    @st.composite
    def strat(draw):
        p = draw(st.integers(0, 3))
        return Case(C(draw(st.integers(max(1, 10 - 2 * p), 64)), p, draw(st.integers(1, 64))))

    def oracle(side=28, padding=0, channels=40):
        # PyTorch's conv1, pool, conv2, pool, flatten on zeros (conv2 depthwise: the same shapes, cheaper)
        x = torch.zeros(1, 1, side, side)
        x = F.max_pool2d(F.relu(F.conv2d(x, torch.zeros(channels, 1, 3, 3), padding=padding)), 2, 2)
        x = F.conv2d(x, torch.zeros(channels, 1, 3, 3), padding=padding, groups=channels)
        x = F.max_pool2d(F.relu(x), 2, 2)
        return int(torch.flatten(x, 1).shape[1])

    return Exercise("b", 3, "fc_in_features", oracle, python_int, lambda: cases, strat,
                    "apply conv_output_size for conv1 (3, padding), pool (2, stride 2), conv2, pool; "
                    "return channels * side * side")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_b1(), _b2(), _b3()]
