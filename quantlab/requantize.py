"""The integer side of a weighted layer: the requantization multiplier, the exact accumulator and
requantization (float32 multiplier as qnnpack, or Q31 fixed point as TFLite).

``_IntegerInference`` is a mixin of :class:`quantlab.weighted._QWeighted` that reads the frozen
integers (``weight_int``, ``bias_int``, ``multiplier``, ``quantized_multiplier``, ``shift``)::

    acc   = sum (q_x - Z_x)(q_w - Z_w)       exact integer sum (float32 when < 2**24, else float64)
    q_y   = clamp(rne(f32(acc + q_b) * M) + Z_y)   M = f32(f32(S_w * S_x) * f32(1 / S_y))

Taught in notebooks ``d_post_training_quantize`` and ``e_conv_quantization_walkthrough``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fixed_point import multiply_by_quantized_multiplier
from .observer import QParam
from .qmodule import FLOAT32_EXACT, INT32_MAX, INT32_MIN, check_integer_input

#: how freeze() computes the float32 requantization multiplier M from the scales
MULTIPLIER_FORMULAS = ("qnnpack", "onnxruntime")


def check_multiplier_formula(multiplier) -> str:
    """Return ``multiplier`` if it names a formula of :data:`MULTIPLIER_FORMULAS`, else raise."""
    if not isinstance(multiplier, str):
        raise TypeError(f"multiplier must be one of {MULTIPLIER_FORMULAS}; got {multiplier!r}")
    if multiplier not in MULTIPLIER_FORMULAS:
        raise ValueError(f"multiplier must be one of {MULTIPLIER_FORMULAS}; got {multiplier!r}")
    return multiplier


def requantization_multiplier(s_x, s_w, s_y, multiplier: str = "qnnpack") -> torch.Tensor:
    """The float32 multiplier ``M = S_x * S_w / S_y`` as an engine computes it.

    ``"qnnpack"``: ``f32(f32(S_w * S_x) * f32(1 / S_y))`` (PyTorch's qnnpack, quantlab's default);
    ``"onnxruntime"``: ``f32(f32(S_x * S_w) / S_y)`` (ONNX Runtime's QLinearConv/QLinearMatMul).
    """
    check_multiplier_formula(multiplier)
    s_x, s_w, s_y = (torch.as_tensor(v, dtype=torch.float32) for v in (s_x, s_w, s_y))
    if multiplier == "qnnpack":
        return (s_w * s_x) * (1.0 / s_y)
    return (s_x * s_w) / s_y


def relu6_limit(qparam: QParam) -> int:
    """The integer of real 6 on ``qparam``'s grid, clamped to its range:
    ``min(Z + rne(f32(6 * f32(1 / S))), quant_max)`` (as PyTorch's quantized relu6)."""
    six = torch.round(torch.tensor(6.0) * (1.0 / qparam.scale.to(torch.float32)))
    return min(int(qparam.zero_point) + int(six), qparam.quant_max)


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for a tensor of ``ndim`` dims with channels on axis 1."""
    return v.reshape([1, -1] + [1] * (ndim - 2)) if v.dim() == 1 else v


def _weight_view(zero_point: torch.Tensor, ndim: int) -> torch.Tensor:
    """Z_w as int64, (C,) -> (C, 1, ...) to broadcast over a weight of ``ndim`` dims."""
    zp = zero_point.to(torch.int64)
    return zp.reshape([-1] + [1] * (ndim - 1)) if zp.dim() else zp



class _IntegerInference:
    """accumulate -> requantize -> add_zero_point_and_clamp, and the bounds that prove the
    accumulator exact (a mixin: the layer provides ``_op``, ``q_in``, ``q_w``, ``q_out``, ``relu``,
    ``relu6``, ``fixed_point``, ``_channel_shape`` and the frozen integers)."""

    def _accumulator_bounds(self, weight_int: torch.Tensor) -> torch.Tensor:
        """Per output channel: ``sum_k |q_w - Z_w| * max(|q_min - Z_x|, |q_max - Z_x|)``."""
        zp = self.q_w.zero_point.to(torch.int64)
        zp = zp.reshape([-1] + [1] * (weight_int.dim() - 1)) if zp.dim() else zp
        w = (weight_int.to(torch.int64) - zp).abs()
        zx = int(self.q_in.zero_point)
        x_max = max(abs(self.q_in.quant_min - zx), abs(self.q_in.quant_max - zx))
        return w.flatten(1).sum(1) * x_max

    @property
    def weight_zero_point(self) -> torch.Tensor:
        """Z_w broadcast over the weight's output channels (0 for symmetric per-channel)."""
        return _weight_view(self.q_w.zero_point, self.weight_int.dim())

    def accumulator_bound(self) -> int:
        """An upper bound on |acc| for any input in q_in's range (without the bias):
        ``max_c sum_k |q_w - Z_w| * max(|q_min - Z_x|, |q_max - Z_x|)``.

        It treats every product as if its two factors' signs could line up, so it is not always
        reached: after a ReLU (Z_x = 0, q_x - Z_x >= 0) weights of both signs partly cancel, and
        the largest reachable |acc| is ``q_max * max_c max(sum_k (q_w - Z_w)+, sum_k (q_w - Z_w)-)``."""
        self._check_frozen()
        return int(self._accumulator_bounds(self.weight_int).max())

    @property
    def acc_dtype(self) -> torch.dtype:
        """float32 when the accumulator bound proves it exact (< 2**24), else float64."""
        if getattr(self, "_acc_dtype", None) is None:
            bound = self.accumulator_bound()
            exact32 = bound < FLOAT32_EXACT
            self._acc_dtype = torch.float32 if exact32 else torch.float64
            # acc + bias exact in float32 too: requantize can skip float64
            self._sum_exact32 = exact32 and bound + int(self.bias_int.abs().max()) < FLOAT32_EXACT
        return self._acc_dtype

    # -- integer inference -------------------------------------------------------------------
    def accumulate(self, q_x: torch.Tensor) -> torch.Tensor:
        """``sum (q_x - Z_x)(q_w - Z_w)``: exact integers held in float32 or float64."""
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        self._check_input_shape(q_x, "q_x")
        dt = self.acc_dtype  # exact: every partial sum is bounded by accumulator_bound()
        # q_x and Z_x (at most 16 bits) are exact in float32, and so is their difference
        x = q_x.to(dt) - float(self.q_in.zero_point)
        w = (self.weight_int.to(torch.int64) - self.weight_zero_point).to(dt)
        return self._op(x, w, None)

    def requantize(self, acc: torch.Tensor) -> torch.Tensor:
        """int32 output from the exact accumulator: + bias, * M, round, + Z_y, clamp (ReLU)."""
        if (not self.fixed_point and acc.dtype == torch.float32 and self.acc_dtype == torch.float32
                and self._sum_exact32):
            # the same float32 values as _requantize's float64 detour: acc + bias < 2**24 is
            # exact in float32 (freeze's bounds), then qnnpack's f32 product and RNE
            ch = self._channel_shape
            y = torch.round((acc + self.bias_int.reshape(ch).to(torch.float32))
                            * self.multiplier.to(torch.float32).reshape(ch))
            return self.add_zero_point_and_clamp(y)
        return self._requantize(acc, self.bias_int, self.multiplier, self.quantized_multiplier,
                                self.shift)

    def _requantize(self, acc, bias_int, multiplier, quantized_multiplier, shift):
        # per-channel vectors broadcast over the trailing dims: (C, 1, 1) for a conv's (N, C, H, W)
        # or unbatched (C, H, W) output, (C,) for a linear layer's (..., C) output
        ch = self._channel_shape
        acc = acc.to(torch.float64) + bias_int.reshape(ch).to(torch.float64)
        if self.fixed_point:
            # a frozen layer: freeze() proved |acc + bias| <= 2**31 - 1 (a violation raises there);
            # QAT's simulation (_simulate) has no such proof: the clamp is int32's saturation
            acc = torch.clamp(acc, INT32_MIN, INT32_MAX).to(torch.int64)
            y = multiply_by_quantized_multiplier(acc, quantized_multiplier.reshape(ch),
                                                 shift.reshape(ch))
            y = y.to(torch.float32)
        else:
            # qnnpack: the int32 accumulator converted to float32, times the f32 multiplier, RNE
            y = torch.round(acc.to(torch.float32) * multiplier.to(torch.float32).reshape(ch))
        return self.add_zero_point_and_clamp(y)

    def add_zero_point_and_clamp(self, y: torch.Tensor) -> torch.Tensor:
        """``clamp(y + Z_y)`` as int32; a fused ReLU is the clamp at ``Z_y``, a fused ReLU6 also
        the clamp at ``relu6_limit``: ``Z_y + rne(f32(6 * f32(1 / S_y)))``."""
        y = y + float(self.q_out.zero_point)
        low = float(self.q_out.zero_point) if self.relu else self.q_out.quant_min
        high = self.q_out.quant_max
        if self.relu and self.relu6:
            high = min(high, relu6_limit(self.q_out))
        return torch.clamp(y, max(low, self.q_out.quant_min), high).to(torch.int32)

    def quantize_inference(self, q_x: torch.Tensor, pool: tuple[int, int] | None = None):
        """int32 input -> int32 output, integer arithmetic only.

        Args:
            q_x: integers in q_in's range, e.g. ``self.q_in.quantize_tensor(x)``, of any shape the
                float layer accepts (a conv: (N, C, H, W) or unbatched (C, H, W); a linear layer:
                (..., in_features)); the output has the float layer's output shape.
            pool: ``(kernel_size, stride)`` of a max-pool to apply to the accumulators before
                requantizing. Requantization is monotonic per channel, so this gives the same
                integers as pooling afterwards, with 4x less requantization work.
        """
        acc = self.accumulate(q_x)
        if pool is not None:
            acc = F.max_pool2d(acc, pool[0], pool[1])
        return self.requantize(acc)
