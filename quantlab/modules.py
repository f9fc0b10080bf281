"""Quantized layers: calibrate -> ``freeze()`` -> ``quantize_inference()`` with integers only.

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

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_bool, check_float_tensor, check_int, check_int_tensor, check_real
from .fixed_point import multiply_by_quantized_multiplier, quantize_multiplier
from .observer import QParam

#: float32 holds every integer of magnitude up to 2**24 exactly
FLOAT32_EXACT = 2**24
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: largest |bias integer| above 8 bits (an int64 bias, as TFLite's 16x8 kernels; kept below 2**52
#: so that acc + bias stays exact in float64)
INT64_BIAS_MAX = 2**52

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


def check_integer_input(q: torch.Tensor, qparam: QParam, name: str = "q_x") -> torch.Tensor:
    """Raise unless ``q`` is an integer tensor inside ``qparam``'s integer range."""
    check_int_tensor(q, name)
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


def _weight_view(zero_point: torch.Tensor, ndim: int) -> torch.Tensor:
    """Z_w as int64, (C,) -> (C, 1, ...) to broadcast over a weight of ``ndim`` dims."""
    zp = zero_point.to(torch.int64)
    return zp.reshape([-1] + [1] * (ndim - 1)) if zp.dim() else zp


def _copy_qparam(src: QParam) -> QParam:
    """A new QParam with the configuration and the observed values of ``src``."""
    dst = QParam(src.num_bits, src.signed, src.symmetric, src.axis, src.averaging_constant,
                 observer=copy.deepcopy(src.observer))
    # by value, not by state_dict: a learned scale (quantlab.learned) becomes an ordinary buffer
    for name in ("min_val", "max_val", "scale", "zero_point"):
        setattr(dst, name, getattr(src, name).detach().clone())
    return dst


def _unexpected(state_dict, prefix: str, names, children) -> list[str]:
    """Keys under ``prefix`` that name neither one of ``names`` nor a child module."""
    out = []
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head not in names and head not in children:
                out.append(key)
    return out


def _remember_loaded_freeze(module, incompatible_keys):
    """After load_state_dict (children loaded too): a loaded frozen layer is frozen as loaded."""
    if bool(module.frozen_flag):
        module._mark_frozen()


def _check_conv_input(conv: nn.Conv2d, q_x: torch.Tensor, name: str):
    """(N, C_in, H, W) or unbatched (C_in, H, W), and at least one output position."""
    if q_x.dim() not in (3, 4) or q_x.shape[-3] != conv.in_channels:
        raise ValueError(f"{name} must have shape (N, {conv.in_channels}, H, W) or "
                         f"({conv.in_channels}, H, W) for this conv; got {tuple(q_x.shape)}")
    for d, size in enumerate(q_x.shape[-2:]):
        k = conv.dilation[d] * (conv.kernel_size[d] - 1) + 1
        if size + 2 * conv.padding[d] < k:
            raise ValueError(f"{name}'s spatial size {tuple(q_x.shape[-2:])} is smaller than the "
                             f"conv's kernel {tuple(conv.kernel_size)} (with padding "
                             f"{tuple(conv.padding)}, dilation {tuple(conv.dilation)})")


