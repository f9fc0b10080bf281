"""AdaRound (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training quantization"):
learn, layer by layer on unlabeled calibration data, whether each weight rounds up or down; the
result is ordinary integer weights. Re-exported by :mod:`quantlab.ptq`; taught in notebook
``da_calibration`` (and next to GPTQ in ``j_gptq_awq``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_float_tensor, check_int, check_real
from .models import QuantizedNet
from .modules import QConvBNReLU, _QWeighted
from .ptq_steps import (
    _check_max_images,
    _check_qnet,
    _float_compute,
    _images,
    _layer_input,
    _quant_input,
    _weighted_steps,
)

#: the rectified sigmoid's stretch: h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1: reaches
    exactly 0 and 1, so rounding decisions can become hard during training."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(scaled: torch.Tensor) -> torch.Tensor:
    """AdaRound's start: ``V`` with ``h(V) = W/S - floor(W/S)`` for ``scaled = W/S``, the fraction
    clamped to ``[1e-4, 1 - 1e-4]`` so that ``V`` is finite."""
    rest = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
    return torch.log((rest - GAMMA) / (ZETA - rest))


def _soft_weight(scaled: torch.Tensor, v: torch.Tensor, scale, zero_point, quant_min: int,
                quant_max: int) -> torch.Tensor:
    """AdaRound's weight ``W~ = S (clamp(floor(W/S) + h(V) + Z, q_min, q_max) - Z)``.

    With ``V = _initial_v(W/S)`` it is ``W`` (to 1e-4 step) for every weight between the lowest and
    the highest level (``q_min <= W/S + Z <= q_max``); a weight beyond them gets the end level for
    any ``V`` (the clamp), so it starts there and stays there.
    """
    return scale * (torch.clamp(torch.floor(scaled) + rectified_sigmoid(v) + zero_point,
                                quant_min, quant_max) - zero_point)


def _pin_weight(layer, w: torch.Tensor):
    """Make ``layer.float_weight_bias()`` return exactly ``w`` (and its old bias); the weight
    QParam stops observing, so freeze() quantizes ``w`` with the scales AdaRound used."""
    w_old, b_old = layer.float_weight_bias()
    b_old = None if b_old is None else b_old.detach().clone()
    if not hasattr(layer, "weight_before_adaround"):  # bias correction measures against it
        layer.weight_before_adaround = w_old.detach().clone()
    with torch.no_grad():
        if isinstance(layer, QConvBNReLU):
            # an identity BN: mean 0, var + eps = 1 exactly in float32 (eps = 2**-20, var =
            # 1 - 2**-20, both exact), gamma 1, beta 0 folds to w and b exactly
            bn = layer.bn
            bn.running_mean.zero_()
            bn.eps = 2.0**-20
            bn.running_var.fill_(1.0 - 2.0**-20)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            if layer.conv.bias is None:
                layer.conv.bias = nn.Parameter(torch.zeros(w.shape[0]))
        param = layer.conv if hasattr(layer, "conv") else layer.fc
        param.weight.copy_(w)
        if b_old is not None:
            param.bias.copy_(b_old)
    layer.q_w.observing = False


def _check_adaround_arguments(layer, x_q, x_f, iterations, batch_size, lr, reg, beta_range,
                              warm_start) -> tuple:
    """adaround_layer's arguments, checked (an error names the argument)."""
    if not isinstance(layer, _QWeighted):
        raise TypeError(f"layer must be a quantized conv or linear layer; got {type(layer).__name__}")
    iterations = check_int(iterations, "iterations", 0)
    batch_size = check_int(batch_size, "batch_size", 1)
    lr = check_real(lr, "lr", 0, low_open=True)
    reg = check_real(reg, "reg", 0)
    warm_start = check_real(warm_start, "warm_start", 0, 1)
    if not isinstance(beta_range, (tuple, list)) or len(beta_range) != 2:
        raise TypeError(f"beta_range must be a pair (start, end); got {beta_range!r}")
    beta_start = check_real(beta_range[0], "beta_range[0]", 0, low_open=True)
    beta_end = check_real(beta_range[1], "beta_range[1]", 0, low_open=True)
    if beta_end > beta_start:
        raise ValueError(f"beta_range must decay (start >= end, as the paper's (20, 2)); got "
                         f"{tuple(beta_range)}")
    for t, name in ((x_q, "x_q"), (x_f, "x_f")):
        check_float_tensor(t, name)
    if x_q.shape != x_f.shape:
        raise ValueError(f"x_q and x_f must have the same shape; got {tuple(x_q.shape)} and "
                         f"{tuple(x_f.shape)}")
    return iterations, batch_size, lr, reg, warm_start


