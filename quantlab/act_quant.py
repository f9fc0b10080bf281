"""Activations of a transformer: what flows into its Linears, quantized (W8A8, W4A4, ...).

A W8A8 transformer quantizes the input of every Linear (and its weight); LayerNorm, softmax, GELU,
the attention matmuls and the residual stream stay float. The input's scale is either

- ``"tensor"``: one scale for the whole input. *Static* when it is calibrated once
  (:func:`calibrate_absmax`, the largest ``|x|`` seen on calibration text) and fixed; *dynamic*
  when computed from each call's input (``absmax=None``);
- ``"token"``: one scale per row (per token), computed at run time from that row (dynamic).

Everything here is fake quantization (quantize, then dequantize in float32): it measures what the
rounding costs. The integer arithmetic that produces the same numbers, and ONNX Runtime running it,
is :mod:`quantlab.w8a8`. Activations use the symmetric grid ``q in [-qmax, qmax]``, ``qmax =
2**(bits-1) - 1``, ``scale = absmax / qmax`` (SmoothQuant's and QuaRot's choice); weights are
symmetric per output channel (:func:`fake_quantize_weight`, ONNX Runtime's rule at 8 bits).

Also here: the outlier tools of lesson k. :func:`channel_absmax` measures each input channel;
:func:`smooth_quant` migrates scale from activations to weights (Xiao et al. 2023) by folding
``s_j = max|x_j|**alpha / max|w_j|**(1 - alpha)`` into the producer of the input, so the float
model is unchanged; ``outlier_threshold`` gives LLM.int8()'s mixed decomposition (Dettmers et al.
2022): input columns whose ``|x|`` exceeds the threshold anywhere in the call are multiplied in
float, the rest in 8 bits. :class:`KVQuantizer` quantizes the attention's keys and values (the KV
cache). Taught in notebook ``k_activations``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_float_tensor, check_int
from .awq import FOLDS, fold_scales
from .weight_only import _set_module, linear_names

__all__ = ["GRANULARITIES", "fake_quantize_weight", "fake_quantize_activations", "ActQuantLinear",
           "calibrate_absmax", "channel_absmax", "quantize_activations", "smoothquant_scales",
           "smooth_quant", "KVQuantizer", "quantize_kv_cache", "kv_cache_bytes_per_token"]

GRANULARITIES = ("token", "tensor")
A_BITS = (2, 3, 4, 6, 8)


def _check_bits(bits, name: str, allowed=A_BITS) -> int:
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {bits!r}")
    return int(bits)


def _check_granularity(granularity) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    return granularity


def _fake_quant(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization of ``x`` with ``absmax`` broadcast against it (0 -> zeros)."""
    qmax = 2 ** (bits - 1) - 1
    scale = absmax / qmax
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round(x * inv).clamp(-qmax, qmax) * scale


def fake_quantize_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``w`` (out, in) on the symmetric grid per output channel, dequantized: ``scale =
    f32(max|w[c]| / qmax)``, ``q = clamp(rne(w / scale), -qmax, qmax)`` (a division), an all-zero
    row stays zero. At 8 bits these are the codes and scales ONNX Runtime's ``quantize_dynamic``
    stores (:func:`quantlab.w8a8.quantize_weight` with ``per_channel=True``), so a W8A8
    :class:`ActQuantLinear` multiplies the same integers as :class:`quantlab.w8a8.Int8Linear`."""
    w = check_float_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out, in); got shape {tuple(w.shape)}")
    bits = _check_bits(bits, "bits")
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -qmax, qmax) * scale


def fake_quantize_activations(x: torch.Tensor, bits: int = 8, granularity: str = "token",
                              absmax: float | torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., channels) quantized to ``bits`` on the symmetric grid and dequantized.

    ``granularity="token"``: one scale per row, ``max_j |x[..., j]| / qmax``; ``"tensor"``: one
    scale, from ``absmax`` if given (static: values beyond it are clipped) else from ``x``'s own
    largest magnitude (dynamic). Rounding is half to even (``torch.round``)."""
    x = check_float_tensor(x, "x")
    bits = _check_bits(bits, "bits")
    granularity = _check_granularity(granularity)
    if granularity == "token":
        if absmax is not None:
            raise ValueError("absmax is for granularity='tensor' (a per-token scale is computed "
                             "from each row at run time)")
        return _fake_quant(x, x.abs().amax(-1, keepdim=True), bits)
    if absmax is None:
        absmax = x.abs().amax()
    absmax = torch.as_tensor(absmax, dtype=x.dtype)
    if absmax.numel() != 1 or not torch.isfinite(absmax) or absmax < 0:
        raise ValueError(f"absmax must be one finite number >= 0; got {absmax}")
    return _fake_quant(x, absmax, bits)


