"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023): activation-aware weight scaling before
round-to-nearest.

A Linear computes ``W x = (W diag(s)) (diag(s)^-1 x)``. Scaling input channel ``c`` of the weight
up by ``s_c`` (and its activation down by the same factor) leaves the float layer unchanged but
gives the weights of the channels that carry large activations finer steps relative to their size.
AWQ takes ``s = mean|x|^alpha`` per input channel (normalised by ``sqrt(max s * min s)``), searches
``alpha`` on the grid ``0, 1/20, ..., 19/20`` for the smallest output error
``||(Q(W diag s) diag(s)^-1 - W) X^T||^2`` (``alpha = 0`` is round to nearest), and folds
``diag(s)^-1`` into the operation that produces ``x``, so the float model is unchanged.

For ``qkv`` the search measures, as AWQ's reference code does for the query, key and value
projections, the error of the whole attention's output (``proj(attention(x))``, all heads) on the
calibration inputs, not the error of the ``qkv`` outputs: errors of queries and keys reach the
output only through the softmax. The other Linears use their own output error.

In :class:`~quantlab.models.TinyGPT` the scale of ``qkv`` folds into ``ln1`` (weight and bias),
``fc`` into ``ln2``, ``proj`` into the value rows of ``qkv`` (attention is linear in V). ``fc2``
reads GELU's output, where a fold needs an explicit multiply (AWQ's ``ScaledActivation``): it is
left at round to nearest here. Taught in notebook ``j_gptq_awq``.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ._validate import check_int
from .gptq import input_stats, output_error
from .weight_only import check_settings, fake_quantize_groups, quantize_linears


def awq_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = clamp(mean_abs, 1e-4) ** alpha`` normalised by ``sqrt(max(s) * min(s))`` (float64).

    AWQ's reference code (llm-awq's ``auto_scale.py``) clamps after the power,
    ``clamp(mean_abs ** alpha, 1e-4)``: the two give the same scales unless some channel's ``mean_abs``
    is below 1e-4 (taught in notebook ``j_gptq_awq``, section 2.2).
    """
    s = mean_abs.double().clamp(min=1e-4) ** alpha
    return s / (s.max() * s.min()).sqrt()


def awq_search(w: torch.Tensor, xtx: torch.Tensor, mean_abs: torch.Tensor, bits: int = 4,
               group_size: int | None = 128, symmetric: bool = False, grid: int = 20) -> dict:
    """Search ``alpha`` in ``i / grid`` (i = 0 .. grid - 1) for one Linear (weight ``w`` (out,
    in), input statistics ``X^T X / N`` and ``mean |x|``). Returns ``{"alpha", "scale" (float32,
    in), "errors" (relative output error per alpha), "rtn_error", "awq_error"}``."""
    check_settings(bits, group_size, symmetric)
    grid = check_int(grid, "grid", 1)
    errors = []
    for i in range(grid):
        s = awq_scale(mean_abs, i / grid).float()
        w_q = fake_quantize_groups(w.detach() * s, bits, group_size, symmetric) / s
        errors.append(output_error(w, w_q, xtx))
    best = min(range(grid), key=errors.__getitem__)
    return {"alpha": best / grid, "scale": awq_scale(mean_abs, best / grid).float(),
            "errors": errors, "rtn_error": errors[0], "awq_error": errors[best]}


class _Captured(Exception):
    """Raised by a hook once it has the input it was waiting for."""


@torch.no_grad()
def layer_inputs(model: nn.Module, name: str, calib: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The inputs of module ``name`` over ``calib``, concatenated along the batch (float32)."""
    seen = []

    def hook(_module, args):
        seen.append(args[0].detach().clone())
        raise _Captured

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def awq_search_attention(block: nn.Module, x: torch.Tensor, mean_abs: torch.Tensor, bits: int = 4,
                         group_size: int | None = 128, symmetric: bool = False, grid: int = 20) -> dict:
    """:func:`awq_search` for a TinyGPT block's ``qkv``, judged by the attention's output: the
    relative error ``||attn_q(x) - attn(x)||^2 / ||attn(x)||^2`` with ``x`` the inputs of ``qkv``
    (B, T, d) and only ``qkv``'s weight quantized (``proj`` stays float here)."""
    check_settings(bits, group_size, symmetric)
    grid = check_int(grid, "grid", 1)
    w = block.qkv.weight.detach().clone()
    reference = block.attention(x)
    norm = (reference.double() ** 2).sum()
    errors = []
    try:
        for i in range(grid):
            s = awq_scale(mean_abs, i / grid).float()
            block.qkv.weight.copy_(fake_quantize_groups(w * s, bits, group_size, symmetric) / s)
            errors.append(float(((block.attention(x) - reference).double() ** 2).sum() / norm))
    finally:
        block.qkv.weight.copy_(w)
    best = min(range(grid), key=errors.__getitem__)
    return {"alpha": best / grid, "scale": awq_scale(mean_abs, best / grid).float(),
            "errors": errors, "rtn_error": errors[0], "awq_error": errors[best]}


