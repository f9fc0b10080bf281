"""Quantized layers: calibrate -> ``freeze()`` -> ``quantize_inference()`` with integers only.

Each layer wraps a float layer and holds ``QParam`` s: ``q_in`` (input), ``q_w`` (weight) and
``q_out`` (output). Its life cycle is the original series':

1. ``forward(x)`` on float input observes ranges (calibration, or QAT) and returns the
   fake-quantized float output;
2. ``freeze(q_in=None)`` computes the integer weights, the int32 bias and the requantization
   multipliers;
3. ``quantize_inference(q_x)`` maps int32 input to int32 output with integer arithmetic only:

       acc   = sum (q_x - Z_x)(q_w - Z_w)       exact integer sum
       acc  += q_b                              int32 bias, scale S_x*S_w, zero point 0
       q_y   = clamp(round(M * acc) + Z_y)      M = S_x*S_w/S_y per output channel

Weights: ``per_channel=True`` is symmetric int8 per output channel (the production way),
``per_channel=False`` affine int8 per tensor (the original's way; Z_w != 0). Activations: affine
unsigned. Requantization: float multiplier (QNNPACK, ONNX Runtime) or, with ``fixed_point=True``,
a Q31 integer multiplier and a rounding shift (TFLite, gemmlowp).

The float32 steps that make the integers bit-exact with PyTorch's qnnpack kernels (NUMERICS.md):

    q_b = rne(f32(b * f32(1 / f32(S_x * S_w))))        (as at::quantize_per_tensor of the bias)
    M   = f32(f32(S_w * S_x) * f32(1 / S_y))           (as qnnpack's requantization scales)
    q_y = rne(f32(acc) * M) + Z_y, clamped

Taught in notebooks ``d_post_training_quantize`` and ``e_conv_quantization_walkthrough``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .fixed_point import multiply_by_quantized_multiplier, quantize_multiplier
from .observer import QParam

#: float32 holds every integer of magnitude up to 2**24 exactly
FLOAT32_EXACT = 2**24
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def check_integer_input(q: torch.Tensor, qparam: QParam, name: str = "q_x") -> torch.Tensor:
    """Raise unless ``q`` is an integer tensor inside ``qparam``'s integer range."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 from q_in.quantize_tensor); got "
                        f"{q.dtype}")
    if q.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    lo, hi = int(q.min()), int(q.max())
    if lo < qparam.quant_min or hi > qparam.quant_max:
        raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [{qparam.quant_min}, "
                         f"{qparam.quant_max}], the range of the input's QParam")
    return q