class ActQuantLinear(nn.Module):
    """A Linear whose input is fake-quantized (``a_bits``, ``granularity``, optional static
    ``absmax``) and whose weight is symmetric per-channel fake-quantized to ``w_bits`` once
    (:func:`fake_quantize_weight`; ``None``:
    the weight is used as it is, e.g. already quantized by GPTQ).

    ``outlier_threshold``: LLM.int8()'s decomposition: the input columns where ``|x|`` exceeds it
    in this call are multiplied in float (float32 here; float16 in the paper's kernels), the others
    quantized; ``last_outliers`` keeps the indices of the columns the last call sent to float and
    ``last_outlier_columns`` their count."""

    def __init__(self, linear: nn.Linear, w_bits: int | None = 8, a_bits: int = 8,
                 granularity: str = "token", absmax: float | None = None,
                 outlier_threshold: float | None = None):
        super().__init__()
        self.a_bits = _check_bits(a_bits, "a_bits")
        self.granularity = _check_granularity(granularity)
        if absmax is not None and granularity != "tensor":
            raise ValueError("absmax is for granularity='tensor'")
        if outlier_threshold is not None and not outlier_threshold > 0:
            raise ValueError(f"outlier_threshold must be > 0 or None; got {outlier_threshold!r}")
        weight = linear.weight.detach()
        self.float_weight = None if outlier_threshold is None else weight.clone()  # LLM.int8: fp part
        if w_bits is not None:
            weight = fake_quantize_weight(weight, w_bits)
        self.w_bits = w_bits
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if linear.bias is None else \
            nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.absmax = absmax
        self.outlier_threshold = outlier_threshold
        self.last_outliers = torch.empty(0, dtype=torch.int64)
        self.last_outlier_columns = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outlier_threshold is None:
            return F.linear(self.quantize_input(x), self.weight, self.bias)
        outliers = x.detach().abs().flatten(0, -2).amax(0) > self.outlier_threshold
        self.last_outliers = outliers.nonzero().flatten()
        self.last_outlier_columns = len(self.last_outliers)
        x_out = x * outliers  # the float part: outlier columns only
        y = F.linear(self.quantize_input(x - x_out), self.weight * ~outliers, self.bias)
        return y + F.linear(x_out, self.float_weight * outliers)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized input this Linear multiplies."""
        return fake_quantize_activations(x, self.a_bits, self.granularity, self.absmax)

    def extra_repr(self) -> str:
        static = "static" if self.absmax is not None else "dynamic"
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, {self.granularity} ({static})"
                + (f", outliers > {self.outlier_threshold} in float" if self.outlier_threshold else ""))


class _Stats:
    """Forward pre-hooks that reduce each named Linear's input over the calibration batches."""

    def __init__(self, model: nn.Module, names, reduce):
        self.values, self.handles = {}, []
        for name in names:
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, name=name: self._see(name, reduce(args[0].detach()))))

    def _see(self, name, value):
        old = self.values.get(name)
        self.values[name] = value if old is None else torch.maximum(old, value)

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _collect(model: nn.Module, calib: torch.Tensor, names, reduce, batch_size: int) -> dict:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.int64:
        raise ValueError("calib must be an int64 tensor of token ids (sequences, positions)")
    names = linear_names(model) if names is None else list(names)
    stats = _Stats(model, names, reduce)
    was_training = model.training
    model.eval()
    try:
        for batch in calib.split(check_int(batch_size, "batch_size", 1)):
            model(batch)
    finally:
        stats.remove()
        model.train(was_training)
    return stats.values


