"""``QParam``: observes ranges and holds the scale and zero point of one tensor.

The quantized modules hold one per quantized tensor, as ``q_in``, ``q_w`` and ``q_out``.
Which range it quantizes is its observer's choice (``quantlab.observers``: min/max by default,
moving average, percentile, MSE, entropy, histogram); the QParam derives scale and zero point
from that range with ``calc_scale_zero_point``.

It is an ``nn.Module`` whose buffers (``min_val``, ``max_val``, ``scale``, ``zero_point``) travel
with the model's ``state_dict``, so a frozen model can be saved and loaded.
Taught in notebooks ``a_basic_quant`` (by hand) and ``d_post_training_quantize`` (in modules).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._validate import check_bool, check_real
from .observers import make_observer
from .qparams import (
    calc_scale_zero_point,
    check_axis,
    check_float_tensor,
    quant_range,
)
from .quantize import dequantize, fake_quantize, quantize

_BUFFERS = ("min_val", "max_val", "scale", "zero_point")


def apply_keeping_dtypes(module: nn.Module, names, apply, fn, *args, **kwargs):
    """``module._apply`` (what ``.to()``, ``.half()``, ``.cuda()`` call) through ``apply``, with the
    buffers ``names`` kept in their dtypes: they follow device moves only."""
    saved = {name: getattr(module, name) for name in names}
    out = apply(fn, *args, **kwargs)
    for name, old in saved.items():
        new = getattr(module, name)
        if new.dtype != old.dtype:
            setattr(module, name, old.to(device=new.device))
    return out


class QParam(nn.Module):
    """Range observer plus the qparams derived from it.

    Args:
        num_bits: 2..16.
        signed: integer range signed (``[-2**(b-1), 2**(b-1)-1]``) or unsigned (``[0, 2**b-1]``).
        symmetric: symmetric range (zero point 0 when signed) instead of affine min/max.
        axis: None for one scale per tensor; the channel axis for one scale per channel.
        averaging_constant: None keeps the all-time min/max (calibration); a value ``c`` in (0, 1]
            keeps a moving average ``range <- range + c * (batch_range - range)`` (QAT); ``c == 1``
            follows the latest tensor only (weights), whatever the observer.
        observer: the range estimator: None (min/max, or the moving average when
            ``averaging_constant`` is given), a name in ``quantlab.observers.OBSERVERS``
            ("minmax", "moving_average", "percentile", "mse", "entropy", "histogram") or an
            ``Observer`` instance. Its state (e.g. a histogram) is not part of the state_dict.
    """

    #: the state kept as buffers (a subclass may derive some of them, e.g. a learned scale)
    _BUFFERS = _BUFFERS

    def __init__(self, num_bits: int = 8, signed: bool = False, symmetric: bool = False,
                 axis: int | None = None, averaging_constant: float | None = None,
                 observer=None):
        super().__init__()
        self.quant_min, self.quant_max = quant_range(num_bits, signed)
        symmetric = check_bool(symmetric, "symmetric")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be None or an int; got {axis!r}")
        if averaging_constant is not None:
            averaging_constant = check_real(averaging_constant, "averaging_constant", 0, 1,
                                            low_open=True)
        self.num_bits, self.signed, self.symmetric, self.axis = num_bits, signed, symmetric, axis
        self.averaging_constant = averaging_constant
        self.observer = make_observer(observer, axis, averaging_constant)
        #: when False, update() leaves the range alone (a frozen observer)
        self.observing = True
        #: bumped whenever the qparams change: a frozen layer compares it with its freeze() time
        self.version = 0
        #: set by a layer's freeze(); the first change afterwards warns that the layer is stale
        self.frozen_by = None
        for name in self._BUFFERS:
            self.register_buffer(name, torch.empty(0))

    def _apply(self, fn, *args, **kwargs):
        # .to(torch.float64) / .half() must not change frozen qparams: keep the buffers' dtype
        # (a float16 round trip would move the scale), move them to the new device only
        return apply_keeping_dtypes(self, self._BUFFERS, super()._apply, fn, *args, **kwargs)

    @property
    def observed(self) -> bool:
        """True once a batch has been observed (or qparams were loaded or set)."""
        return self.scale.numel() > 0

    def check_usable(self, owner: str = "") -> None:
        """Raise unless these qparams can be frozen into integers (a learned step checks more)."""
        if not self.observed:
            raise RuntimeError(f"the qparams{' of ' + owner if owner else ''} have observed "
                               "nothing: calibrate() first")

    def _check_observed(self):
        if not self.observed:
            raise RuntimeError("this QParam has observed nothing: call update(x) with a batch "
                               "first (calibration: forward passes in training mode, or "
                               "calibrate()), or load a state_dict")

    def update(self, x: torch.Tensor) -> QParam:
        """Observe a batch with the observer and recompute the range, scale and zero point.

        Min/max and moving average continue from ``min_val``/``max_val`` (also after
        ``set_range`` or ``load_state_dict``); the histogram observers from their own histogram.
        Observing after a layer's ``freeze()`` un-freezes that layer (with a warning): its integer
        weights, biases and multipliers no longer match these qparams until ``freeze()`` again.
        """
        if not self.observing and self.observed:
            return self
        check_float_tensor(x, "x", finite=False)  # the observer checks the values
        check_axis(self.axis, x.dim())
        if self.averaging_constant == 1.0:
            self.observer.reset()
        elif self.min_val.numel() > 0:
            self.observer.load_range(self.min_val, self.max_val)  # min/max kinds only
        self.observer.observe(x)
        self.set_range(*self.observer.calculate_range(self.num_bits, self.signed, self.symmetric))
        return self

    def set_range(self, min_val, max_val) -> QParam:
        """Set the range directly and recompute ``scale`` and ``zero_point``."""
        scale, zero_point = calc_scale_zero_point(min_val, max_val, self.num_bits, self.signed,
                                                  self.symmetric)
        min_val = torch.as_tensor(min_val, dtype=torch.float32).clone()
        max_val = torch.as_tensor(max_val, dtype=torch.float32).clone()
        if self.observed and torch.equal(min_val, self.min_val) and torch.equal(max_val,
                                                                               self.max_val):
            return self  # nothing moved (e.g. the weights' range on an unchanged layer)
        self.min_val, self.max_val = min_val, max_val
        self.scale, self.zero_point = scale, zero_point
        self.version += 1
        if self.frozen_by is not None:
            warnings.warn(f"{self.frozen_by} was frozen, and its qparams just changed "
                          "(calibrate(), a forward pass in training mode, or QAT observed new "
                          "ranges): it is no longer frozen; call freeze() again before integer "
                          "inference", UserWarning, stacklevel=3)
            self.frozen_by = None
        return self

    def quantize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``quantize(x)`` with this QParam's qparams: an int32 tensor."""
        self._check_observed()
        return quantize(x, self.scale, self.zero_point, self.num_bits, self.signed, self.axis)

    def dequantize_tensor(self, q: torch.Tensor) -> torch.Tensor:
        """``dequantize(q)`` with this QParam's qparams: a float32 tensor."""
        self._check_observed()
        return dequantize(q, self.scale, self.zero_point, self.axis)

    def fake_quantize(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """``dequantize(quantize(x))`` with a straight-through gradient."""
        self._check_observed()
        return fake_quantize(x, self.scale, self.zero_point, self.num_bits, self.signed, self.axis,
                             check_finite=check_finite)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` (in training mode, when observing) and return it fake-quantized.

        In eval mode nothing is observed, so evaluating a QAT model never moves its ranges
        (``QuantizedNet.calibrate`` puts only the QParams in training mode).
        """
        if self.observing and self.training:
            self.update(x)  # its observer found the min and max of x finite
            return self.fake_quantize(x, check_finite=False)
        return self.fake_quantize(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # buffers change shape once observed (() or (C,)): take the stored ones as they are
        for name in self._BUFFERS:
            key = prefix + name
            if key in state_dict:
                value = state_dict[key]
                if not isinstance(value, torch.Tensor):
                    error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
                    continue
                if value.dim() > 1:
                    error_msgs.append(f"{key}: expected shape () or (C,), got "
                                      f"{tuple(value.shape)}")
                    continue
                setattr(self, name, value.clone())
            elif strict:
                missing_keys.append(key)
        if strict:  # torch passes strict=True here and decides later whether to raise
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix)
                                   and k[len(prefix):] not in self._BUFFERS
                                   and k[len(prefix):] not in self._parameters)
        if self.observed:
            want = self.scale.shape
            for name in self._BUFFERS:
                if getattr(self, name).shape != want:
                    error_msgs.append(f"{prefix}{name}: shape {tuple(getattr(self, name).shape)}"
                                      f" does not match scale's {tuple(want)}")

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "affine"
        dtype = f"{'int' if self.signed else 'uint'}{self.num_bits}"
        where = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        s = f"{dtype}, {kind}, {where}, range=[{self.quant_min}, {self.quant_max}]"
        if not self.observed:
            return s + ", not observed"
        if self.scale.dim() == 0:
            return (s + f", min={self.min_val.item():.6g}, max={self.max_val.item():.6g}, "
                    f"scale={self.scale.item():.6g}, zero_point={self.zero_point.item()}")
        return (s + f", channels={self.scale.numel()}, scale in [{self.scale.min().item():.4g}, "
                f"{self.scale.max().item():.4g}], zero_point in [{self.zero_point.min().item()}, "
                f"{self.zero_point.max().item()}]")