def relu6_limit(qparam: QParam) -> int:
    """The integer of real 6 on ``qparam``'s grid, clamped to its range:
    ``min(Z + rne(f32(6 * f32(1 / S))), quant_max)`` (as PyTorch's quantized relu6)."""
    six = torch.round(torch.tensor(6.0) * (1.0 / qparam.scale.to(torch.float32)))
    return min(int(qparam.zero_point) + int(six), qparam.quant_max)


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for a tensor of ``ndim`` dims with channels on axis 1."""
    return v.reshape([1, -1] + [1] * (ndim - 2)) if v.dim() == 1 else v


def _copy_qparam(src: QParam) -> QParam:
    """A new QParam with the configuration and the observed values of ``src``."""
    dst = QParam(src.num_bits, src.signed, src.symmetric, src.axis, src.averaging_constant)
    dst.load_state_dict(src.state_dict())
    return dst


@contextlib.contextmanager
def calibration_mode(module: nn.Module):
    """Within the block, ``module`` is in eval mode (BN uses its running statistics) and only its
    QParams are in training mode, so they observe; the previous mode is restored afterwards."""
    was_training = module.training
    module.eval()
    for m in module.modules():
        if isinstance(m, QParam):
            m.train()
    try:
        yield module
    finally:
        module.train(was_training)


class QModule(nn.Module):
    """Common life cycle of the quantized layers (the original's ``QModule``)."""

    _frozen_buffers: tuple[str, ...] = ()

    def __init__(self, qi: bool = True, qo: bool = True, num_bits: int = 8,
                 averaging_constant: float | None = None):
        super().__init__()
        if not isinstance(qi, bool) or not isinstance(qo, bool):
            raise TypeError(f"qi and qo must be True or False; got qi={qi!r}, qo={qo!r}")
        self.qi, self.qo, self.num_bits = qi, qo, num_bits
        # q_in always exists so that state_dicts have the same keys; with qi=False it is not
        # observed but filled by freeze(q_in=...) from the previous layer's output QParam
        self.q_in = QParam(num_bits, averaging_constant=averaging_constant)
        self.q_out = QParam(num_bits, averaging_constant=averaging_constant) if qo else None
        self.register_buffer("frozen_flag", torch.tensor(False))
        for name in self._frozen_buffers:
            self.register_buffer(name, torch.empty(0))

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_flag)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ranges on a batch (see :func:`calibration_mode`); returns the forward output."""
        with calibration_mode(self):
            return self(x)

    def _check_frozen(self):
        if not self.frozen:
            raise RuntimeError(f"{type(self).__name__}.quantize_inference needs freeze() first "
                               "(calibrate with forward passes, then call freeze())")

    def _take_q_in(self, q_in: QParam | None):
        """Use our own observed q_in, or copy the given (previous layer's) q_out into it."""
        if q_in is not None:
            if not isinstance(q_in, QParam):
                raise TypeError(f"q_in must be a QParam; got {type(q_in).__name__}")
            if not q_in.observed:
                raise RuntimeError("q_in has observed nothing: calibrate the model first")
            self.q_in = _copy_qparam(q_in)
        elif not self.qi:
            raise ValueError(f"{type(self).__name__} was built with qi=False: pass the previous "
                             "layer's output QParam, freeze(q_in=previous.q_out)")
        elif not self.q_in.observed:
            raise RuntimeError(f"{type(self).__name__}.q_in has observed nothing: run forward "
                               "passes in training mode, or calibrate(x), before freeze()")

    def _take_q_out(self, q_out: QParam | None) -> QParam:
        if q_out is not None:
            self.q_out = _copy_qparam(q_out)
        if self.q_out is None or not self.q_out.observed:
            raise RuntimeError(f"{type(self).__name__} has no observed output QParam: build it "
                               "with qo=True and calibrate, or pass freeze(q_out=...)")
        return self.q_out

    @property
    def output_qparam(self) -> QParam:
        """The QParam of this layer's output (its own ``q_out``, or its input's when it has none)."""
        return self.q_out if self.q_out is not None else self.q_in

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # frozen buffers change shape at freeze(): take the stored ones as they are
        for name in self._frozen_buffers + ("frozen_flag",):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, state_dict[key].clone())
            elif strict:
                missing_keys.append(key)
        self._acc_dtype = None  # new integer weights: the accumulator bound must be recomputed


