"""What every quantized layer shares: the life cycle (observe -> ``freeze()`` ->
``quantize_inference()``), the frozen flag and its staleness, the checks of integer inputs, the
copying of QParams, and the checkpoint plumbing (frozen buffers whose shapes change at freeze).

The layers themselves: :mod:`quantlab.weighted` (QConv2d, QLinear, QConvBNReLU),
:mod:`quantlab.modules` (ReLU, max-pool, flatten) and :mod:`quantlab.ops`. Taught in notebooks
``d_post_training_quantize`` and ``e_conv_quantization_walkthrough``.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ._validate import check_bool, check_int_tensor
from .observer import QParam, apply_keeping_dtypes

#: float32 holds every integer of magnitude up to 2**24 exactly
FLOAT32_EXACT = 2**24
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: largest |bias integer| above 8 bits (an int64 bias, as TFLite's 16x8 kernels; kept below 2**52
#: so that acc + bias stays exact in float64)
INT64_BIAS_MAX = 2**52


def check_integer_input(q: torch.Tensor, qparam: QParam, name: str = "q_x") -> torch.Tensor:
    """Raise unless ``q`` is an integer tensor inside ``qparam``'s integer range."""
    check_int_tensor(q, name)
    lo, hi = int(q.min()), int(q.max())
    if lo < qparam.quant_min or hi > qparam.quant_max:
        raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [{qparam.quant_min}, "
                         f"{qparam.quant_max}], the range of the input's QParam")
    return q


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
        return apply_keeping_dtypes(self, self._frozen_buffers, super()._apply, fn, *args,
                                    **kwargs)

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
