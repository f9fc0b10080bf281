"""The forward pass of a weighted layer on float values: observing ranges (calibration), fake
quantization, and QAT's exact simulation of the integer model.

``_SimulatedForward`` is a mixin of :class:`quantlab.weighted._QWeighted`. Calibration computes the
output from the exact integer accumulator (the same on every CPU); QAT with ``simulate_integer``
returns exactly the frozen integer layer's value with the float gradient (straight through).
Taught in notebooks ``d_post_training_quantize`` and ``f_quantization_aware_training``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fixed_point import quantize_multiplier
from .observer import QParam
from .qmodule import FLOAT32_EXACT, INT32_MAX, INT32_MIN
from .requantize import _weight_view, requantization_multiplier


class _SimulatedForward:
    """forward (calibration, fake quantization, QAT's integer simulation) of a weighted layer (a
    mixin: the layer provides ``_op``, ``float_weight_bias``, ``q_in``, ``q_w``, ``q_out``, ``qi``,
    ``relu``, ``relu6``, ``fixed_point``, ``multiplier_formula``, ``_channel_shape`` and
    ``_requantize``)."""

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
    #: in integers at ``Z_y + rne(f32(6 * f32(1 / S_y)))`` (see :func:`relu6_limit`)
    relu6 = False

    def _activation(self, y: torch.Tensor) -> torch.Tensor:
        """The fused activation on float values: ReLU, or ReLU6 when ``relu6`` is set."""
        if self.relu:
            y = torch.clamp(y, 0.0, 6.0) if self.relu6 else F.relu(y)
        return y