def calibrate_absmax(model: nn.Module, calib: torch.Tensor, names=None, batch_size: int = 32) -> dict:
    """``{Linear name: largest |x| its input reached on calib}`` (floats): static per-tensor scales."""
    values = _collect(model, calib, names, lambda x: x.abs().amax(), batch_size)
    return {k: float(v) for k, v in values.items()}


def channel_absmax(model: nn.Module, calib: torch.Tensor, names=None, batch_size: int = 32) -> dict:
    """``{Linear name: max |x_j| per input channel j}`` over ``calib`` (float32 vectors)."""
    return _collect(model, calib, names, lambda x: x.abs().flatten(0, -2).amax(0), batch_size)


def quantize_activations(model: nn.Module, w_bits: int | None = 8, a_bits: int = 8,
                         granularity: str = "token", calib: torch.Tensor | None = None,
                         names=None, outlier_threshold: float | None = None) -> nn.Module:
    """A copy of ``model`` whose Linears (all, or ``names``) are :class:`ActQuantLinear` s:
    W``w_bits`` A``a_bits``. ``granularity="tensor"`` with ``calib`` (token ids) calibrates one
    static scale per Linear input (:func:`calibrate_absmax`); without ``calib`` the per-tensor
    scale is dynamic. ``w_bits=None`` keeps the weights as they are."""
    _check_bits(a_bits, "a_bits")
    _check_granularity(granularity)
    names = linear_names(model) if names is None else list(names)
    absmax = {}
    if calib is not None:
        if granularity != "tensor":
            raise ValueError("calib calibrates static per-tensor scales: pass granularity='tensor'")
        absmax = calibrate_absmax(model, calib, names)
    qmodel = copy.deepcopy(model)
    for name in names:
        linear = qmodel.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not a torch.nn.Linear")
        _set_module(qmodel, name, ActQuantLinear(linear, w_bits, a_bits, granularity,
                                                 absmax.get(name), outlier_threshold))
    return qmodel


