"""Learned quantization ranges: LSQ step sizes and PACT clipping levels.

A calibration observer (``quantlab.observers``) chooses a range once, from statistics. In
quantization-aware training the range can instead be a parameter that the loss trains, like the
weights. Both recipes start from an observer's range (MSE by default) and keep the zero point fixed.

**LSQ** (Esser et al. 2020, "Learned Step Size Quantization", ICLR) learns the step ``s``. With
``t = x / s``, ``Q_n = Z - quant_min`` and ``Q_p = quant_max - Z`` (the levels below and above
the zero point)::

    x_hat = s * (clamp(round(t) + Z, quant_min, quant_max) - Z)

    d x_hat / d x = 1  if -Q_n < t < Q_p,  else 0               (straight through the rounding)
    d x_hat / d s = round(t) - t   if -Q_n < t < Q_p
                    -Q_n           if t <= -Q_n
                    Q_p            if t >= Q_p

and the gradient of ``s`` is multiplied by ``g = 1 / sqrt(N * Q_p)``, ``N`` the number of values
one step quantizes per image (weights: the weights of one output channel, or of the tensor;
activations: the features of one image). Inside the range the step is pulled by the rounding
error itself (``round(t) - t``); outside it, by the clipping error.

**PACT** (Choi et al. 2018, "PACT: Parameterized Clipping Activation") learns the clipping level
``alpha`` of an unsigned activation with zero point 0 (after a ReLU), ``s = alpha / quant_max``::

    x_hat = s * clamp(round(x / s), 0, quant_max)
    d x_hat / d x = 1  if 0 <= x < alpha,  else 0
    d x_hat / d alpha = 1  if x >= alpha,  else 0

i.e. LSQ's step gradient without the rounding term, in units of ``alpha = Q_p s``. (The paper's
L2 penalty on ``alpha`` is not applied: ``alpha`` starts from the observer's range.)

The forward arithmetic is exactly :func:`quantlab.quantize.fake_quantize`'s (``x * f32(1/s)``,
round half to even), so a learned step frozen as an ordinary ``scale`` gives the same integers.
:class:`LearnedQParam` is a ``QParam`` whose ``scale`` is the learned parameter: ``freeze()``,
the integer path and the exporters read it like any other scale. Taught in notebook
``fa_learned_step_size``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._validate import check_int, check_int_range, check_real, check_scale
from .observer import QParam
from .qparams import calc_scale_zero_point, check_axis, check_float_tensor

#: the smallest step a learned scale may take (an optimizer step can push it to 0 or below)
MIN_STEP = 1e-8

#: accepted ``method`` values of :class:`LearnedQParam`
METHODS = ("lsq", "pact")


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the parameter's shape (``()`` or ``(1, C, 1, ...)``)."""
    return g.sum() if len(shape) == 0 else g.sum_to_size(shape)


