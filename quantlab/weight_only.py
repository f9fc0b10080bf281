"""Weight-only quantization in groups along the input, packing, and the weight-only Linear.

A Linear's weight ``w`` (out, in) is cut into groups of ``group_size`` consecutive input columns of
one output row (``group_size=None``: the whole row, "per channel"); each group gets its own scale
(and zero point), the integers are packed ``8 // bits`` to a byte (3-bit: 8 values in 3 bytes),
and :class:`WeightOnlyLinear` unpacks and dequantizes them inside its forward. Activations stay
float: this is what LLM runtimes do first (llama.cpp's Q4_0/Q8_0, GPTQ/AWQ checkpoints), because
decoding one token reads every weight once per token.

Conventions (the same as llama.cpp's reference quantizers, so that quantlab's blocks are
byte-identical with ``gguf.quants`` when configured like them; see tests/test_weight_only.py):

- the scale is computed in float32 from the group, the integers from ``w * (1 / scale)`` in
  float32, and the scale is then **stored as float16** (2 bytes per group); dequantization is
  ``float32(scale_fp16) * (q - zero_point)``;
- ``symmetric=True``: ``scale = absmax / qmax``, ``q`` in ``[-qmax, qmax]``, ``qmax = 2**(bits-1)
  - 1`` (Q8_0 at 8 bits; at 2 bits this grid is ternary {-1, 0, 1});
  ``signed_max=True`` instead uses the full range ``[-2**(bits-1), 2**(bits-1) - 1]`` with
  ``scale = m / -2**(bits-1)`` where ``m`` is the group's value of largest magnitude, sign
  included (so ``m`` is exactly ``-2**(bits-1) * scale``; the scale may be negative; Q4_0);
- ``symmetric=False``: ``min_val = min(w, 0)``, ``max_val = max(w, 0)``, ``scale = (max_val -
  min_val) / (2**bits - 1)``, integer ``zero_point = clamp(round(-min_val / scale), 0, 2**bits -
  1)``, ``q = clamp(round(w / scale) + zero_point, 0, 2**bits - 1)`` (PyTorch's affine rule);
- an all-zero group has scale 0 and dequantizes to exact zeros (the inverse of a scale below the
  smallest normal float32, whose reciprocal overflows, is taken as 0: such a group is all zero);
- ``rounding``: ``"half_even"`` (``torch.round``, the default), ``"half_away"`` (C's ``roundf``,
  Q8_0), ``"half_up"`` (``floor(y + offset + 0.5) - offset`` in float32 with ``offset`` the code of
  zero, as Q4_0 computes ``trunc(y + 8.5)``).

Taught in notebook ``i_low_bit_weights``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pathlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import FLOAT32_TINY, check_bool, check_float_tensor, check_int

BITS = (2, 3, 4, 8)
ROUNDINGS = ("half_even", "half_away", "half_up")
FORMAT = "quantlab-weight-only/1"


class GroupQuant(NamedTuple):
    """A weight quantized in groups: ``codes`` (out, in) int32 in ``[0, 2**bits - 1]`` (the stored
    unsigned integers: ``q + 2**(bits-1)`` when symmetric, ``q`` when not), ``scale`` (out,
    n_groups) float16, ``zero_point`` (out, n_groups) int32 codes of real zero, and the settings."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool


def check_settings(bits, group_size, symmetric, signed_max=False, rounding="half_even"):
    """Validate and normalise the settings (errors name the argument and the accepted values)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}; got {bits!r}")
    if group_size is not None:
        group_size = check_int(group_size, "group_size", 1)
    symmetric = check_bool(symmetric, "symmetric")
    signed_max = check_bool(signed_max, "signed_max")
    if signed_max and not symmetric:
        raise ValueError("signed_max=True needs symmetric=True (it is a symmetric grid)")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}; got {rounding!r}")
    return int(bits), group_size, symmetric, signed_max, rounding


def _round(y: torch.Tensor, rounding: str, offset) -> torch.Tensor:
    """``y`` rounded to integers, then ``offset`` added (float32)."""
    if rounding == "half_even":
        return torch.round(y) + offset
    if rounding == "half_away":  # exact: floor(|y| + 0.5) could round up in float32
        a = y.abs()
        f = torch.floor(a)
        return torch.sign(y) * (f + (a - f >= 0.5).to(y.dtype)) + offset
    return torch.floor(y + (offset + 0.5))  # half_up, as ggml: trunc(y + offset + 0.5)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale``, and 0 where ``|scale|`` is below the smallest normal float32 (0 included)."""
    return torch.where(scale.abs() < FLOAT32_TINY, 0.0, 1.0 / scale)


