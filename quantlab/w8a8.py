"""W8A8 integer arithmetic of a Linear: 8-bit activations times 8-bit weights into int32.

A W8A8 Linear computes ``y = x @ w.T + b`` as ``acc = sum_k (q_x - Z_x) (q_w - Z_w)`` in exact
integers (int32), then ``y = f32(acc) * f32(S_x * S_w) + b`` in float32. Two recipes, both here:

- **per token** (:func:`quantize_per_token`, :class:`Int8Linear`): int8 activations with one
  symmetric scale per row (token) computed at run time, ``S_x[t] = f32(max|x[t]| / 127)``, int8
  weights with one symmetric scale per output channel; ``acc`` is int8 x int8 (``torch._int_mm``).
- **ONNX Runtime's dynamic quantization** (:func:`dynamic_quantize_linear`,
  :func:`quantize_weight`, :class:`DynamicQuantLinear`, :func:`ort_dynamic_gpt`): what
  ``onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)`` writes and ONNX Runtime runs:
  ``DynamicQuantizeLinear`` gives the *whole* input tensor (every token of every sequence of the
  batch) ONE uint8 scale and zero point, ``MatMulInteger`` multiplies by int8 weights symmetric
  per tensor or per output channel, then ``Cast``, ``Mul`` by ``f32(S_x * S_w)`` and ``Add`` of
  the float bias. Bit-exact with ONNX Runtime 1.32 given the same input (``tests/test_w8a8.py``).

Conventions (ONNX Runtime's, read from its source: ``core/util/qmath.h``, MLAS ``quantize.cpp``,
``onnxruntime/quantization/quant_utils.py``):

- ``DynamicQuantizeLinear``: ``min_val = min(min(x), 0)``, ``max_val = max(max(x), 0)``,
  ``S = f32((max_val - min_val) / 255)`` (1.0 when ``max_val == min_val``),
  ``Z = rne(clamp(-min_val / S, 0, 255))``, ``q = clamp(rne(x / S) + Z, 0, 255)``, all in
  float32, ``rne`` rounding half to even, a division (not a multiplication by ``1 / S``);
- weights (``quantize_weight``): ``S_w = f32(f64(2 max|w|) / 254)`` (computed in float64, then
  rounded to float32; 1.0 for an all-zero weight), ``q_w = clamp(rne(f32(w) / S_w), -128, 127)``,
  ``Z_w = 0``; per channel = one scale per output row of ``w`` (axis -1 of ONNX's ``B = w.T``);
- embedding tables (``quantize_embedding``, ONNX Runtime quantizes a ``Gather`` of an initializer
  as a uint8 *activation*): affine uint8 per tensor, ``S = f32(f64(max_val - min_val) / 255)``,
  ``Z = rne(-min_val / f64 S)``, ``q = clamp(rne(f32(w) / f32 S) + Z, 0, 255)``.

Integers are held in int32 tensors; products are accumulated exactly in float64 (every partial
sum is an integer below ``2**53``). Taught in notebook ``k`` (activations of a transformer).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._validate import FLOAT32_TINY, check_bool, check_float_tensor, check_int_tensor

__all__ = ["DynamicQuantLinear", "Int8Linear", "OrtDynamicGPT", "dynamic_quantize_linear",
           "int8_linear", "int8_linears", "matmul_integer", "ort_dynamic_gpt",
           "quantize_embedding", "quantize_per_token", "quantize_weight"]

#: the largest K for which an int32 accumulator of 8-bit products cannot overflow:
#: ``|q - Z| <= 255`` on both sides, so ``|acc| <= 255 * 255 * K <= 2**31 - 1``
MAX_K = (2**31 - 1) // (255 * 255)


def _check_float32(x, name: str) -> torch.Tensor:
    check_float_tensor(x, name)
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor (the type ONNX Runtime quantizes); "
                        f"got {x.dtype}")
    return x


def dynamic_quantize_linear(x: torch.Tensor):
    """ONNX's ``DynamicQuantizeLinear`` as ONNX Runtime computes it: one uint8 scale and zero point
    for the whole tensor, from its own range.

    Args:
        x: float32 tensor of any shape (finite values).
    Returns:
        ``(q_x, scale, zero_point)``: ``q_x`` int32 of ``x``'s shape in ``0..255`` (the uint8
        bytes ONNX Runtime returns), ``scale`` a float32 scalar tensor, ``zero_point`` an int32
        scalar tensor. ``x ~ scale * (q_x - zero_point)``.

    Formula (float32): ``min_val = min(min(x), 0)``, ``max_val = max(max(x), 0)``,
    ``scale = (max_val - min_val) / 255`` (1.0 when ``x`` is all zero),
    ``zero_point = rne(clamp(-min_val / scale, 0, 255))``,
    ``q_x = clamp(rne(x / scale) + zero_point, 0, 255)``. Real zero is exactly ``zero_point``.
    A range whose ``max_val - min_val`` overflows float32 (inf scale) or whose scale underflows to 0
    raises ``ValueError``: ONNX Runtime returns meaningless codes there.
    """
    _check_float32(x, "x")
    zero = torch.zeros((), dtype=torch.float32)
    min_val, max_val = torch.minimum(x.min(), zero), torch.maximum(x.max(), zero)
    if bool(max_val == min_val):
        return torch.zeros(x.shape, dtype=torch.int32), torch.ones(()), torch.zeros((), dtype=torch.int32)
    scale = (max_val - min_val) / 255
    if not bool(torch.isfinite(scale)) or not bool(scale > 0):
        raise ValueError(f"x's range [{min_val.item():g}, {max_val.item():g}] has no float32 "
                         f"uint8 scale: (max - min) / 255 = {scale.item():g}")
    zero_point = torch.round(torch.clamp(-min_val / scale, 0, 255))
    q_x = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return q_x.to(torch.int32), scale, zero_point.to(torch.int32)


def _check_codes(q, name: str) -> torch.Tensor:
    check_int_tensor(q, name)
    if int(q.min()) < -128 or int(q.max()) > 255:
        raise ValueError(f"{name} must hold 8-bit codes (int8 -128..127 or uint8 0..255); got "
                         f"values in {int(q.min())}..{int(q.max())}")
    return q


def _check_zero_point(z, name: str, shape: tuple) -> torch.Tensor:
    z = torch.as_tensor(z) if not isinstance(z, torch.Tensor) else z
    if z.is_floating_point() or z.dtype == torch.bool:
        raise TypeError(f"{name} must be an int or an integer tensor; got {z.dtype}")
    if z.dim() > 1 or (z.dim() == 1 and tuple(z.shape) not in (shape, (1,))):
        per_column = f" or hold one value per column {shape}" if shape else ""
        raise ValueError(f"{name} must be a scalar{per_column}; got shape {tuple(z.shape)}")
    if z.numel() and (int(z.min()) < -128 or int(z.max()) > 255):
        raise ValueError(f"{name} must be an 8-bit code in -128..255; got {z.tolist()}")
    return z


def matmul_integer(a: torch.Tensor, a_zero_point, b: torch.Tensor, b_zero_point=0) -> torch.Tensor:
    """ONNX's ``MatMulInteger``: ``(a - a_zero_point) @ (b - b_zero_point)`` in exact integers.

    Args:
        a: integer tensor (..., M, K) of 8-bit codes (uint8 or int8 values, held in any int dtype).
        a_zero_point: int or integer scalar tensor.
        b: integer tensor (K, N) of 8-bit codes.
        b_zero_point: int, integer scalar, or one zero point per column, shape (N,).
    Returns:
        int32 tensor (..., M, N), ``acc[m, n] = sum_k (a[m, k] - Z_a) (b[k, n] - Z_b[n])``.
        Each product is at most ``255 * 255`` in magnitude, so ``K <= MAX_K`` (33,025) keeps the
        int32 accumulator exact; the sums are formed in float64, exact below ``2**53``.
    """
    _check_codes(a, "a")
    _check_codes(b, "b")
    if b.dim() != 2 or a.dim() < 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"a must be (..., M, K) and b (K, N) with the same K; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[0] > MAX_K:
        raise ValueError(f"K = {b.shape[0]} may overflow the int32 accumulator (K <= {MAX_K})")
    za = _check_zero_point(a_zero_point, "a_zero_point", ())
    if za.dim() != 0:
        za = za.reshape(())
    zb = _check_zero_point(b_zero_point, "b_zero_point", (b.shape[1],))
    acc = (a.double() - za.double()) @ (b.double() - zb.double())  # |acc| <= 255*255*K < 2**31
    return acc.to(torch.int32)


def quantize_weight(w: torch.Tensor, per_channel: bool = False):
    """Symmetric int8 weights as ``onnxruntime.quantization`` writes them (``QInt8``).

    Args:
        w: float32 weight (out, in) of a Linear (ONNX's MatMul holds ``w.T``).
        per_channel: one scale per output row (True) or one for the whole tensor.
    Returns:
        ``(q_w, scale)``: ``q_w`` int32 (out, in) in ``-127..127``; ``scale`` float32, shape (out,)
        per channel or () per tensor. ``scale = f32(f64(2 * max|w|) / 254)`` as ONNX Runtime's
        ``compute_scale_zp`` (a division rounded to float64 then to float32 equals the float32
        division ``max|w| / 127``), 1.0 for an all-zero row; ``q_w = clamp(rne(w / scale), -128,
        127)`` in float32 (so ``|q_w| <= 127``); the zero point is 0.
    """
    _check_float32(w, "w")
    per_channel = check_bool(per_channel, "per_channel")
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D weight (out, in); got shape {tuple(w.shape)}")
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().max()
    scale64 = 2 * absmax.double() / 254
    scale = torch.where(scale64 < FLOAT32_TINY, torch.ones_like(scale64), scale64).float()
    col = scale[:, None] if per_channel else scale
    return torch.clamp(torch.round(w / col), -128, 127).to(torch.int32), scale


def quantize_embedding(w: torch.Tensor):
    """An embedding table as ``quantize_dynamic`` stores it: affine uint8, one scale per tensor.

    Args:
        w: float32 table (rows, dim).
    Returns:
        ``(q, scale, zero_point)``: ``q`` int32 in ``0..255``, ``scale`` float32 scalar,
        ``zero_point`` int32 scalar; ``DequantizeLinear`` gives ``f32((q - zero_point) * scale)``.
        ``min_val = min(w, 0)``, ``max_val = max(w, 0)``, ``s = f64(max_val - min_val) / 255``,
        ``zero_point = rne(-min_val / s)`` in float64, ``scale = f32(s)``,
        ``q = clamp(rne(w / scale) + zero_point, 0, 255)`` in float32 (an all-zero table: scale 1,
        zero point 0).
    """
    _check_float32(w, "w")
    zero = torch.zeros((), dtype=torch.float32)
    min_val, max_val = torch.minimum(w.min(), zero), torch.maximum(w.max(), zero)
    s64 = (max_val.double() - min_val.double()) / 255
    if bool(s64 < FLOAT32_TINY):
        return torch.zeros(w.shape, dtype=torch.int32), torch.ones(()), torch.zeros((), dtype=torch.int32)
    zero_point = torch.round(-min_val.double() / s64).float()
    scale = s64.float()
    q = torch.clamp(torch.round(w / scale) + zero_point, 0, 255)
    return q.to(torch.int32), scale, zero_point.to(torch.int32)


def quantize_per_token(x: torch.Tensor):
    """Symmetric int8 codes with one scale per row (token), computed from the row at run time.

    Args:
        x: float32 tensor (..., K).
    Returns:
        ``(q_x, scale)``: ``q_x`` int32 (..., K) in ``-127..127``, ``scale`` float32 (..., 1);
        ``scale = f32(max|x[t]| / 127)``, ``q_x = clamp(rne(x * f32(1 / scale)), -127, 127)`` (the
        inverse multiplied in, as PyTorch's fake-quantize kernels and
        :func:`quantlab.act_quant.fake_quantize_activations`, so both give the same codes). An all-zero
        row gets scale 1.0 (as ONNX Runtime's symmetric ``GetQuantizationParameter``); a scale
        below the smallest normal float32 (``max|x[t]| < 1.5e-36``) is raised to it, so that
        ``x / scale`` stays finite.
    """
    _check_float32(x, "x")
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(absmax / 127, min=FLOAT32_TINY)
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x * (1.0 / scale)), -127, 127).to(torch.int32), scale


def int8_linear(x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, bias=None):
    """The per-token W8A8 Linear: int8 activations x int8 weights -> int32, then float32 scales.

    Args:
        x: float32 (..., in); quantized per token by :func:`quantize_per_token`.
        q_w: int8 codes (out, in), symmetric (zero point 0), e.g. from :func:`quantize_weight`.
        w_scale: float32 scale per output channel (out,) or a scalar.
        bias: float32 (out,) or None.
    Returns:
        float32 (..., out): ``f32(acc) * f32(S_x[t] * S_w[c]) + bias[c]`` with
        ``acc = q_x @ q_w.T`` exact (``|acc| <= 127 * 127 * in``). Against the same formula in
        float64 the result is within ``2**-22 |acc S_x S_w| + 2**-23 |y|`` (three float32 roundings
        before the bias, one after), plus ``2**-149 |acc|`` when ``S_x S_w`` is subnormal.
    """
    check_int_tensor(q_w, "q_w")
    if q_w.dim() != 2 or x.shape[-1:] != q_w.shape[1:]:
        raise ValueError(f"q_w must be (out, in) with in = x.shape[-1]; got {tuple(q_w.shape)} "
                         f"for x {tuple(x.shape)}")
    q_x, s_x = quantize_per_token(x)
    acc = matmul_integer(q_x, 0, q_w.T)
    y = acc.to(torch.float32) * (s_x * w_scale)
    return y if bias is None else y + bias


def _linear_parts(linear: nn.Linear, name: str):
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear; got {type(linear).__name__}")
    w = linear.weight.detach().float()
    b = None if linear.bias is None else linear.bias.detach().float()
    return w, b


class Int8Linear(nn.Module):
    """A Linear run as :func:`int8_linear`: per-token int8 activations, int8 weights symmetric per
    output channel (:func:`quantize_weight`), int32 accumulation, float32 scales and bias."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w, b = _linear_parts(linear, "linear")
        q_w, w_scale = quantize_weight(w, per_channel=True)
        self.register_buffer("q_w", q_w)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q_w, self.w_scale, self.bias)


class DynamicQuantLinear(nn.Module):
    """A Linear as ONNX Runtime runs it after ``quantize_dynamic`` (``weight_type=QInt8``).

    ``forward(x)``: ``q_x, S_x, Z_x = dynamic_quantize_linear(x)`` over the WHOLE input (one scale
    for every token of every sequence), ``acc = matmul_integer(q_x, Z_x, q_w.T, 0)``, then
    ``f32(acc) * f32(S_x * S_w) + bias``: ONNX's ``DynamicQuantizeLinear -> MatMulInteger -> Cast
    -> Mul -> Add`` and ONNX Runtime's fused ``DynamicQuantizeMatMul`` compute the same floats.
    ``per_channel``: ``quantize_dynamic(per_channel=...)``. A Linear without a bias (TinyGPT's
    tied head, as :func:`ort_dynamic_gpt` builds it) adds none.
    """

    def __init__(self, linear: nn.Linear, per_channel: bool = False):
        super().__init__()
        w, b = _linear_parts(linear, "linear")
        q_w, w_scale = quantize_weight(w, per_channel=per_channel)
        self.register_buffer("q_w", q_w)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_x, s_x, z_x = dynamic_quantize_linear(x)
        acc = matmul_integer(q_x, z_x, self.q_w.T)
        y = acc.to(torch.float32) * (s_x * self.w_scale)
        return y if self.bias is None else y + self.bias


def _swap_linears(model: nn.Module, make) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, make(child))
        else:
            _swap_linears(child, make)
    return model