class _QWeighted(QModule):
    """Shared code of QConv2d / QLinear / QConvBNReLU: a weighted layer with optional fused ReLU."""

    _frozen_buffers = ("weight_int", "bias_int", "multiplier", "quantized_multiplier", "shift")

    def __init__(self, qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant):
        super().__init__(qi, qo, num_bits, averaging_constant)
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be True or False; got {per_channel!r}")
        self.per_channel, self.relu, self.fixed_point = per_channel, bool(relu), bool(fixed_point)
        # weights always follow the current float weights (averaging_constant=1)
        self.q_w = QParam(num_bits, signed=True, symmetric=per_channel,
                          axis=0 if per_channel else None, averaging_constant=1.0)

    # -- to be provided by subclasses ------------------------------------------------------
    def float_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _op(self, x, w, b):
        raise NotImplementedError

    # -- calibration / QAT -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ranges and return the fake-quantized float output (calibration and QAT)."""
        if self.qi:
            x = self.q_in(x)
        w, b = self.float_weight_bias()
        if self.q_w.observing:
            self.q_w.update(w.detach())
        y = self._activation(self._op(x, self.q_w.fake_quantize(w), b))
        if self.q_out is not None:
            y = self.q_out(y)
        return y

    #: a fused ReLU6 (set by quantlab.convert): with ``relu``, the output is also clamped at 6,
    #: in integers at ``Z_y + round(6 / S_y)`` (see :func:`relu6_limit`)
    relu6 = False

    def _activation(self, y: torch.Tensor) -> torch.Tensor:
        """The fused activation on float values: ReLU, or ReLU6 when ``relu6`` is set."""
        if self.relu:
            y = torch.clamp(y, 0.0, 6.0) if self.relu6 else F.relu(y)
        return y

    # -- freeze ------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, q_in: QParam | None = None, q_out: QParam | None = None):
        """Integer weights, int32 bias and requantization multipliers from the observed qparams.

        Args:
            q_in: the previous layer's output QParam, required when built with ``qi=False``.
            q_out: an output QParam to use instead of our own (rarely needed).
        """
        self._take_q_in(q_in)
        q_out = self._take_q_out(q_out)
        w, b = self.float_weight_bias()
        self.q_w.update(w)
        self.weight_int = self.q_w.quantize_tensor(w)             # exactly q_w's integers
        bias_scale = self.q_w.scale * self.q_in.scale             # f32(S_w * S_x), per channel
        if b is None:
            b = torch.zeros(w.shape[0])
        q_b = torch.round(b.to(torch.float32) * (1.0 / bias_scale))  # f32 reciprocal, RNE
        self.bias_int = torch.clamp(q_b, INT32_MIN, INT32_MAX).to(torch.int64).expand(w.shape[0])
        self.bias_int = self.bias_int.contiguous()
        self.multiplier = (bias_scale * (1.0 / q_out.scale)).to(torch.float32).expand(w.shape[0])
        self.multiplier = self.multiplier.contiguous()
        pairs = [quantize_multiplier(m) for m in self.multiplier.double().tolist()]
        self.quantized_multiplier = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        self.shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        self.frozen_flag = torch.tensor(True)
        self._acc_dtype = None
        return self

    @property
    def weight_zero_point(self) -> torch.Tensor:
        """Z_w broadcast over the weight's output channels (0 for symmetric per-channel)."""
        zp = self.q_w.zero_point.to(torch.int64)
        return zp.reshape([-1] + [1] * (self.weight_int.dim() - 1)) if zp.dim() else zp

    def accumulator_bound(self) -> int:
        """The largest |acc| any input in q_in's range can produce (without the bias):
        ``max_c sum_k |q_w - Z_w| * max(|q_min - Z_x|, |q_max - Z_x|)``."""
        self._check_frozen()
        w = (self.weight_int.to(torch.int64) - self.weight_zero_point).abs()
        zx = int(self.q_in.zero_point)
        x_max = max(abs(self.q_in.quant_min - zx), abs(self.q_in.quant_max - zx))
        return int(w.flatten(1).sum(1).max()) * x_max

    @property
    def acc_dtype(self) -> torch.dtype:
        """float32 when the accumulator bound proves it exact (< 2**24), else float64."""
        if getattr(self, "_acc_dtype", None) is None:
            exact32 = self.accumulator_bound() < FLOAT32_EXACT
            self._acc_dtype = torch.float32 if exact32 else torch.float64
        return self._acc_dtype

    # -- integer inference -------------------------------------------------------------------
    def accumulate(self, q_x: torch.Tensor) -> torch.Tensor:
        """``sum (q_x - Z_x)(q_w - Z_w)``: exact integers held in float32 or float64."""
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        dt = self.acc_dtype  # exact: every partial sum is bounded by accumulator_bound()
        x = (q_x.to(torch.int64) - int(self.q_in.zero_point)).to(dt)
        w = (self.weight_int.to(torch.int64) - self.weight_zero_point).to(dt)
        return self._op(x, w, None)

    def requantize(self, acc: torch.Tensor) -> torch.Tensor:
        """int32 output from the exact accumulator: + bias, * M, round, + Z_y, clamp (ReLU)."""
        nd = acc.dim()
        acc = acc.to(torch.float64) + _channel_view(self.bias_int, nd).to(torch.float64)
        if self.fixed_point:
            acc = torch.clamp(acc, INT32_MIN, INT32_MAX).to(torch.int64)
            y = multiply_by_quantized_multiplier(acc, _channel_view(self.quantized_multiplier, nd),
                                                 _channel_view(self.shift, nd))
            y = y.to(torch.float32)
        else:
            # qnnpack: the int32 accumulator converted to float32, times the f32 multiplier, RNE
            y = torch.round(acc.to(torch.float32) * _channel_view(self.multiplier, nd))
        return self.add_zero_point_and_clamp(y)

    def add_zero_point_and_clamp(self, y: torch.Tensor) -> torch.Tensor:
        """``clamp(y + Z_y)`` as int32; a fused ReLU is the clamp at ``Z_y``, a fused ReLU6 also
        the clamp at ``Z_y + round(6 / S_y)``."""
        y = y + float(self.q_out.zero_point)
        low = float(self.q_out.zero_point) if self.relu else self.q_out.quant_min
        high = self.q_out.quant_max
        if self.relu and self.relu6:
            high = min(high, relu6_limit(self.q_out))
        return torch.clamp(y, max(low, self.q_out.quant_min), high).to(torch.int32)

    def quantize_inference(self, q_x: torch.Tensor, pool: tuple[int, int] | None = None):
        """int32 input -> int32 output, integer arithmetic only.

        Args:
            q_x: integers in q_in's range, e.g. ``self.q_in.quantize_tensor(x)``.
            pool: ``(kernel_size, stride)`` of a max-pool to apply to the accumulators before
                requantizing. Requantization is monotonic per channel, so this gives the same
                integers as pooling afterwards, with 4x less requantization work.
        """
        acc = self.accumulate(q_x)
        if pool is not None:
            acc = F.max_pool2d(acc, pool[0], pool[1])
        return self.requantize(acc)


