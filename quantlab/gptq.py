"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): quantize a Linear's weight column by column,
feeding each column's rounding error forward into the columns not yet quantized.

For one Linear with weight ``W`` (out, in) and calibration inputs ``X`` (N, in), the layer's
squared output error ``||(W - Q) X^T||^2`` has the Hessian ``H = 2 X^T X / N`` (in, in), the same
for every output row. After dampening (``H += damp * mean(diag H) * I``) GPTQ takes ``U``, the
upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), and for each column ``i`` in order:

    q_i = quant(w_i)                    (round to nearest on the column's group grid)
    e_i = (w_i - q_i) / U[i, i]
    w_j -= e_i * U[i, j]  for j > i     (the optimal correction of the remaining columns)

"Lazy batches" apply the corrections beyond the current block of ``block_size`` columns once per
block (one matrix product), which gives the same result. A group's scale and zero point are
computed from the group's columns as they are when its first column is reached (already
corrected by the earlier groups' errors; ``block_size`` must be a multiple of ``group_size``).
Per-channel grids (``group_size=None``) are computed once from the original row.

:func:`gptq_model` quantizes a whole model sequentially: each Linear sees the inputs produced by
the model whose earlier Linears are already quantized. Taught in notebook ``j_gptq_awq``.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ._validate import check_int, check_real
from .weight_only import (
    GroupQuant,
    check_settings,
    dequantize_groups,
    linear_names,
    qparams,
    quantize_codes,
    quantize_groups,
    quantize_linears,
)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has seen its input."""


@torch.no_grad()
def input_stats(model: nn.Module, name: str, calib: torch.Tensor, batch_size: int = 32) -> dict:
    """Statistics of the inputs of the Linear ``name`` over ``calib`` (a batch of model inputs):
    ``{"xtx": X^T X / N (float64, in x in), "mean_abs": mean |x| per input channel, "max_abs":
    max |x| per channel, "n": N}``; X holds every position of every sequence (rows)."""
    if not isinstance(calib, torch.Tensor) or calib.dim() < 1 or len(calib) == 0:
        got = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise TypeError(f"calib must be a non-empty tensor of model inputs (a batch); got {got}")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model has no module {name!r}; its Linears: {linear_names(model)[:6]}") from None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{name!r} is a {type(layer).__name__}, not an nn.Linear")
    stats = {"xtx": 0.0, "abs_sum": 0.0, "max_abs": None, "n": 0}

    def hook(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        stats["xtx"] = stats["xtx"] + x.T @ x
        stats["abs_sum"] = stats["abs_sum"] + x.abs().sum(0)
        m = x.abs().amax(0)
        stats["max_abs"] = m if stats["max_abs"] is None else torch.maximum(stats["max_abs"], m)
        stats["n"] += x.shape[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    n = stats["n"]
    return {"xtx": stats["xtx"] / n, "mean_abs": stats["abs_sum"] / n, "max_abs": stats["max_abs"],
            "n": n}


def output_error(w: torch.Tensor, w_q: torch.Tensor, xtx: torch.Tensor) -> float:
    """Relative output error ``||(W - W_q) X^T||^2 / ||W X^T||^2`` computed from ``X^T X``."""
    w, d = w.detach().double(), (w.detach() - w_q.detach()).double()
    return float(torch.trace(d @ xtx @ d.T) / torch.trace(w @ xtx @ w.T))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``U`` upper triangular with ``U^T U = (H + damp * mean(diag H) I)^-1``."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


def _prepare(w: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple:
    """``(W, U)``: ``w`` in float64 with the columns of dead inputs (zero diagonal) set to 0, and
    the upper Cholesky factor of the dampened inverse Hessian."""
    W = w.detach().double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, _inverse_cholesky(h, damp)


def _gptq_columns(W: torch.Tensor, U: torch.Tensor, quantize_column, step: int) -> None:
    """GPTQ's loop over the columns of ``W`` (float64, corrected in place): ``quantize_column(i,
    rest)`` gets column ``i``'s index and the not yet quantized columns of its block starting at
    ``i`` (``rest[:, 0]`` is column ``i`` with every earlier correction applied) and returns its
    dequantized values; ``e_i = (w_i - q_i) / U[i, i]`` corrects the later columns, within the
    block at once and beyond it once per block (lazy batches of ``step`` columns)."""
    n_in = W.shape[1]
    for b0 in range(0, n_in, step):
        b1 = min(b0 + step, n_in)
        W1, U1 = W[:, b0:b1], U[b0:b1, b0:b1]
        err = torch.zeros_like(W1)
        for j in range(b1 - b0):
            q = quantize_column(b0 + j, W1[:, j:])
            err[:, j] = (W1[:, j] - q) / U1[j, j]
            W1[:, j + 1:] -= err[:, j:j + 1] @ U1[j:j + 1, j + 1:]
        W[:, b1:] -= err @ U[b0:b1, b1:]  # the lazy batch update of the later columns


def gptq_on_grid(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, quant_min: int, quant_max: int, damp: float = 0.01,
                 block_size: int = 128) -> torch.Tensor:
    """GPTQ of ``w`` (out, in) on a given per-output-row grid: the integers ``q`` (int32, out x
    in) with ``w ~ scale (q - zero_point)``, each column rounded as ``clamp(round(w_i * f32(1 /
    scale)) + zero_point, quant_min, quant_max)`` (quantlab's ``quantize``, the CNN's weight
    QParam) after the errors of the earlier columns were fed forward. ``scale`` (out,) float32
    (> 0), ``zero_point`` (out,) integers. The CNN's layers use it (``quantlab.ptq.gptq_layer``);
    with an identity Hessian it is round to nearest on that grid."""
    damp = check_real(damp, "damp", 0.0)
    block_size = check_int(block_size, "block_size", 1)
    out, n_in = w.shape
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"hessian must be ({n_in}, {n_in}) for w {tuple(w.shape)}; got "
                         f"{tuple(hessian.shape)}")
    scale = scale.detach().to(torch.float32).reshape(out)
    zero_point = zero_point.detach().to(torch.float32).reshape(out)
    inv = 1.0 / scale
    W, U = _prepare(w, hessian, damp)
    codes = torch.zeros(out, n_in, dtype=torch.int32)

    def quantize_column(i, rest):
        c = torch.clamp(torch.round(rest[:, 0].float() * inv) + zero_point, quant_min, quant_max)
        codes[:, i] = c.to(torch.int32)
        return scale.double() * (c - zero_point).double()

    _gptq_columns(W, U, quantize_column, block_size)
    return codes


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                  lazy: bool = True) -> GroupQuant:
    """GPTQ of one weight ``w`` (out, in) with the Hessian ``hessian`` (in, in), e.g.
    ``2 X^T X / N``. Returns a :class:`~quantlab.weight_only.GroupQuant` (same grid as
    :func:`~quantlab.weight_only.quantize_groups`). Input channels that never fire (zero diagonal)
    get weight 0. ``lazy=False`` applies every correction at once (the plain loop of the paper's
    equations); ``lazy=True`` batches them per block of ``block_size`` columns.
    With ``hessian`` the identity the corrections vanish and the result is round to nearest."""
    bits, group_size, symmetric, _, _ = check_settings(bits, group_size, symmetric)
    damp = check_real(damp, "damp", 0.0)
    block_size = check_int(block_size, "block_size", 1)
    out, n_in = w.shape
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"hessian must be ({n_in}, {n_in}) for w {tuple(w.shape)}; got "
                         f"{tuple(hessian.shape)}")
    g = n_in if group_size is None or group_size >= n_in else group_size
    if g < n_in and (block_size % g or n_in % g):
        raise ValueError(f"block_size ({block_size}) and in_features ({n_in}) must be multiples of "
                         f"group_size ({g}) for GPTQ")
    W, U = _prepare(w, hessian, damp)
    codes = torch.zeros(out, n_in, dtype=torch.int32)
    n_groups = n_in // g
    scale = torch.zeros(out, n_groups, dtype=torch.float32)
    zero_point = torch.zeros(out, n_groups, dtype=torch.float32)
    grid = {}
    if g == n_in:  # per channel: the grid of the original row
        scale[:, 0], zero_point[:, 0], grid["qmin"], grid["qmax"] = qparams(W.float(), bits,
                                                                            symmetric)

    def quantize_column(i, rest):
        k = i // g
        if g < n_in and i % g == 0:
            scale[:, k], zero_point[:, k], grid["qmin"], grid["qmax"] = qparams(
                rest[:, :g].float(), bits, symmetric)
        c = quantize_codes(rest[:, :1].float(), scale[:, k], zero_point[:, k], grid["qmin"],
                           grid["qmax"])
        codes[:, i] = c[:, 0]
        return scale[:, k].half().double() * (c[:, 0] - zero_point[:, k]).double()

    _gptq_columns(W, U, quantize_column, block_size if lazy else n_in)
    return GroupQuant(codes, scale.half(), zero_point.to(torch.int32), bits, g, symmetric)


def gptq_model(model: nn.Module, calib: torch.Tensor, bits: int = 4, group_size: int | None = 128,
               symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
               names=None) -> tuple[nn.Module, dict]:
    """Quantize every Linear of ``model`` (or those in ``names``) with GPTQ, sequentially in the
    order of ``named_modules``: each layer's Hessian comes from the inputs it receives when the
    earlier layers are already quantized. Returns ``(quantized copy with WeightOnlyLinear layers,
    report)``; the report holds per layer the relative output errors of GPTQ and of round to
    nearest on the same inputs (``"gptq_error"``, ``"rtn_error"``) and ``"seconds"``."""
    start = time.perf_counter()
    names = linear_names(model) if names is None else list(names)
    work = copy.deepcopy(model).eval()
    weights, report = {}, {"layers": {}}
    for name in names:
        layer = work.get_submodule(name)
        stats = input_stats(work, name, calib)
        gq = gptq_quantize(layer.weight, 2 * stats["xtx"], bits, group_size, symmetric, damp,
                           block_size)
        w_q = dequantize_groups(gq)
        rtn = dequantize_groups(quantize_groups(layer.weight, bits, group_size, symmetric))
        report["layers"][name] = {"gptq_error": output_error(layer.weight, w_q, stats["xtx"]),
                                  "rtn_error": output_error(layer.weight, rtn, stats["xtx"])}
        with torch.no_grad():
            layer.weight.copy_(w_q)
        weights[name] = gq
    qmodel = quantize_linears(model, bits, group_size, symmetric,
                              skip=[n for n in linear_names(model) if n not in names],
                              weights=weights)
    report["seconds"] = time.perf_counter() - start
    return qmodel, report