def int8_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every ``nn.Linear`` is an :class:`Int8Linear` (per-token W8A8);
    everything else (embeddings, a tied head, LayerNorms, attention) stays float."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return _swap_linears(copy.deepcopy(model), Int8Linear).eval()


class OrtDynamicGPT(nn.Module):
    """quantlab's simulation of a :class:`~quantlab.models.TinyGPT` after ONNX Runtime's
    ``quantize_dynamic``: the token and position tables dequantized from uint8
    (:func:`quantize_embedding`), all 16 Linears and the tied head (``ln_f(x) @ tok.weight.T``, a
    MatMul with a constant weight) as :class:`DynamicQuantLinear`; LayerNorm, GELU and attention
    stay float32 (torch's kernels, not ONNX Runtime's). ``quantize_tables=False`` keeps the two
    tables float (``quantize_dynamic(op_types_to_quantize=["MatMul"])``). Build it with
    :func:`ort_dynamic_gpt`."""

    def __init__(self, model: nn.Module, per_channel: bool, quantize_tables: bool = True):
        super().__init__()
        self.context = model.context
        self.tok, self.pos = copy.deepcopy(model.tok), copy.deepcopy(model.pos)
        for table in (self.tok, self.pos) if quantize_tables else ():
            q, scale, zero_point = quantize_embedding(table.weight.detach())
            table.weight.data = (q - zero_point).to(torch.float32) * scale
        self.blocks = _swap_linears(copy.deepcopy(model.blocks),
                                    lambda lin: DynamicQuantLinear(lin, per_channel))
        self.ln_f = copy.deepcopy(model.ln_f)
        head = nn.Linear(*model.tok.weight.shape[::-1], bias=False)
        head.weight.data = model.tok.weight.detach().clone()
        self.head = DynamicQuantLinear(head, per_channel)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def ort_dynamic_gpt(model: nn.Module, per_channel: bool = False,
                    quantize_tables: bool = True) -> OrtDynamicGPT:
    """quantlab's simulation of ``model`` (a TinyGPT) quantized by ONNX Runtime's
    ``quantize_dynamic(weight_type=QInt8, per_channel=per_channel)`` (``quantize_tables=False``:
    with ``op_types_to_quantize=["MatMul"]``): see :class:`OrtDynamicGPT`. The model itself is
    not changed."""
    if not isinstance(model, nn.Module) or not all(
            hasattr(model, a) for a in ("tok", "pos", "blocks", "ln_f", "context")):
        raise TypeError(f"model must be a quantlab.models.TinyGPT (tok, pos, blocks, ln_f); got "
                        f"{type(model).__name__}")
    per_channel = check_bool(per_channel, "per_channel")
    quantize_tables = check_bool(quantize_tables, "quantize_tables")
    return OrtDynamicGPT(model, per_channel, quantize_tables).eval()
