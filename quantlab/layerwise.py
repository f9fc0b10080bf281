"""Layer-by-layer PTQ of a calibrated model: each weighted layer in turn is rounded (AdaRound, GPTQ
on the layer's own per-channel grid, or nearest), its bias corrected against the float model, and
every activation range observed again before the next layer. GPTQ on a conv sees it as a matrix over
its im2col columns (:func:`input_columns`, :func:`layer_hessian`). Re-exported by
:mod:`quantlab.ptq`; taught in notebook ``j_gptq_awq`` (section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_float_tensor, check_int
from .adaround import _pin_weight, adaround_layer
from .gptq import gptq_on_grid
from .models import QuantizedNet
from .modules import _QWeighted
from .ptq_steps import (
    _check_max_images,
    _check_qnet,
    _correct_bias,
    _float_compute,
    _images,
    _layer_input,
    _quant_input,
    _weighted_steps,
    recalibrate,
)


def input_columns(layer, x: torch.Tensor) -> torch.Tensor:
    """The inputs each output row of a weighted layer multiplies, as ``(groups, rows, K)``: a
    conv's im2col columns (``F.unfold``: channel, then kernel row, then kernel column, the order
    of ``weight.reshape(out, -1)``), split into its groups; a Linear's input rows (one group)."""
    if hasattr(layer, "conv"):
        c = layer.conv
        if c.padding_mode != "zeros":
            raise ValueError(f"GPTQ needs zero padding; got padding_mode={c.padding_mode!r}")
        cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # (N, C k k, L)
        cols = cols.transpose(1, 2).reshape(-1, c.groups, cols.shape[1] // c.groups)
        return cols.transpose(0, 1)
    return x.reshape(1, -1, x.shape[-1])


@torch.no_grad()
def layer_hessian(layer, x_in: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """GPTQ's Hessian of a weighted layer, ``H = 2 X^T X / N`` (float64, ``(groups, K, K)``),
    with ``X`` the (N, K) inputs of :func:`input_columns` (a conv's im2col columns) on ``x_in``."""
    total, n = 0.0, 0
    for part in x_in.split(chunk):
        cols = input_columns(layer, part).double()
        total = total + cols.transpose(1, 2) @ cols
        n += cols.shape[1]
    return 2 * total / n


@torch.no_grad()
def gptq_layer(layer, x_in: torch.Tensor, damp: float = 0.01, block_size: int = 128) -> dict:
    """GPTQ (:func:`quantlab.gptq.gptq_on_grid`) of one weighted layer of a ``QuantizedNet``, in
    place, on the grid of its weight QParam (per output channel at low bits; observed on the
    float weight): each group of a conv is one matrix (out/groups, in/groups k k) with its own
    Hessian from :func:`layer_hessian`. ``x_in`` is what the layer computes with (its input,
    fake-quantized). The rounded weight is pinned as AdaRound's is; returns the statistics of
    :func:`adaround_layer` (``weight_int``, ``nearest_int``, ``changed``, ``total``)."""
    if not isinstance(layer, _QWeighted):
        raise TypeError(f"layer must be a quantized conv or linear layer; got {type(layer).__name__}")
    check_float_tensor(x_in, "x_in")
    w = layer.float_weight_bias()[0].detach()
    q_w = layer.q_w
    out = w.shape[0]
    scale = q_w.scale.expand(out) if q_w.scale.dim() == 0 else q_w.scale
    zp = q_w.zero_point.expand(out) if q_w.zero_point.dim() == 0 else q_w.zero_point
    h = layer_hessian(layer, x_in)
    groups, rows = h.shape[0], out // h.shape[0]
    w2 = w.reshape(out, -1)
    q = torch.cat([gptq_on_grid(w2[g * rows:(g + 1) * rows], h[g], scale[g * rows:(g + 1) * rows],
                                zp[g * rows:(g + 1) * rows], q_w.quant_min, q_w.quant_max, damp,
                                block_size) for g in range(groups)]).reshape(w.shape)
    shape = [-1] + [1] * (w.dim() - 1)
    scale, zp = scale.reshape(shape), zp.reshape(shape).to(torch.float32)
    nearest = torch.clamp(torch.round(w * (1.0 / scale)) + zp, q_w.quant_min, q_w.quant_max)
    _pin_weight(layer, scale * (q.to(torch.float32) - zp))
    return {"weight_int": q, "nearest_int": nearest.to(torch.int32),
            "changed": int((q != nearest).sum()), "total": q.numel()}


# -- layer by layer: round, correct the bias, observe the next range ---------------------------

ROUNDINGS = ("adaround", "gptq", "nearest")


def layer_by_layer(qnet: QuantizedNet, data, rounding: str = "adaround", iterations: int = 1000,
                   correct_bias: bool = True, max_images: int | None = 2000, seed: int = 0,
                   damp: float = 0.01, **kwargs) -> dict:
    """Post-training quantization one weighted layer at a time, each step on the inputs the
    quantized model really gives the layer, in place. For each weighted layer in graph order:

    1. round its weights on the grid of its weight QParam: ``"adaround"``
       (:func:`adaround_layer`, ``iterations`` Adam steps, ``kwargs``), ``"gptq"``
       (:func:`gptq_layer`) or ``"nearest"``;
    2. with ``correct_bias``, remove its whole mean shift against the float model
       (:func:`bias_correction` with ``reference="float_model"``, this layer only);
    3. observe every activation range again (:func:`recalibrate`) on the model as it now is, so
       the next layer learns from (and is corrected for) the inputs it will get.

    :func:`adaround` followed by :func:`bias_correction` and :func:`recalibrate` does the same
    steps in another order (every layer rounded with the ranges observed before, corrected,
    observed once at the end); at 2 bits the order matters (``benchmarks/bench_calibration.py``:
    recipes ``adaround+recal`` and ``layerwise``). ``qnet.freeze()`` then gives the integers.

    Args:
        qnet: calibrated (activation ranges observed), not frozen.
        data: unlabeled calibration images (a tensor or a loader; never the test set).
        rounding: ``"adaround"``, ``"gptq"`` or ``"nearest"``.
        iterations, seed, kwargs: AdaRound's (layer ``k`` samples its batches with seed
            ``seed + k``). damp: GPTQ's dampening.
        correct_bias: step 2 on or off. max_images: use at most this many images.
    Returns:
        ``{layer index: rounding statistics}`` (as :func:`adaround_layer`), each with ``"delta"``
        (the bias shift, or None).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
    if kwargs and rounding != "adaround":
        raise TypeError(f"{', '.join(sorted(kwargs))}: AdaRound's options, but rounding={rounding!r} "
                        "takes none (only rounding='adaround' accepts them)")
    _check_qnet(qnet)
    iterations = check_int(iterations, "iterations", 0)
    seed = check_int(seed, "seed")
    max_images = _check_max_images(max_images)
    qnet.eval()
    images = _images(data, max_images)
    stats = {}
    for i, layer in _weighted_steps(qnet):
        with torch.no_grad():
            x_f = _layer_input(qnet, images, i, _float_compute)
            x_in = _quant_input(layer, _layer_input(qnet, images, i))
        layer.q_w.update(layer.float_weight_bias()[0].detach())
        if rounding == "adaround":
            gen = torch.Generator().manual_seed(seed + i)
            stats[i] = adaround_layer(layer, x_in, x_f, iterations, generator=gen, **kwargs)
        elif rounding == "gptq":
            stats[i] = gptq_layer(layer, x_in, damp)
        else:
            stats[i] = {}
        stats[i]["delta"] = _correct_bias(layer, x_in, x_f) if correct_bias else None
        recalibrate(qnet, images.split(500))
    return stats