def smoothquant_scales(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s_j = max|x_j|**alpha / max_i |w_ij|**(1 - alpha)``
    (float32; channels where either maximum is 0 get ``s = 1``). Dividing ``x_j`` by ``s_j`` and
    multiplying column ``j`` of the weight by it leaves the product unchanged."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    x_absmax = check_float_tensor(x_absmax, "x_absmax").double()
    w_absmax = weight.detach().abs().amax(0).double()
    if x_absmax.shape != w_absmax.shape:
        raise ValueError(f"x_absmax has {tuple(x_absmax.shape)} channels; the weight has "
                         f"{tuple(w_absmax.shape)} input columns")
    s = x_absmax ** alpha / w_absmax ** (1 - alpha)
    ok = (x_absmax > 0) & (w_absmax > 0)
    return torch.where(ok, s, torch.ones_like(s)).float()


def smooth_quant(model: nn.Module, calib: torch.Tensor, alpha: float = 0.5, kinds=("qkv", "fc")):
    """A copy of a TinyGPT with SmoothQuant's scales folded into the producers of the inputs of
    the Linears of ``kinds`` (``qkv``, ``fc``: into ln1/ln2; ``proj``: into the value rows), from
    the channel maxima on ``calib``. Returns ``(model, {name: s})``; the float function is
    unchanged up to float rounding (:func:`quantlab.awq.fold_scales`)."""
    bad = [k for k in kinds if not FOLDS.get(k)]
    if bad:
        raise ValueError(f"kinds must be among {[k for k, v in FOLDS.items() if v]}; got {bad}")
    names = [n for n in linear_names(model) if n.rpartition(".")[2] in kinds]
    stats = channel_absmax(model, calib, names)
    scales = {n: smoothquant_scales(stats[n], model.get_submodule(n).weight, alpha) for n in names}
    return fold_scales(model, scales), scales


class KVQuantizer(nn.Module):
    """Fake quantization of an attention's keys and values (B, heads, T, head_dim): ``bits`` on
    the asymmetric min/max grid, keys per ``key_axis`` and values per ``value_axis``:
    ``"token"`` = one scale/zero point per (head, token) over the head's channels, ``"channel"`` =
    one per (head, channel) over each group of ``group`` consecutive tokens (KIVI's layout). Scales
    are stored as float16. The whole window is quantized at once: a token's per-channel grid is set
    by its whole group, later tokens included, and the last, partial group is quantized too, where
    a decoding cache (KIVI) keeps its newest tokens in float until their group is complete."""

    AXES = ("token", "channel")

    def __init__(self, bits: int = 8, key_axis: str = "channel", value_axis: str = "token",
                 group: int = 32):
        super().__init__()
        self.bits = _check_bits(bits, "bits")
        for name, axis in (("key_axis", key_axis), ("value_axis", value_axis)):
            if axis not in self.AXES:
                raise ValueError(f"{name} must be one of {', '.join(self.AXES)}; got {axis!r}")
        self.key_axis, self.value_axis = key_axis, value_axis
        self.group = check_int(group, "group", 1)

    def quantize(self, z: torch.Tensor, axis: str) -> torch.Tensor:
        if axis == "token":
            return _minmax_fake_quant(z, self.bits)
        b, h, t, d = z.shape
        pad = (-t) % self.group
        zp = F.pad(z, (0, 0, 0, pad)).view(b, h, (t + pad) // self.group, self.group, d)
        zq = _minmax_fake_quant(zp.transpose(-1, -2), self.bits)  # zero padding: ranges include 0
        return zq.transpose(-1, -2).reshape(b, h, t + pad, d)[:, :, :t]

    def forward(self, k: torch.Tensor, v: torch.Tensor):
        return self.quantize(k, self.key_axis), self.quantize(v, self.value_axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, keys per {self.key_axis}, values per {self.value_axis}, group={self.group}"


def _minmax_fake_quant(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max fake quantization along the last dim (the range includes 0), the
    scale rounded to float16 as a cache stores it, an integer zero point in ``0 .. 2**bits - 1``."""
    lo, hi = z.amin(-1, keepdim=True).clamp(max=0), z.amax(-1, keepdim=True).clamp(min=0)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).half().float()  # stored as float16 (2 bytes per grid)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    zero = torch.round(-lo * inv).clamp(0, levels)
    return (torch.round(z * inv + zero).clamp(0, levels) - zero) * scale


def quantize_kv_cache(model: nn.Module, bits: int = 8, key_axis: str = "channel",
                      value_axis: str = "token", group: int = 32) -> nn.Module:
    """A copy of a TinyGPT whose blocks quantize their keys and values (:class:`KVQuantizer`)."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.kv_quantizer = KVQuantizer(bits, key_axis, value_axis, group)
    return model


def kv_cache_bytes_per_token(n_layers: int, d_model: int, n_heads: int, bits: int | None,
                             key_axis: str = "channel", value_axis: str = "token",
                             group: int = 32) -> float:
    """Bytes the KV cache holds per token: keys and values of every layer at ``bits`` (``None``:
    float16), plus a float16 scale and a ``bits``-bit zero point per (head, token) for ``"token"``
    or per (channel, group of ``group`` tokens) for ``"channel"``."""
    if bits is None:
        return 2 * n_layers * d_model * 2.0
    total = 0.0
    for axis in (key_axis, value_axis):
        codes = d_model * bits / 8
        params = (n_heads if axis == "token" else d_model / group) * (2 + bits / 8)
        total += codes + params
    return n_layers * total