def qparams(groups: torch.Tensor, bits: int, symmetric: bool, signed_max: bool = False):
    """Float32 ``scale`` and integer ``zero_point`` (as float) of each group along the last dim of
    ``groups`` (..., g), and the code range: returns ``(scale, zero_point, quant_min, quant_max)``
    where codes are ``round(w / scale) + zero_point`` clamped to ``[quant_min, quant_max]``."""
    levels = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        if signed_max:
            idx = groups.abs().argmax(-1, keepdim=True)  # first of equal magnitudes, as numpy
            scale = groups.gather(-1, idx).squeeze(-1) / -half
            low = 0
        else:
            scale = groups.abs().amax(-1) / (half - 1)
            low = 1
        return scale, torch.full_like(scale, half), low, levels
    min_val = groups.amin(-1).clamp(max=0)
    max_val = groups.amax(-1).clamp(min=0)
    scale = (max_val - min_val) / levels
    inv = _inverse(scale)
    zero_point = torch.round(-min_val * inv).clamp(0, levels)
    return scale, zero_point, 0, levels


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                   quant_max: int, rounding: str = "half_even") -> torch.Tensor:
    """Codes of ``w`` (..., g) with per-group ``scale``/``zero_point`` (...,): ``clamp(round(w *
    (1 / scale)) + zero_point, quant_min, quant_max)`` as int32 (scale 0 gives the zero point)."""
    inv = _inverse(scale)[..., None]
    codes = _round(w * inv, rounding, zero_point[..., None])
    return codes.clamp(quant_min, quant_max).to(torch.int32)


