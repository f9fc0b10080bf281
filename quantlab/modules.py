"""Quantized layers: calibrate -> ``freeze()`` -> ``quantize_inference()`` with integers only.

Each layer wraps a float layer and holds ``QParam`` s: ``q_in`` (input), ``q_w`` (weight) and
``q_out`` (output); its life cycle is the original series' (``QModule``). This module is the door
to them all; each idea lives in a file of its own:

- :mod:`quantlab.qmodule`: the life cycle every layer shares (``QModule``, ``calibration_mode``,
  the checks of integer inputs, checkpoint loading);
- :mod:`quantlab.weighted`: ``QConv2d``, ``QLinear``, ``QConvBNReLU`` (BN folding, the int32 bias,
  ``freeze``), with :mod:`quantlab.qat_simulation` (their float forward: calibration, fake
  quantization, QAT's exact simulation) and :mod:`quantlab.requantize` (their integer side:
  the multiplier, the exact accumulator, requantization);
- below: the layers without weights of their own (``QReLU``, ``QMaxPool2d``, ``QFlatten``); more in
  :mod:`quantlab.ops`.

Taught in notebooks ``d_post_training_quantize`` and ``e_conv_quantization_walkthrough``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_int
from .observer import QParam
from .qmodule import (  # noqa: F401  (the public names of quantlab.modules)
    FLOAT32_EXACT,
    INT32_MAX,
    INT32_MIN,
    INT64_BIAS_MAX,
    QModule,
    _copy_qparam,
    calibration_mode,
    check_integer_input,
)
from .requantize import (  # noqa: F401
    MULTIPLIER_FORMULAS,
    check_multiplier_formula,
    relu6_limit,
    requantization_multiplier,
)
from .weighted import QConv2d, QConvBNReLU, QLinear, _QWeighted, fold_bn  # noqa: F401


class _QUnweighted(QModule):
    """A layer without weights or qparams of its own: its output uses its input's qparams."""

    def __init__(self, num_bits: int = 8):
        super().__init__(qi=False, qo=False, num_bits=num_bits)

    def freeze(self, q_in: QParam | None = None):
        """Take the previous layer's output QParam as this layer's input (and output) qparams."""
        self._take_q_in(q_in)
        self._mark_frozen()
        return self

    def quantize_inference(self, q_x):
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        self._check_input_shape(q_x, "q_x")
        return self._integer_op(q_x)

    def _check_input_shape(self, q_x, name):
        pass


class QReLU(_QUnweighted):
    """ReLU on quantized values: ``max(q, Z)``, a clamp at the zero point of its input."""

    def forward(self, x):
        return F.relu(x)

    def integer_range(self) -> tuple[int, int]:
        """The clamp on the integers, ``[Z, quant_max]`` (the export writes it as a Clip)."""
        return int(self.q_in.zero_point), self.q_in.quant_max

    def _integer_op(self, q_x):
        return torch.clamp(q_x.to(torch.int32), min=int(self.q_in.zero_point))


def _square(value, name: str):
    """``(k, k)`` -> ``k`` (nn.MaxPool2d's pairs); a pair of two different sizes raises."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints (square pooling); "
                             f"got {tuple(value)}")
        return value[0]
    return value


class QMaxPool2d(_QUnweighted):
    """Max-pooling on the integers (max commutes with any increasing map, so q and r agree)."""

    def __init__(self, kernel_size=2, stride=None, padding=0, num_bits: int = 8):
        kernel_size, stride, padding = (_square(v, name) for v, name in (
            (kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding")))
        kernel_size = check_int(kernel_size, "kernel_size", 1)
        stride = None if stride is None else check_int(stride, "stride", 1)
        padding = check_int(padding, "padding", 0, kernel_size // 2)
        super().__init__(num_bits)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def _check_input_shape(self, q_x, name):
        if q_x.dim() not in (3, 4) or min(q_x.shape[-2:]) + 2 * self.padding < self.kernel_size:
            raise ValueError(f"{name} must have shape (N, C, H, W) or (C, H, W) with H, W >= "
                             f"kernel_size={self.kernel_size}; got {tuple(q_x.shape)}")

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def _integer_op(self, q_x):
        # float32 holds the integers of any num_bits <= 16 exactly
        out = F.max_pool2d(q_x.to(torch.float32), self.kernel_size, self.stride, self.padding)
        return out.to(torch.int32)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class QFlatten(_QUnweighted):
    """``torch.flatten(x, 1)`` for float and integer tensors alike."""

    def forward(self, x):
        return torch.flatten(x, 1)

    def _check_input_shape(self, q_x, name):
        if q_x.dim() < 2:
            raise ValueError(f"{name} must have a batch dimension (at least 2-d); got "
                             f"{tuple(q_x.shape)}")

    def _integer_op(self, q_x):
        return torch.flatten(q_x, 1)