class QConv2d(_QWeighted):
    """Quantized ``nn.Conv2d``: ``QConv2d(conv, qi, qo, num_bits, per_channel)`` as the original.

    Extra keyword arguments: ``relu`` (fuse a following ReLU: the output range is observed after
    it and the ReLU becomes the clamp at Z_y), ``fixed_point`` (integer-only requantization),
    ``averaging_constant`` (moving-average activation ranges for QAT).
    """

    def __init__(self, conv: nn.Conv2d, qi: bool = True, qo: bool = True, num_bits: int = 8,
                 per_channel: bool = False, *, relu: bool = False, fixed_point: bool = False,
                 averaging_constant: float | None = None):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("conv must use numeric zero padding (padding_mode='zeros')")
        super().__init__(qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant)
        self.conv = conv

    def float_weight_bias(self):
        return self.conv.weight, self.conv.bias

    def _op(self, x, w, b):
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


class QLinear(_QWeighted):
    """Quantized ``nn.Linear``: ``QLinear(fc, qi, qo, num_bits, per_channel)``."""

    def __init__(self, fc: nn.Linear, qi: bool = True, qo: bool = True, num_bits: int = 8,
                 per_channel: bool = False, *, relu: bool = False, fixed_point: bool = False,
                 averaging_constant: float | None = None):
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"fc must be a torch.nn.Linear; got {type(fc).__name__}")
        super().__init__(qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant)
        self.fc = fc

    def float_weight_bias(self):
        return self.fc.weight, self.fc.bias

    def _op(self, x, w, b):
        return F.linear(x, w, b)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
            var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Fold a BatchNorm into the preceding conv: ``w' = w * gamma / sqrt(var + eps)``,
    ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``."""
    factor = gamma / torch.sqrt(var + eps)
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
                 fixed_point: bool = False, averaging_constant: float | None = None):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
            raise TypeError(f"bn must be a BatchNorm2d({conv.out_channels}); got {bn!r}")
        super().__init__(qi, qo, num_bits, per_channel, relu, fixed_point, averaging_constant)
        self.conv, self.bn = conv, bn
        #: fold the running statistics during training too (BN statistics frozen)
        self.freeze_bn_stats = False

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


class _QUnweighted(QModule):
    """A layer without weights or qparams of its own: its output uses its input's qparams."""

    def __init__(self, num_bits: int = 8):
        super().__init__(qi=False, qo=False, num_bits=num_bits)

    def freeze(self, q_in: QParam | None = None):
        """Take the previous layer's output QParam as this layer's input (and output) qparams."""
        self._take_q_in(q_in)
        self.frozen_flag = torch.tensor(True)
        return self

    def quantize_inference(self, q_x):
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        return self._integer_op(q_x)


class QReLU(_QUnweighted):
    """ReLU on quantized values: ``max(q, Z)``, a clamp at the zero point of its input."""

    def forward(self, x):
        return F.relu(x)

    def _integer_op(self, q_x):
        return torch.clamp(q_x.to(torch.int32), min=int(self.q_in.zero_point))


class QMaxPool2d(_QUnweighted):
    """Max-pooling on the integers (max commutes with any increasing map, so q and r agree)."""

    def __init__(self, kernel_size=2, stride=None, padding=0, num_bits: int = 8):
        super().__init__(num_bits)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

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

    def _integer_op(self, q_x):
        return torch.flatten(q_x, 1)