class _LSQ(torch.autograd.Function):
    """LSQ fake quantization; ``scale``/``zero_point`` broadcast against ``x``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, grad_scale):
        t = x * (1.0 / scale)                                  # as quantize(): f32 reciprocal
        zp = zero_point.to(torch.float32)
        q = torch.clamp(torch.round(t) + zp, quant_min, quant_max)
        ctx.save_for_backward(t, zp, scale)
        ctx.quant_min, ctx.quant_max, ctx.grad_scale = quant_min, quant_max, grad_scale
        return (q - zp) * scale

    @staticmethod
    def backward(ctx, grad):
        t, zp, scale = ctx.saved_tensors
        low, high = ctx.quant_min - zp, ctx.quant_max - zp    # -Q_n and Q_p
        below, above = t <= low, t >= high
        inside = ~(below | above)
        ds = torch.where(inside, torch.round(t) - t, torch.where(below, low, high))
        grad_s = _reduce_to(grad * ds, scale.shape) * ctx.grad_scale
        return grad * inside, grad_s, None, None, None, None


class _PACT(torch.autograd.Function):
    """PACT fake quantization of an unsigned activation with zero point 0."""

    @staticmethod
    def forward(ctx, x, alpha, quant_max):
        scale = alpha / quant_max
        q = torch.clamp(torch.round(x * (1.0 / scale)), 0, quant_max)
        ctx.save_for_backward(x, alpha)
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        clipped = x >= alpha
        grad_x = grad * ((x >= 0) & ~clipped)
        return grad_x, _reduce_to(grad * clipped, alpha.shape), None


def _channel_shape(scale: torch.Tensor, ndim: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point, quant_min: int,
                      quant_max: int, axis: int | None = None,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization: ``s (clamp(round(x / s) + Z) - Z)`` with LSQ's gradients.

    Args:
        x: float tensor.
        scale: the step ``s``, shape ``()`` or ``(x.shape[axis],)``, usually a trainable
            ``nn.Parameter`` (> 0).
        zero_point: ``Z``, fixed (no gradient), same shape as ``scale``.
        quant_min, quant_max: the integer range.
        axis: the channel axis of a per-channel ``scale``, None per tensor.
        grad_scale: ``g``, multiplies the gradient of ``scale`` (LSQ: ``1 / sqrt(N * Q_p)``).
    Returns:
        float32 tensor of ``x``'s shape; see the module docstring for the gradients.
    """
    check_float_tensor(x, "x")
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a tensor (usually an nn.Parameter); got "
                        f"{type(scale).__name__}")
    check_scale(scale, "scale")
    quant_min, quant_max = check_int_range(quant_min, quant_max)
    grad_scale = check_real(grad_scale, "grad_scale", 0, low_open=True)
    axis = check_axis(axis, x.dim())
    shape = _channel_shape(scale, x.dim(), axis)
    s = scale.to(torch.float32).reshape(shape)
    z = torch.as_tensor(zero_point).reshape(shape)
    return _LSQ.apply(x.to(torch.float32), s, z, quant_min, quant_max, float(grad_scale))


def pact_fake_quantize(x: torch.Tensor, alpha: torch.Tensor, quant_max: int) -> torch.Tensor:
    """PACT fake quantization: ``s clamp(round(x / s), 0, quant_max)`` with ``s = alpha /
    quant_max`` and PACT's gradients (``d/d alpha = 1`` where ``x >= alpha``, else 0)."""
    check_float_tensor(x, "x")
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
        got = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise TypeError(f"alpha must be a one-value tensor (usually an nn.Parameter); got {got}")
    check_scale(alpha, "alpha")
    quant_max = check_int(quant_max, "quant_max", 1)
    return _PACT.apply(x.to(torch.float32), alpha.to(torch.float32).reshape(()), quant_max)


def lsq_grad_scale(num_values: int, quant_max_above_zero: int) -> float:
    """LSQ's ``g = 1 / sqrt(N * Q_p)`` (``Q_p`` at least 1)."""
    num_values = check_int(num_values, "num_values", 1)
    quant_max_above_zero = check_int(quant_max_above_zero, "quant_max_above_zero", 0)
    return 1.0 / math.sqrt(num_values * max(quant_max_above_zero, 1))


