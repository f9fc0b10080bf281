"""Quantized weighted layers (QConv2d, QLinear, QConvBNReLU): calibrate -> ``freeze()`` ->
``quantize_inference()`` with integers only.

Each layer wraps a float layer and holds ``QParam`` s: ``q_in`` (input), ``q_w`` (weight) and
``q_out`` (output). Its life cycle is the original series':

1. ``forward(x)`` on float input observes ranges (calibration, or QAT) and returns the
   fake-quantized float output;
2. ``freeze(q_in=None)`` computes the integer weights, the int32 bias and the requantization
   multipliers;
3. ``quantize_inference(q_x)`` maps int32 input to int32 output with integer arithmetic only::

       acc   = sum (q_x - Z_x)(q_w - Z_w)       exact integer sum
       acc  += q_b                              int32 bias, scale S_x*S_w, zero point 0
       q_y   = clamp(round(M * acc) + Z_y)      M = S_x*S_w/S_y per output channel

Weights: ``per_channel=True`` is symmetric int8 per output channel (the production way),
``per_channel=False`` affine int8 per tensor (the original's way; Z_w != 0). Activations: affine
unsigned. Requantization: float multiplier (QNNPACK, ONNX Runtime) or, with ``fixed_point=True``,
a Q31 integer multiplier and a rounding shift (TFLite, gemmlowp).

The float32 steps that make the integers bit-exact with PyTorch's qnnpack kernels (NUMERICS.md)::

    q_b = rne(f32(b * f32(1 / f32(S_x * S_w))))        (as at::quantize_per_tensor of the bias)
    M   = f32(f32(S_w * S_x) * f32(1 / S_y))           (as qnnpack's requantization scales)
    q_y = rne(f32(acc) * M) + Z_y, clamped

Nothing is clamped silently: ``freeze()`` refuses (ValueError naming the layer and channel) a bias
integer beyond int32 (qnnpack saturates it to 2**31 - 1 without a word: a bias of 30.0 measured as
5.0 on an all-zero channel), except on all-zero weight channels, whose weight scale it widens so the
bias fits (exact; ONNX Runtime's and TFLite's quantizers widen any channel's weight scale instead,
trading weight precision). Above 8 bits the bias is int64 (TFLite's 16x8 kernels). With
``fixed_point=True`` it refuses a layer whose ``|acc + bias|`` can exceed int32.

``multiplier="onnxruntime"`` computes ``M = f32(f32(S_x * S_w) / S_y)`` instead, as ONNX Runtime's
QLinearConv does: the two differ in the last bit for some scales, which moves an output by 1 LSB
when its exact value lies on a near-tie (notebook ``g_deploy``).

Taught in notebooks ``d_post_training_quantize`` and ``e_conv_quantization_walkthrough``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_bool, check_float_tensor, check_real
from .fixed_point import quantize_multiplier
from .observer import QParam
from .qat_simulation import _SimulatedForward
from .qmodule import INT32_MAX, INT64_BIAS_MAX, QModule, _check_conv_input
from .requantize import _IntegerInference, check_multiplier_formula, requantization_multiplier


class _QWeighted(_SimulatedForward, _IntegerInference, QModule):
    """Shared code of QConv2d / QLinear / QConvBNReLU: a weighted layer with optional fused ReLU."""

    _frozen_buffers = ("weight_int", "bias_int", "multiplier", "quantized_multiplier", "shift")

    def __init__(self, qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant,
                 multiplier="qnnpack"):
        super().__init__(qi, qo, num_bits, averaging_constant)
        per_channel = check_bool(per_channel, "per_channel")
        relu, fixed_point = check_bool(relu, "relu"), check_bool(fixed_point, "fixed_point")
        #: the formula freeze() uses for M (see requantization_multiplier)
        self.multiplier_formula = check_multiplier_formula(multiplier)
        self.per_channel, self.relu, self.fixed_point = per_channel, relu, fixed_point
        # weights always follow the current float weights (averaging_constant=1)
        self.q_w = QParam(num_bits, signed=True, symmetric=per_channel,
                          axis=0 if per_channel else None, averaging_constant=1.0)

    # -- to be provided by subclasses ------------------------------------------------------
    def float_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _op(self, x, w, b):
        raise NotImplementedError

    #: how a per-output-channel vector broadcasts against the layer's output (trailing dims)
    _channel_shape: tuple[int, ...] = (-1,)

    def _check_input_shape(self, q_x: torch.Tensor, name: str):
        """Raise unless ``q_x`` has a shape the float layer accepts."""

    # -- freeze ------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, q_in: QParam | None = None, q_out: QParam | None = None,
               multiplier: str | None = None):
        """Integer weights, int32 bias and requantization multipliers from the observed qparams.

        Args:
            q_in: the previous layer's output QParam, required when built with ``qi=False``.
            q_out: an output QParam to use instead of our own (rarely needed).
            multiplier: ``"qnnpack"`` or ``"onnxruntime"``, the formula of the float32
                multiplier (None: the layer's ``multiplier_formula``, "qnnpack" by default).
        """
        if multiplier is not None:
            self.multiplier_formula = check_multiplier_formula(multiplier)
        self._take_q_in(q_in)
        q_out = self._take_q_out(q_out)
        w, b = self.float_weight_bias()
        w = check_float_tensor(w.detach(), f"{self.label()}'s weight").to(torch.float32)
        if b is None:
            b = torch.zeros(w.shape[0])
        b = check_float_tensor(b.detach(), f"{self.label()}'s bias").to(torch.float32)
        self.q_w.update(w)
        self._widen_zero_channels(w, b)
        weight_int = self.q_w.quantize_tensor(w)                  # exactly q_w's integers
        bias_scale = self.q_w.scale * self.q_in.scale             # f32(S_w * S_x), per channel
        q_b = torch.round(b * (1.0 / bias_scale))                 # f32 reciprocal, RNE
        self._check_bias_fits(q_b, b, bias_scale)                 # exact or refuse: no clamp
        bias_int = q_b.to(torch.int64).expand(w.shape[0]).contiguous()
        multiplier = requantization_multiplier(self.q_in.scale, self.q_w.scale, q_out.scale,
                                               self.multiplier_formula).expand(w.shape[0])
        multiplier = multiplier.contiguous()
        try:
            pairs = [quantize_multiplier(m) for m in multiplier.double().tolist()]
        except ValueError as e:
            raise ValueError(f"{self.label()}: requantization multiplier S_x*S_w/S_y out of range "
                             f"({e})") from None
        if self.fixed_point:
            self._check_fixed_point_accumulator(weight_int, bias_int)
        self.weight_int, self.bias_int, self.multiplier = weight_int, bias_int, multiplier
        self.quantized_multiplier = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        self.shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        self._acc_dtype = None
        self._mark_frozen()
        return self

    @property
    def bias_limit(self) -> int:
        """Largest |bias integer|: int32 up to 8 bits (qnnpack, ONNX Runtime, TFLite int8);
        above 8 bits an int64 bias as TFLite's 16x8 kernels (kept below 2**52, exact in float64)."""
        return INT32_MAX if self.num_bits <= 8 else INT64_BIAS_MAX

    def _widen_zero_channels(self, w: torch.Tensor, b: torch.Tensor):
        """An all-zero weight channel has its scale floored at eps, so an ordinary bias would not
        fit the int32 bias (b / (S_x * eps) > 2**31). Any scale represents zero weights exactly:
        widen that channel's weight scale until its bias fits (ONNX Runtime's quantizer widens
        weight scales for the same reason). Exact: the channel's integers stay 0 (= Z_w)."""
        limit = self.bias_limit
        per_channel = self.q_w.axis is not None
        zero = (w.flatten(1) == 0).all(1) if per_channel else (w == 0).all().expand(w.shape[0])
        needed = b.double().abs() / (float(self.q_in.scale) * (limit / 2))  # half: margin
        widen = zero & (needed > self.q_w.scale.double())
        if not bool(widen.any()):
            return
        levels = self.q_w.quant_max - self.q_w.quant_min
        if per_channel:
            amax = (needed * levels).to(torch.float32)
            self.q_w.set_range(torch.where(widen, -amax, self.q_w.min_val),
                               torch.where(widen, amax, self.q_w.max_val))
        else:
            amax = float(needed.max()) * levels
            self.q_w.set_range(-amax, amax)
        channels = torch.nonzero(widen).flatten().tolist()
        warnings.warn(f"{self.label()}: output channel(s) {channels[:10]} have all-zero weights and "
                      "a bias that would not fit the int32 bias at the floored weight scale; their "
                      "weight scale was widened (exact: their weight integers stay at the zero "
                      "point)", UserWarning, stacklevel=3)

    def _check_bias_fits(self, q_b: torch.Tensor, b: torch.Tensor, bias_scale: torch.Tensor):
        """Refuse, naming the layer and channels, a bias integer beyond :attr:`bias_limit`
        (qnnpack would saturate it to int32 and then wrap in its int32 accumulator)."""
        limit = self.bias_limit
        over = ~(q_b.double().abs() <= limit)  # compared in float64: f32(2**31 - 1) is 2**31
        if not bool(over.any()):
            return
        chs = torch.nonzero(over).flatten().tolist()
        c = chs[0]
        scale_c = float(bias_scale.expand(b.shape[0])[c])
        kind = "int32" if limit == INT32_MAX else "int64 (2**52)"
        raise ValueError(
            f"{self.label()}: the bias of output channel(s) {chs[:10]} does not fit the {kind} bias "
            f"of a {self.num_bits}-bit layer: channel {c} has b = {float(b[c]):.6g} and "
            f"S_x * S_w = {scale_c:.3g}, so b / (S_x * S_w) = {float(q_b[c]):.4g} > {limit}; the "
            f"largest bias it can hold is {limit * scale_c:.4g}. Its weight scale is tiny "
            f"(weights near zero) or the bits are many: retrain or prune that channel, or "
            f"quantize with per_channel=False or fewer bits")

    def _check_fixed_point_accumulator(self, weight_int: torch.Tensor, bias_int: torch.Tensor):
        """fixed_point=True requantizes int32 accumulators (TFLite): refuse a layer whose
        |acc + bias| can exceed int32 (16-bit layers, very long dot products)."""
        bound = self._accumulator_bounds(weight_int) + bias_int.abs()
        if int(bound.max()) > INT32_MAX:
            c = int(bound.argmax())
            raise ValueError(
                f"{self.label()}: fixed_point=True needs |acc + bias| <= 2**31 - 1 (an int32 "
                f"accumulator), but output channel {c} can reach {int(bound[c])} "
                f"({self.num_bits}-bit, {weight_int[0].numel()} inputs per output). Use "
                f"fixed_point=False (float requantization of the exact accumulator) or fewer bits")


class QConv2d(_QWeighted):
    """Quantized ``nn.Conv2d``: ``QConv2d(conv, qi, qo, num_bits, per_channel)`` as the original.

    Extra keyword arguments: ``relu`` (fuse a following ReLU: the output range is observed after
    it and the ReLU becomes the clamp at Z_y), ``fixed_point`` (integer-only requantization),
    ``averaging_constant`` (moving-average activation ranges for QAT), ``multiplier``
    (``"qnnpack"`` or ``"onnxruntime"``: the formula of the float32 requantization multiplier).
    """

    def __init__(self, conv: nn.Conv2d, qi: bool = True, qo: bool = True, num_bits: int = 8,
                 per_channel: bool = False, *, relu: bool = False, fixed_point: bool = False,
                 averaging_constant: float | None = None, multiplier: str = "qnnpack"):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("conv must use numeric zero padding (padding_mode='zeros')")
        super().__init__(qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant,
                         multiplier)
        self.conv = conv

    _channel_shape = (-1, 1, 1)

    def _check_input_shape(self, q_x, name):
        _check_conv_input(self.conv, q_x, name)

    def float_weight_bias(self):
        return self.conv.weight, self.conv.bias

    def _op(self, x, w, b):
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


class QLinear(_QWeighted):
    """Quantized ``nn.Linear``: ``QLinear(fc, qi, qo, num_bits, per_channel)``."""

    def __init__(self, fc: nn.Linear, qi: bool = True, qo: bool = True, num_bits: int = 8,
                 per_channel: bool = False, *, relu: bool = False, fixed_point: bool = False,
                 averaging_constant: float | None = None, multiplier: str = "qnnpack"):
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"fc must be a torch.nn.Linear; got {type(fc).__name__}")
        super().__init__(qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant,
                         multiplier)
        self.fc = fc

    def _check_input_shape(self, q_x, name):
        if q_x.dim() < 1 or q_x.shape[-1] != self.fc.in_features:
            raise ValueError(f"{name} must have shape (..., {self.fc.in_features}) for this linear "
                             f"layer; got {tuple(q_x.shape)}")

    def float_weight_bias(self):
        return self.fc.weight, self.fc.bias

    def _op(self, x, w, b):
        return F.linear(x, w, b)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
            var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Fold a BatchNorm into the preceding conv: ``w' = w * gamma / sqrt(var + eps)``,
    ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``."""
    check_float_tensor(weight, "weight")
    c = weight.shape[0]
    for name, v in (("mean", mean), ("var", var), ("gamma", gamma), ("beta", beta)) + \
            ((("bias", bias),) if bias is not None else ()):
        if check_float_tensor(v, name).shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), one per output channel; got "
                             f"{tuple(v.shape)}")
    if bool((var < 0).any()):
        raise ValueError("var must be >= 0 (a variance)")
    eps = check_real(eps, "eps", 0.0, low_open=True)
    if var.requires_grad:
        std = torch.sqrt(var + eps)
    else:  # NumPy's float32 sqrt is correctly rounded; torch.sqrt may go through MKL's vector
        # math, whose result changes with MKL_ENABLE_INSTRUCTIONS (one ulp: NetBN's calibrated
        # scales then differed between CPUs, tests/test_modules.py)
        std = torch.from_numpy(np.sqrt((var + eps).detach().cpu().numpy())).to(var.device)
    factor = gamma / std
    w = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
    b = beta + ((bias if bias is not None else torch.zeros_like(mean)) - mean) * factor
    return w, b


class QConvBNReLU(_QWeighted):
    """Conv2d + BatchNorm2d (+ ReLU) with the BN folded into the conv's weights and bias.

    In eval mode (calibration, freeze) the BN's running statistics are folded. In train mode
    (QAT), PyTorch's recipe: the weights folded with the running statistics are fake-quantized,
    the conv output is unscaled and BN normalizes it with the batch statistics (updating the
    running ones). With ``freeze_bn_stats = True`` training folds the running statistics exactly
    as inference does (BN statistics frozen).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, qi: bool = True, qo: bool = True,
                 num_bits: int = 8, per_channel: bool = False, *, relu: bool = True,
                 fixed_point: bool = False, averaging_constant: float | None = None,
                 multiplier: str = "qnnpack"):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
            raise TypeError(f"bn must be a BatchNorm2d({conv.out_channels}); got {bn!r}")
        if not bn.affine or not bn.track_running_stats or bn.running_var is None:
            raise ValueError(f"bn must have affine=True and track_running_stats=True (folding needs "
                             f"its weight, bias and running statistics); got {bn!r}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("conv must use numeric zero padding (padding_mode='zeros')")
        super().__init__(qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant,
                         multiplier)
        self.conv, self.bn = conv, bn
        #: fold the running statistics during training too (BN statistics frozen)
        self.freeze_bn_stats = False

    _channel_shape = (-1, 1, 1)

    def _check_input_shape(self, q_x, name):
        _check_conv_input(self.conv, q_x, name)

    def float_weight_bias(self):
        bn = self.bn
        return fold_bn(self.conv.weight, self.conv.bias, bn.running_mean, bn.running_var,
                       bn.weight, bn.bias, bn.eps)

    def _op(self, x, w, b):
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.freeze_bn_stats:
            return super().forward(x)
        # PyTorch's recipe (torch.ao.nn.intrinsic.qat.ConvBn2d): quantize the weights folded with
        # the running statistics (stable), undo the scaling after the conv, and let BN normalize
        # with the batch statistics (updating the running ones)
        x_in = self.q_in(x) if self.qi else x
        bn = self.bn
        w, _ = self.float_weight_bias()
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        if self.q_w.observing:
            self.q_w.update(w.detach())
        y = self._op(x_in, self.q_w.fake_quantize(w), None) / factor.reshape(1, -1, 1, 1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        y = self._activation(bn(y))
        return self.q_out(y) if self.q_out is not None else y