def adaround_layer(layer, x_q: torch.Tensor, x_f: torch.Tensor, iterations: int = 1000,
                   batch_size: int = 64, lr: float = 1e-2, reg: float = 0.01,
                   beta_range: tuple[float, float] = (20.0, 2.0), warm_start: float = 0.2,
                   generator: torch.Generator | None = None) -> dict:
    """AdaRound one weighted layer in place; returns its rounding statistics.

    ``W~ = S (clamp(floor(W/S) + h(V) + Z, q_min, q_max) - Z)`` (``_soft_weight``) with ``V``
    initialised so that ``h(V) = W/S - floor(W/S)`` (``_initial_v``): ``W~ = W`` at the start
    for every weight between the lowest and the highest level; a weight beyond them (after a
    clipping weight observer such as ``"mse"``) starts, and stays, at the end level, where AdaRound
    and nearest rounding agree. Adam minimises, on random batches,
    ``|| f(W~ x_q + b) - f(W x_f + b) ||^2`` (summed over channels, averaged over the rest;
    ``f`` the fused ReLU or identity) ``+ reg * sum(1 - |2 h(V) - 1|^beta)``; the regularizer
    is off for the first ``warm_start`` of the iterations, then ``beta`` decays from 20 to 2 on a
    cosine. Finally each weight rounds up where ``h(V) >= 0.5`` (``V >= 0``).
    """
    iterations, batch_size, lr, reg, warm_start = _check_adaround_arguments(
        layer, x_q, x_f, iterations, batch_size, lr, reg, beta_range, warm_start)
    w, b = layer.float_weight_bias()
    w, b = w.detach(), None if b is None else b.detach()
    q_w = layer.q_w
    shape = [-1] + [1] * (w.dim() - 1) if q_w.scale.dim() else []
    scale, zp = q_w.scale.reshape(shape), q_w.zero_point.reshape(shape).to(torch.float32)
    scaled = w * (1.0 / scale)
    base = torch.floor(scaled)
    v = _initial_v(scaled).requires_grad_(True)                         # h(v) = W/S - floor(W/S)
    opt = torch.optim.Adam([v], lr=lr)
    lo, hi = q_w.quant_min, q_w.quant_max
    n = x_q.shape[0]

    def act(y):
        return F.relu(y) if layer.relu else y

    with torch.no_grad():  # the float layer's output on every calibration image, once
        targets = torch.cat([act(layer._op(chunk, w, b)) for chunk in x_f.split(500)])
    warm = int(warm_start * iterations)
    for it in range(iterations):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        target = targets[idx]
        w_soft = _soft_weight(scaled, v, scale, zp, lo, hi)
        out = act(layer._op(x_q[idx], w_soft, b))
        loss = (out - target).pow(2).sum(1).mean()
        if it >= warm:
            progress = (it - warm) / max(1, iterations - warm)
            beta = beta_range[1] + 0.5 * (beta_range[0] - beta_range[1]) * (
                1 + math.cos(math.pi * progress))
            h = rectified_sigmoid(v)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        up = v >= 0
        q = torch.clamp(base + up.to(torch.float32) + zp, lo, hi)
        nearest = torch.clamp(torch.round(scaled) + zp, lo, hi)
        _pin_weight(layer, scale * (q - zp))
        soft = rectified_sigmoid(v)
    return {"weight_int": q.to(torch.int32), "nearest_int": nearest.to(torch.int32),
            "scaled": scaled, "changed": int((q != nearest).sum()), "total": q.numel(),
            "undecided": int(((soft > 0.01) & (soft < 0.99)).sum())}


def adaround(qnet: QuantizedNet, data, iterations: int = 1000, max_images: int | None = 2000,
             seed: int = 0, layers=None, **kwargs) -> dict:
    """AdaRound every weighted layer of a calibrated ``qnet`` in order, in place.

    Layer ``k`` learns from ``x_q`` = the quantized model's input to it (with the layers before
    it already rounded) and ``x_f`` = the float model's (asymmetric reconstruction, as the
    paper). Afterwards ``qnet.freeze()`` produces exactly the learned integer weights. The
    activation ranges stay those observed before AdaRound; :func:`recalibrate` observes them
    again on the rounded model (at 2 bits this gained 0.2-0.8 points in
    ``benchmarks/bench_calibration.py``, recipe ``adaround+recal``); :func:`layer_by_layer` rounds,
    corrects and observes one layer at a time (recipe ``layerwise``).

    Args:
        qnet: calibrated (activation ranges observed), not frozen.
        data: unlabeled calibration images (a tensor or a loader; never the test set).
        iterations: Adam steps per layer. seed: batch sampling.
        layers: indices into ``qnet.layers`` of the weighted layers to round (None: all); the
            others keep nearest rounding.
        kwargs: passed to :func:`adaround_layer` (batch_size, lr, reg, beta_range, warm_start).
    Returns:
        ``{layer index: statistics}`` (see :func:`adaround_layer`).
    """
    _check_qnet(qnet)
    iterations = check_int(iterations, "iterations", 0)
    seed = check_int(seed, "seed")
    max_images = _check_max_images(max_images)
    qnet.eval()
    gen = torch.Generator().manual_seed(seed)
    images = _images(data, max_images)
    stats = {}
    steps = _weighted_steps(qnet)
    if layers is not None:
        allowed = [i for i, _ in steps]
        layers = [check_int(i, "layers[...]") for i in layers]
        if not layers or any(i not in allowed for i in layers):
            raise ValueError(f"layers must be a non-empty list of weighted-layer indices "
                             f"{allowed}; got {layers}")
        steps = [(i, m) for i, m in steps if i in layers]
    for i, layer in steps:
        with torch.no_grad():   # the graph's inputs to layer i: float model's, quantized model's
            x_f = _layer_input(qnet, images, i, _float_compute)
            x_q = _layer_input(qnet, images, i)
        layer.q_w.update(layer.float_weight_bias()[0].detach())
        stats[i] = adaround_layer(layer, _quant_input(layer, x_q).detach(), x_f.detach(),
                                  iterations, generator=gen, **kwargs)
    return stats


# -- GPTQ on the CNN's layers -------------------------------------------------------------------