class LearnedQParam(QParam):
    """A QParam whose step is trained with the model (LSQ) or whose clip is (PACT).

    It is initialised by its observer (``"mse"`` unless given) on the batches seen while it has
    no range yet, or during ``calibrate()`` (:func:`quantlab.modules.calibration_mode`); after
    that only the optimizer moves it. ``scale`` is the learned value (read-only view, detached),
    so ``freeze()``, the integer layers and the exporters use it as an ordinary scale;
    ``zero_point`` stays as initialised. ``min_val``/``max_val`` are the range it represents,
    ``s (quant_min - Z)`` and ``s (quant_max - Z)``.

    Args:
        num_bits, signed, symmetric, axis: as :class:`~quantlab.observer.QParam`.
        method: ``"lsq"`` (learn the step ``s``) or ``"pact"`` (learn the clip ``alpha``; only
            for unsigned activations whose zero point is 0, i.e. after a ReLU).
        per_image: True for activations (LSQ's ``N`` counts the features of one image: the
            tensor's size over its first dimension), False for weights (``N`` counts the weights
            of one step: one output channel per channel, the whole tensor per tensor).
        observer: the observer that initialises the range (default ``"mse"``).
    """

    _BUFFERS = ("zero_point",)
    #: True inside ``calibration_mode``: observe (re-initialise) instead of learning
    calibrating = False

    def __init__(self, num_bits: int = 8, signed: bool = False, symmetric: bool = False,
                 axis: int | None = None, method: str = "lsq", per_image: bool = True,
                 observer="mse"):
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if method == "pact" and (signed or axis is not None):
            raise ValueError("method='pact' learns the clip of an unsigned per-tensor activation "
                             "(after a ReLU): use signed=False and axis=None, or method='lsq'")
        self._version_base = 0
        super().__init__(num_bits, signed, symmetric, axis, observer=observer)
        self.method, self.per_image = method, bool(per_image)
        #: LSQ: the step s; PACT: the clip alpha = quant_max * s
        self.learned = nn.Parameter(torch.empty(0))

    # -- the learned value seen as ordinary qparams ------------------------------------------
    def _floor(self) -> float:
        return MIN_STEP * (self.quant_max if self.method == "pact" else 1)

    def _learned_floored(self) -> torch.Tensor:
        """The learned value, floored at MIN_STEP in the forward pass only: its gradient passes
        the floor unchanged (straight through), so a step an optimizer pushed to 0 or below still
        learns and can come back, instead of sitting at the floor with a zero gradient."""
        p = self.learned.to(torch.float32)
        return p + (p.clamp_min(self._floor()) - p).detach()

    def _step(self) -> torch.Tensor:
        """The step as a differentiable float32 tensor (> 0)."""
        p = self._learned_floored()
        return p / self.quant_max if self.method == "pact" else p

    def check_usable(self, owner: str = "") -> None:
        """Refuse a learned step (or clip) that is not finite or sits at or below the floor
        ``MIN_STEP``: training pushed it there, and integer inference would use the floor."""
        super().check_usable(owner)
        value = self.learned.detach()
        bad = ~torch.isfinite(value) | (value <= self._floor())
        if value.numel() and bool(bad.any()):
            what = "clip alpha" if self.method == "pact" else "step"
            where = f" of {owner}" if owner else ""
            shown = ", ".join(f"{v:.4g}" for v in value.flatten()[bad.flatten()][:4].tolist())
            raise ValueError(f"the learned {what}{where} is {shown} (at or below "
                             f"{self._floor():.3g}, or not finite): training pushed it there; "
                             "lower the learning rate of the steps, or re-initialise them with "
                             "calibrate() before freeze()")

    @property
    def scale(self) -> torch.Tensor:
        if self.learned.numel() == 0:
            return torch.empty(0)
        with torch.no_grad():
            return self._step().detach().clone()

    @scale.setter
    def scale(self, value):
        raise AttributeError("a LearnedQParam's scale is learned: use set_range() to initialise it")

    @property
    def min_val(self) -> torch.Tensor:
        if not self.observed:
            return torch.empty(0)
        return self.scale * (self.quant_min - self.zero_point).to(torch.float32)

    @property
    def max_val(self) -> torch.Tensor:
        if not self.observed:
            return torch.empty(0)
        return self.scale * (self.quant_max - self.zero_point).to(torch.float32)

    @property
    def version(self) -> int:
        """Changes when the range is set and at every in-place update of the parameter."""
        p = self.__dict__.get("_parameters", {}).get("learned")
        return self._version_base + (p._version if p is not None else 0)

    @version.setter
    def version(self, value: int):
        self._version_base = value - (self.version - self._version_base)

    # -- initialisation ----------------------------------------------------------------------
    def set_range(self, min_val, max_val) -> LearnedQParam:
        """Initialise the step (and the fixed zero point) from a range, as QParam does."""
        scale, zero_point = calc_scale_zero_point(min_val, max_val, self.num_bits, self.signed,
                                                  self.symmetric)
        if self.method == "pact":
            if bool((zero_point != 0).any()):
                raise ValueError("method='pact' needs a range starting at 0 (an activation after a "
                                 f"ReLU); got [{float(torch.as_tensor(min_val).min()):.4g}, ...]")
            value = scale * self.quant_max
        else:
            value = scale
        with torch.no_grad():
            self.learned.data = value.to(torch.float32).clone()
        self.zero_point = zero_point
        self.version += 1
        if self.frozen_by is not None:
            warnings.warn(f"{self.frozen_by} was frozen, and its learned range was just "
                          "re-initialised: call freeze() again before integer inference",
                          UserWarning, stacklevel=3)
            self.frozen_by = None
        return self

    def update(self, x: torch.Tensor) -> LearnedQParam:
        """Observe ``x`` and set the range from the observer, unless the range is being learned
        (initialised already, and not inside ``calibrate()``)."""
        if self.observed and (not self.calibrating or not self.observing):
            return self
        check_float_tensor(x, "x", finite=False)  # the observer checks the values
        check_axis(self.axis, x.dim())
        self.observer.observe(x.detach())
        self.set_range(*self.observer.calculate_range(self.num_bits, self.signed, self.symmetric))
        return self

    # -- the forward pass --------------------------------------------------------------------
    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's ``1 / sqrt(N * Q_p)`` for ``x`` (see ``per_image``)."""
        if self.per_image:
            n = x.numel() // max(x.shape[0], 1) if x.dim() > 0 else 1
        else:
            n = x.numel() // (x.shape[self.axis] if self.axis is not None else 1)
        q_p = self.quant_max - int(self.zero_point.min()) if self.zero_point.numel() else 1
        return lsq_grad_scale(n, q_p)

    def fake_quantize(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """LSQ (or PACT) fake quantization with the learned step: the values of
        ``dequantize(quantize(x))`` with ``scale``, and gradients for ``x`` and the step
        (``check_finite`` is accepted for QParam's signature and ignored: ``lsq_fake_quantize``
        and ``pact_fake_quantize`` always check ``x``)."""
        self._check_observed()
        if self.method == "pact":
            return pact_fake_quantize(x, self._learned_floored(), self.quant_max)
        return lsq_fake_quantize(x, self._step(), self.zero_point, self.quant_min,
                                 self.quant_max, self.axis, self.grad_scale(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        return self.fake_quantize(x)

    # -- state_dict ----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "learned"
        if key in state_dict:
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or value.dim() > 1 or value.is_complex():
                error_msgs.append(f"{key}: expected a real tensor of shape () or (C,)")
            elif value.numel() and not bool((torch.isfinite(value) & (value > 0)).all()):
                error_msgs.append(f"{key}: a learned step (or PACT clip) must be finite and "
                                  f"positive; got {value.flatten()[:4].tolist()}")
            else:
                with torch.no_grad():
                    self.learned.data = value.detach().to(torch.float32).clone()
                self.version += 1
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.method}, " + super().extra_repr()


#: accepted values of ``quantize_model(..., learn_ranges=...)``
LEARN_RANGES = (False, True, "lsq", "pact")


def check_learn_ranges(learn_ranges) -> str | None:
    """None (no learned ranges), ``"lsq"`` or ``"pact"`` from a ``learn_ranges`` argument."""
    if learn_ranges is False:
        return None
    if learn_ranges is True:
        return "lsq"
    if isinstance(learn_ranges, str) and learn_ranges in METHODS:
        return learn_ranges
    raise ValueError(f"learn_ranges must be one of {LEARN_RANGES}; got {learn_ranges!r}")