def _groups(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """``w`` (out, in) as (out, n_groups, g), zero-padded on the right when ``g`` does not divide
    ``in`` (zeros change no group's range: the range includes 0 and the absmax ignores them)."""
    out, n_in = w.shape
    g = n_in if group_size is None else min(group_size, n_in)
    pad = -n_in % g
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(out, -1, g), g


def quantize_groups(w: torch.Tensor, bits: int = 4, group_size: int | None = None,
                    symmetric: bool = False, signed_max: bool = False,
                    rounding: str = "half_even") -> GroupQuant:
    """Round-to-nearest quantization of a weight (out, in) in groups along the input.

    Args:
        w: float weight (out, in), finite.
        bits: 2, 3, 4 or 8. group_size: None (one group per row) or an int >= 1.
        symmetric, signed_max, rounding: the grid (see the module's docstring).
    Returns:
        :class:`GroupQuant` with ``n_groups = ceil(in / group_size)``.
    """
    bits, group_size, symmetric, signed_max, rounding = check_settings(
        bits, group_size, symmetric, signed_max, rounding)
    check_float_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be a weight (out, in); got shape {tuple(w.shape)}")
    n_in = w.shape[1]
    groups, g = _groups(w.detach().float(), group_size)
    scale, zero_point, qmin, qmax = qparams(groups, bits, symmetric, signed_max)
    codes = quantize_codes(groups, scale, zero_point, qmin, qmax, rounding)
    scale16 = scale.to(torch.float16)
    if not bool(torch.isfinite(scale16).all()):
        raise ValueError("w has a group whose scale overflows float16 (|w| > 65504 * qmax)")
    return GroupQuant(codes.reshape(w.shape[0], -1)[:, :n_in], scale16,
                      zero_point.to(torch.int32), bits, g, symmetric)


def dequantize_groups(gq: GroupQuant) -> torch.Tensor:
    """The float32 weight (out, in): ``float32(scale) * (codes - zero_point)`` group by group."""
    out, n_in = gq.codes.shape
    codes, _ = _groups(gq.codes, gq.group_size)
    w = gq.scale.float()[..., None] * (codes - gq.zero_point[..., None]).float()
    return w.reshape(out, -1)[:, :n_in]


def fake_quantize_groups(w: torch.Tensor, bits: int = 4, group_size: int | None = None,
                         symmetric: bool = False, **kwargs) -> torch.Tensor:
    """``dequantize_groups(quantize_groups(w, ...))``: the weight the quantized model uses."""
    return dequantize_groups(quantize_groups(w, bits, group_size, symmetric, **kwargs))


# ---- packing: the stored bytes ----

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (any shape, values in ``[0, 2**bits - 1]``) into a 1-D uint8 tensor,
    row-major, least significant bits first: 8 bits one per byte, 4 bits two per byte (value 2k in
    the low nibble), 2 bits four per byte, 3 bits eight values in three bytes (a 24-bit word).
    The last byte(s) are padded with zero codes; :func:`unpack` needs the count back."""
    bits = check_settings(bits, None, True)[0]
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in 0..{2 ** bits - 1} for bits={bits}")
    per_word, word_bytes = (8, 3) if bits == 3 else (8 // bits, 1)
    flat = F.pad(flat, (0, -flat.numel() % per_word)).view(-1, per_word)
    word = (flat << (bits * torch.arange(per_word))).sum(1)  # < 2**24
    shifts = 8 * torch.arange(word_bytes)
    return ((word[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes (int32, 1-D) of bytes written by :func:`pack`."""
    bits = check_settings(bits, None, True)[0]
    per_word, word_bytes = (8, 3) if bits == 3 else (8 // bits, 1)
    by = packed.to(torch.int64).view(-1, word_bytes)
    word = (by << (8 * torch.arange(word_bytes))).sum(1)
    codes = (word[:, None] >> (bits * torch.arange(per_word))) & (2 ** bits - 1)
    return codes.reshape(-1)[:numel].to(torch.int32)


# ---- the weight-only Linear ----

class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored packed in groups and dequantized inside ``forward``.

    Stored (buffers): ``packed`` (uint8 codes), ``scale`` (float16, out x n_groups),
    ``packed_zero_point`` (uint8, asymmetric only, zero points packed at ``bits``), ``bias``
    (float32, or none). :meth:`weight` unpacks and dequantizes; ``forward(x) = x @ weight().T +
    bias``, activations float.
    """

    def __init__(self, gq: GroupQuant, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = gq.codes.shape
        self.bits, self.group_size, self.symmetric = gq.bits, gq.group_size, gq.symmetric
        self.register_buffer("packed", pack(gq.codes, gq.bits))
        self.register_buffer("scale", gq.scale.clone())
        zp = None if gq.symmetric else pack(gq.zero_point, gq.bits)
        self.register_buffer("packed_zero_point", zp)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = None,
                    symmetric: bool = False, **kwargs) -> WeightOnlyLinear:
        """Quantize ``linear.weight`` with :func:`quantize_groups` (round to nearest)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        gq = quantize_groups(linear.weight, bits, group_size, symmetric, **kwargs)
        return cls(gq, linear.bias)

    def group_quant(self) -> GroupQuant:
        """The stored weight unpacked: codes, scale, zero points."""
        shape = (self.out_features, self.in_features)
        codes = unpack(self.packed, self.bits, shape[0] * shape[1]).view(shape)
        if self.symmetric:
            zp = torch.full(self.scale.shape, 2 ** (self.bits - 1), dtype=torch.int32)
        else:
            zp = unpack(self.packed_zero_point, self.bits, self.scale.numel()).view(self.scale.shape)
        return GroupQuant(codes, self.scale, zp, self.bits, self.group_size, self.symmetric)

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (out, in)."""
        return dequantize_groups(self.group_quant())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight: packed codes + float16 scales + packed zero points."""
        zp = 0 if self.packed_zero_point is None else self.packed_zero_point.numel()
        return self.packed.numel() + 2 * self.scale.numel() + zp

    def bits_per_weight(self) -> float:
        """``8 * weight_bytes() / (out * in)``: the bits stored per weight, scales included."""
        return 8 * self.weight_bytes() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model`` (in ``named_modules`` order)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_linears(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                     symmetric: bool = False, skip=(), weights: dict | None = None,
                     **kwargs) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` (except the names in ``skip``) replaced by a
    :class:`WeightOnlyLinear` (round to nearest, or the already-quantized ``weights[name]``
    :class:`GroupQuant` given by GPTQ/AWQ). ``model`` itself is not changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_settings(bits, group_size, symmetric, **kwargs)
    names = linear_names(model)
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(f"skip names no Linear of the model: {unknown[:4]}; Linears: {names[:6]}...")
    if not names:
        raise ValueError("model has no nn.Linear to quantize")
    qmodel = copy.deepcopy(model)
    for name in names:
        if name in skip:
            continue
        linear = qmodel.get_submodule(name)
        if weights is not None and name in weights:
            new = WeightOnlyLinear(weights[name], linear.bias)
        else:
            new = WeightOnlyLinear.from_linear(linear, bits, group_size, symmetric, **kwargs)
        _set_module(qmodel, name, new)
    return qmodel.eval()


def map_weights(model: nn.Module, fn, kinds=(nn.Linear,), skip=()) -> nn.Module:
    """A copy of ``model`` in which the weight of every module of the classes ``kinds`` (except the
    names in ``skip``) is replaced by ``fn(weight as (out, -1))``, reshaped back: a number format
    tried on every weight at once (lesson l), with the model's float arithmetic unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable (a tensor -> a tensor of its shape); got {type(fn).__name__}")
    qmodel = copy.deepcopy(model)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, tuple(kinds)) and n not in skip]
    if not names:
        raise ValueError(f"model has no module of {[k.__name__ for k in kinds]} to change")
    with torch.no_grad():
        for name in names:
            w = qmodel.get_submodule(name).weight
            new = fn(w.detach().reshape(w.shape[0], -1))
            if not isinstance(new, torch.Tensor) or new.numel() != w.numel():
                raise ValueError(f"fn must return a tensor of {w.numel()} values for {name}")
            w.copy_(new.reshape(w.shape))
    return qmodel.eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` stores (a tensor shared by two modules, such
    as a tied embedding and head, is counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def save_quantized(model: nn.Module, path) -> str:
    """Write the state (packed bytes, scales, everything else) and the settings of each
    :class:`WeightOnlyLinear` to ``path``; returns the file's sha256."""
    layers = {name: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                     "shape": [m.out_features, m.in_features], "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    if not layers:
        raise ValueError("model holds no WeightOnlyLinear: quantize it with quantize_linears first")
    path = pathlib.Path(os.fspath(path))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "layers": layers, "state_dict": state}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_quantized(model: nn.Module, path) -> nn.Module:
    """A copy of the float ``model`` (its architecture) with the quantized layers and state saved
    by :func:`save_quantized` (loaded with ``weights_only=True``)."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a file written by quantlab.weight_only.save_quantized")
    qmodel = copy.deepcopy(model)
    for name, s in obj["layers"].items():
        out, n_in = s["shape"]
        n_groups = -(-n_in // s["group_size"])
        gq = GroupQuant(torch.zeros(out, n_in, dtype=torch.int32),
                        torch.zeros(out, n_groups, dtype=torch.float16),
                        torch.zeros(out, n_groups, dtype=torch.int32),
                        s["bits"], s["group_size"], s["symmetric"])
        _set_module(qmodel, name, WeightOnlyLinear(gq, torch.zeros(out) if s["bias"] else None))
    qmodel.load_state_dict(obj["state_dict"])
    return qmodel.eval()