#: for each Linear of a TinyGPT block, where its input scale folds (None: not foldable)
FOLDS = {"qkv": "ln1", "fc": "ln2", "proj": "qkv.v", "fc2": None}


@torch.no_grad()
def fold_scales(model: nn.Module, scales: dict) -> nn.Module:
    """A copy of a TinyGPT with the AWQ scales ``{linear name: s}`` folded: the Linear's input
    columns multiplied by ``s``, the producer of its input divided by ``s``. The float function
    is unchanged (up to float rounding)."""
    model = copy.deepcopy(model)
    for name, s in scales.items():
        block_name, _, kind = name.rpartition(".")
        block = model.get_submodule(block_name)
        fold = FOLDS.get(kind)
        if fold is None:
            raise ValueError(f"cannot fold an input scale into {name}: foldable are "
                             f"{[k for k, v in FOLDS.items() if v]}")
        block.get_submodule(kind).weight.mul_(s)
        if fold == "qkv.v":
            d = block.proj.in_features
            block.qkv.weight[2 * d:].div_(s[:, None])
            block.qkv.bias[2 * d:].div_(s)
        else:
            ln = block.get_submodule(fold)
            ln.weight.div_(s)
            ln.bias.div_(s)
    return model


def awq_model(model: nn.Module, calib: torch.Tensor, bits: int = 4, group_size: int | None = 128,
              symmetric: bool = False, grid: int = 20, stats: dict | None = None) -> tuple[nn.Module, dict]:
    """AWQ on a TinyGPT: statistics from the float model on ``calib`` (or the given ``stats``,
    ``{name: gptq.input_stats(model, name, calib)}``), one ``alpha`` per foldable Linear, the
    scales folded, then every Linear round-to-nearest quantized. Returns ``(quantized copy,
    report)`` with per layer ``alpha``, ``rtn_error``, ``awq_error`` (for ``qkv``: of the
    attention's output), the folded float model (``"folded"``) and ``"seconds"``."""
    start = time.perf_counter()
    scales, report = {}, {"layers": {}}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and FOLDS.get(name.rpartition(".")[2]):
            layer_stats = stats[name] if stats is not None and name in stats else \
                input_stats(model, name, calib)
            if name.endswith(".qkv"):
                block = model.get_submodule(name.rpartition(".")[0])
                found = awq_search_attention(block, layer_inputs(model, name, calib),
                                             layer_stats["mean_abs"], bits, group_size, symmetric, grid)
            else:
                found = awq_search(m.weight, layer_stats["xtx"], layer_stats["mean_abs"], bits,
                                   group_size, symmetric, grid)
            scales[name] = found["scale"]
            report["layers"][name] = {k: found[k] for k in ("alpha", "rtn_error", "awq_error")}
    folded = fold_scales(model, scales)
    qmodel = quantize_linears(folded, bits, group_size, symmetric)
    report["folded"] = folded
    report["seconds"] = time.perf_counter() - start
    return qmodel, report


@torch.no_grad()
def plant_outliers(model: nn.Module, channels=(3, 40, 77), factor: float = 16.0) -> nn.Module:
    """A copy of a TinyGPT with outlier channels PLANTED, its float function unchanged: in every
    block, ``ln1`` and ``ln2`` (weight and bias) are multiplied by ``factor`` at ``channels`` and
    the matching input columns of ``qkv`` and ``fc`` divided by it. With a power of two factor
    every product is exact, so the float outputs are bit-identical. The inputs of qkv and fc then
    have channels ``factor`` times larger than before: what AWQ exists for."""
    model = copy.deepcopy(model)
    idx = torch.as_tensor(list(channels))
    for block in model.blocks:
        for ln, linear in ((block.ln1, block.qkv), (block.ln2, block.fc)):
            ln.weight[idx] *= factor
            ln.bias[idx] *= factor
            linear.weight[:, idx] /= factor
    return model