@contextlib.contextmanager
def calibration_mode(module: nn.Module):
    """Within the block, ``module`` is in eval mode (BN uses its running statistics) and only its
    QParams are in training mode, so they observe; the previous mode is restored afterwards.
    Learned ranges (``quantlab.learned``) are (re)initialised by their observer in the block."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    was_training = module.training
    module.eval()
    qparams = [m for m in module.modules() if isinstance(m, QParam)]
    for m in qparams:
        m.train()
        m.calibrating = True
    try:
        yield module
    finally:
        for m in qparams:
            m.calibrating = False
        module.train(was_training)


class QModule(nn.Module):
    """Common life cycle of the quantized layers (the original's ``QModule``)."""

    _frozen_buffers: tuple[str, ...] = ()

    def __init__(self, qi: bool = True, qo: bool = True, num_bits: int = 8,
                 averaging_constant: float | None = None):
        super().__init__()
        qi, qo = check_bool(qi, "qi"), check_bool(qo, "qo")
        self.qi, self.qo, self.num_bits = qi, qo, num_bits
        # q_in always exists so that state_dicts have the same keys; with qi=False it is not
        # observed but filled by freeze(q_in=...) from the previous layer's output QParam
        self.q_in = QParam(num_bits, averaging_constant=averaging_constant)
        self.q_out = QParam(num_bits, averaging_constant=averaging_constant) if qo else None
        self.register_buffer("frozen_flag", torch.tensor(False))
        for name in self._frozen_buffers:
            self.register_buffer(name, torch.empty(0))
        self.register_load_state_dict_post_hook(_remember_loaded_freeze)

    def label(self) -> str:
        """How errors and warnings name this layer (``qname``, set by the model, or the class)."""
        return getattr(self, "qname", None) or type(self).__name__

    def _qparams(self) -> tuple[QParam, ...]:
        return tuple(p for p in (self.q_in, getattr(self, "q_w", None), self.q_out) if p is not None)

    def _mark_frozen(self):
        """Set the frozen flag and remember the qparams' versions: any later observation
        (calibrate, a training-mode forward, QAT) un-freezes the layer, loudly."""
        names = {id(m): n for n, m in self.named_children()}
        for p in self._qparams():
            p.check_usable(f"{names.get(id(p), 'a qparam')} of {self.label()}")
        self.frozen_flag = torch.tensor(True)
        self._frozen_versions = tuple(p.version for p in self._qparams())
        for p in self._qparams():
            p.frozen_by = self.label()

    @property
    def stale(self) -> bool:
        """True when the layer was frozen but its qparams changed since (freeze() again)."""
        return bool(self.frozen_flag) and \
            getattr(self, "_frozen_versions", None) != tuple(p.version for p in self._qparams())

    @property
    def frozen(self) -> bool:
        """True after ``freeze()`` as long as no QParam of the layer has observed anything since."""
        return bool(self.frozen_flag) and not self.stale

    def _apply(self, fn, *args, **kwargs):
        # .to(torch.float64) / .half() must not change the frozen integer state (the float32
        # multipliers): keep the frozen buffers' dtypes, follow device moves only
        saved = {name: getattr(self, name) for name in self._frozen_buffers}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return out

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ranges on a batch (see :func:`calibration_mode`); returns the forward output."""
        with calibration_mode(self):
            return self(x)

    def _check_frozen(self):
        if self.stale:
            raise RuntimeError(f"{self.label()} was frozen, but its qparams changed since "
                               "(calibrate(), a forward pass in training mode, or QAT observed new "
                               "ranges): call freeze() again before integer inference")
        if not self.frozen:
            raise RuntimeError(f"{self.label()}.quantize_inference needs freeze() first "
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
            if not isinstance(q_out, QParam):
                raise TypeError(f"q_out must be a QParam; got {type(q_out).__name__}")
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
        names = self._frozen_buffers + ("frozen_flag",)
        for name in names:
            key = prefix + name
            if key in state_dict:
                value = state_dict[key]
                if not isinstance(value, torch.Tensor):
                    error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
                    continue
                setattr(self, name, value.clone())
            elif strict:
                missing_keys.append(key)
        if strict:
            unexpected_keys.extend(_unexpected(state_dict, prefix, names, self._modules))
        self._acc_dtype = None  # new integer weights: the accumulator bound must be recomputed


class _QWeighted(QModule):
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

    # -- calibration / QAT -------------------------------------------------------------------
    #: simulate the integer model in the forward pass (set by ``quantize_model(..., qat=True)``):
    #: int32 bias and requantization rounding, see :meth:`forward`
    simulate_integer = False

    def link_input(self, q_in: QParam | None) -> None:
        """Use ``q_in`` (the previous layer's live output QParam) as the input's qparams in the
        forward pass of a layer built with ``qi=False`` (``QuantizedNet`` links its layers)."""
        if q_in is not None and not isinstance(q_in, QParam):
            raise TypeError(f"q_in must be a QParam or None; got {type(q_in).__name__}")
        self._input_link = (q_in,)  # a tuple: not registered as a submodule

    def input_qparam(self) -> QParam | None:
        """The qparams of this layer's input during the forward pass (own or linked)."""
        return self.q_in if self.qi else getattr(self, "_input_link", (None,))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ranges and return the fake-quantized float output (calibration and QAT).

        With ``simulate_integer`` (QAT), the value returned is exactly what the frozen integer
        layer computes, ``S_y (clamp(round(M (acc + q_b)) + Z_y) - Z_y)``: the bias is rounded to
        the int32 grid ``S_x S_w`` and the output is requantized from the exact accumulator as in
        :meth:`requantize`. The gradient flows straight through both roundings, along the float
        path ``conv(x, fake_quant(w)) + b_q``.
        """
        if self.qi:
            x = self.q_in(x)
        w, b = self.float_weight_bias()
        if self.q_w.observing:
            self.q_w.update(w.detach())
        w_q = self.q_w.fake_quantize(w)
        q_in = self.input_qparam() if self.simulate_integer else None
        if q_in is None or not q_in.observed or self.q_out is None:
            y = self._calibration_output(x, w, b) if self._calibrating() else None
            if y is None:
                y = self._op(x, w_q, b)
            y = self._activation(y)
            return self.q_out(y) if self.q_out is not None else y
        bias_scale = self.q_w.scale * q_in.scale                  # f32(S_w * S_x), per channel
        if b is None:
            b = torch.zeros(w.shape[0])
        q_b = torch.clamp(torch.round(b.detach().to(torch.float32) * (1.0 / bias_scale)),
                          INT32_MIN, INT32_MAX)
        b_q = b + (q_b * bias_scale - b).detach()                 # int32 bias, straight through
        y = self._activation(self._op(x, w_q, b_q))
        y = self.q_out(y)                     # observes the range; straight-through gradient
        with torch.no_grad():
            exact = self.q_out.dequantize_tensor(self._simulate(x, w, q_in, q_b, bias_scale))
        return exact + (y - y.detach())       # the integer model's value, the float gradient

    def _calibrating(self) -> bool:
        """True when this forward pass observes the output's range without a gradient: inside
        ``calibrate()``/``calibration_mode``, or a training-mode forward under ``torch.no_grad()``.
        (QAT, with gradients, keeps the float op: training depends on the CPU anyway.)"""
        q_out = self.q_out
        return q_out is not None and q_out.training and getattr(q_out, "observing", False) \
            and not torch.is_grad_enabled()

    @torch.no_grad()
    def _calibration_output(self, x, w, b) -> torch.Tensor | None:
        """The output the calibration observes, the same on every CPU (or None: use ``_op``).

        ``conv(x_hat, w_hat) + b`` of the fake-quantized input and weights, computed as
        ``f32(S_x S_w acc + b)`` from the exact integer accumulator ``acc = conv(q_x - Z_x,
        q_w - Z_w)`` (float64 holds it exactly: every partial sum is an integer below 2**53), with
        one float64 product and one float64 sum per output, each rounded as IEEE 754 prescribes
        on any CPU. A float32 ``F.conv2d`` of ``x_hat`` and ``w_hat`` gives the same value up to its
        last bits, but those bits depend on the order in which the CPU's kernel (oneDNN, MKL)
        adds the products, and the calibrated scales would inherit them. None when ``x`` is not
        on its input QParam's grid (the float op is used then).
        """
        q_in = self.input_qparam()
        if q_in is None or not q_in.observed or q_in.axis is not None:
            return None
        x = x.detach()
        x_int = torch.round(x * (1.0 / q_in.scale))                  # q_x - Z_x
        if not torch.equal(x_int * q_in.scale, x):
            return None                                              # not on q_in's grid
        w_int = (self.q_w.quantize_tensor(w.detach()).to(torch.float64)
                 - _weight_view(self.q_w.zero_point, w.dim()).to(torch.float64))
        zx = int(q_in.zero_point)
        x_max = max(abs(q_in.quant_min - zx), abs(q_in.quant_max - zx))
        if int(w_int.abs().flatten(1).sum(1).max()) * x_max >= 2**53:
            return None
        acc = self._op(x_int.to(torch.float64), w_int, None)          # exact integers
        # S_x S_w: a product of two float32 numbers, exact in float64
        scale = q_in.scale.double() * self.q_w.scale.double()
        y = acc * (scale.reshape(self._channel_shape) if scale.dim() else scale)
        if b is not None:
            y = y + b.detach().double().reshape(self._channel_shape)
        return y.to(torch.float32)

    @torch.no_grad()
    def _simulate(self, x, w, q_in: QParam, q_b, bias_scale) -> torch.Tensor:
        """The frozen layer's integer output for the fake-quantized input ``x`` (on q_in's grid)."""
        x_int = torch.round(x.detach() * (1.0 / q_in.scale))      # q_x - Z_x, exact integers
        w_int = (self.q_w.quantize_tensor(w.detach()).to(torch.int64)
                 - _weight_view(self.q_w.zero_point, w.dim()))
        zx = int(q_in.zero_point)
        x_max = max(abs(q_in.quant_min - zx), abs(q_in.quant_max - zx))
        bound = int(w_int.abs().flatten(1).sum(1).max()) * x_max
        dt = torch.float32 if bound < FLOAT32_EXACT else torch.float64
        acc = self._op(x_int.to(dt), w_int.to(dt), None)           # exact: |acc| <= bound
        multiplier = requantization_multiplier(q_in.scale, self.q_w.scale, self.q_out.scale,
                                               self.multiplier_formula).expand(w.shape[0])
        qm = shift = None
        if self.fixed_point:
            pairs = [quantize_multiplier(m) for m in multiplier.double().tolist()]
            qm = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
            shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        return self._requantize(acc, q_b.expand(w.shape[0]), multiplier, qm, shift)

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
