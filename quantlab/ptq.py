"""Advanced post-training quantization: cross-layer equalization, bias correction, AdaRound.

* :func:`equalize` (Nagel et al. 2019, "Data-free quantization through weight equalization and
  bias correction"): rescale conv1's output channels by ``1/s`` and conv2's matching input
  channels by ``s`` so both have the same weight range; exact in float, since
  ``relu(x / s) = relu(x) / s`` and max-pooling commute with ``s > 0``.
* :func:`bias_correction` (same paper, empirical variant): add to each layer's bias the mean
  per-channel shift ``E[y_float] - E[y_quant]`` measured on calibration data.
* :func:`adaround` (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training
  quantization"): learn, layer by layer on unlabeled calibration data, whether each weight rounds
  up or down; the result is ordinary integer weights.

All three work on a calibrated ``QuantizedNet`` (bias correction, AdaRound) or on the float
``Net`` (equalization, BN folding) and leave the integer path untouched: ``freeze()`` then gives
weights, biases and multipliers that the existing integer inference and PyTorch's qnnpack
kernels compute bit-exactly. Taught in notebook ``da_calibration``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_float_tensor, check_int, check_real
from .gptq import gptq_on_grid
from .models import Net, NetBN, QuantizedNet
from .modules import QConvBNReLU, QModule, _QWeighted, fold_bn
from .ops import QAdd, QCat, QInput

#: the rectified sigmoid's stretch: h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
ZETA, GAMMA = 1.1, -0.1


# -- float-model transforms ------------------------------------------------------------------

@torch.no_grad()
def fold_batchnorm(net: NetBN) -> Net:
    """A ``Net`` whose convs hold ``NetBN``'s convs with their BN folded in (eval mode, running
    statistics): ``w' = w gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) gamma / sqrt(var +
    eps)`` (:func:`quantlab.modules.fold_bn`, the same floats as ``QConvBNReLU``)."""
    if not isinstance(net, NetBN):
        raise TypeError(f"net must be a quantlab.models.NetBN; got {type(net).__name__}")
    out = Net(net.conv1.in_channels)
    for conv, bn, dst in ((net.conv1, net.bn1, out.conv1), (net.conv2, net.bn2, out.conv2)):
        w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                       bn.bias, bn.eps)
        dst.weight.copy_(w)
        dst.bias.copy_(b)
    out.fc.load_state_dict(net.fc.state_dict())
    return out.eval()


def input_channel_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """``r2_i = max |W[o, i % (C_in/groups)]|`` over the output channels ``o`` of input channel
    ``i``'s group: the weight range each input channel of a (grouped) conv meets."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
    w = conv.weight.detach().abs()
    g = conv.groups
    c_out, c_in_g = w.shape[0], w.shape[1]
    per_group = w.reshape(g, c_out // g, c_in_g, -1).amax(dim=(1, 3))  # (groups, C_in/groups)
    return per_group.reshape(-1)


@torch.no_grad()
def equalize_pair(conv1: nn.Conv2d, conv2: nn.Conv2d) -> torch.Tensor:
    """Cross-layer equalization of ``conv2(pool(relu(conv1(x))))`` in place.

    ``r1_i = max |W1[i]|`` (conv1's output channel ``i``), ``r2_i`` = the range of conv2's
    weights reading channel ``i`` (:func:`input_channel_ranges`, groups handled);
    ``s_i = sqrt(r1_i / r2_i)``; ``W1[i] /= s_i``, ``b1[i] /= s_i``, ``W2[:, i] *= s_i``. Both
    ranges become ``sqrt(r1_i r2_i)``. A channel with ``r1_i = 0`` or ``r2_i = 0`` keeps
    ``s_i = 1``. Returns ``s`` of shape (C,).
    """
    if conv1.out_channels != conv2.in_channels or conv1.groups != 1:
        raise ValueError("conv1 must be an ungrouped conv whose out_channels feed conv2")
    r1 = conv1.weight.abs().flatten(1).amax(1)
    r2 = input_channel_ranges(conv2)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))
    conv1.weight.div_(s.reshape(-1, 1, 1, 1))
    if conv1.bias is not None:
        conv1.bias.div_(s)
    g = conv2.groups
    c_in_g = conv2.in_channels // g
    w2 = conv2.weight.view(g, conv2.out_channels // g, c_in_g, *conv2.weight.shape[2:])
    w2.mul_(s.reshape(g, 1, c_in_g, 1, 1))
    return s


def equalize(net: nn.Module) -> Net:
    """A copy of ``Net`` (``NetBN`` is BN-folded first) with conv1 -> ReLU -> pool -> conv2
    equalized (:func:`equalize_pair`); the float function is unchanged (up to rounding)."""
    if isinstance(net, NetBN):
        net = fold_batchnorm(net)
    elif isinstance(net, Net):
        net = copy.deepcopy(net)
    else:
        raise TypeError(f"net must be a quantlab.models.Net or NetBN; got {type(net).__name__}")
    equalize_pair(net.conv1, net.conv2)
    return net


# -- layer inputs on calibration data ----------------------------------------------------------

def _check_qnet(qnet):
    if not isinstance(qnet, QuantizedNet):
        raise TypeError(f"qnet must be a QuantizedNet (quantize_model); got {type(qnet).__name__}")
    if not qnet.q_in.observed:
        raise RuntimeError("qnet must be calibrated first: qnet.calibrate(train_loader)")
    if qnet.frozen:
        raise RuntimeError("qnet is frozen: apply bias correction / AdaRound before freeze()")


def _check_max_images(max_images) -> int | None:
    return None if max_images is None else check_int(max_images, "max_images", 1)


def _images(data, max_images: int | None) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        x = data
    else:
        x = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in data])
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError("data must be a float (N, C, H, W) image tensor or a loader of them")
    return x[:max_images] if max_images else x


def _float_weight_bias(layer):
    """The float model's weight and bias of a weighted layer: the weight it had before AdaRound
    or GPTQ pinned its rounded one (``weight_before_adaround``, set by :func:`_pin_weight`) and
    the bias it had before bias correction moved it (``bias_before_correction``), so the float
    path stays the float model's whatever was done to the layers before."""
    w, b = layer.float_weight_bias()
    return getattr(layer, "weight_before_adaround", w), getattr(layer, "bias_before_correction", b)


def _float_layer(layer, x):
    """The float model's computation of a quantized layer (no fake quantization), so the targets
    of later layers stay the float model's after earlier layers were rounded."""
    if isinstance(layer, _QWeighted):
        w, b = _float_weight_bias(layer)
        return layer._activation(layer._op(x, w, b))
    return layer(x)


def _float_compute(layer, args):
    """A graph step computed as the float model does (``QuantizedNet.layer_inputs(compute=)``):
    weighted layers with their float weights, adds and concatenations without requantizing,
    the input without quantizing; pools, ReLUs and flatten quantize nothing of their own."""
    if isinstance(layer, _QWeighted):
        return _float_layer(layer, args[0])
    if isinstance(layer, QAdd):
        y = args[0] + args[1]
        return F.relu(y) if layer.relu else y
    if isinstance(layer, QCat):
        return torch.cat(list(args), layer.dim)
    if isinstance(layer, QInput):
        return args[0]
    return layer(*args)


def _quant_input(layer, x):
    """What the quantized layer computes with: its input, fake-quantized when it owns q_in."""
    return layer.q_in.fake_quantize(x) if layer.qi else x


def _layer_input(qnet, x, index, compute=None, chunk=500):
    """The input the graph gives ``qnet.layers[index]`` on images ``x`` (in chunks; eval mode,
    nothing observed): fake-quantized as the quantized model runs, or as ``compute`` says."""
    return torch.cat([qnet.layer_inputs(c, index, compute)[0] for c in x.split(chunk)])


def _weighted_steps(qnet):
    """(index, layer) of the weighted layers, in the graph's order."""
    order = [s.index for s in qnet.steps if s.kind == "layer"]
    return [(i, qnet.layers[i]) for i in order if isinstance(qnet.layers[i], _QWeighted)]


# -- bias correction ---------------------------------------------------------------------------

def _bias_param(layer):
    """The parameter that holds a weighted layer's bias (BN's beta for ``QConvBNReLU``: the
    folded bias moves by exactly as much as beta)."""
    if isinstance(layer, QConvBNReLU):
        return layer.bn.bias
    return layer.conv.bias if hasattr(layer, "conv") else layer.fc.bias


@torch.no_grad()
def _correct_bias(layer, x_in: torch.Tensor, x_ref: torch.Tensor):
    """``b_c += mean [W x_ref]_c - mean [Q(W) x_in]_c`` (means over images and positions, before
    the activation); returns the shift ``delta`` (C,)."""
    w, _ = layer.float_weight_bias()
    w_float, _ = _float_weight_bias(layer)
    y_f = layer._op(x_ref, w_float, None)
    y_q = layer._op(x_in, layer.q_w.fake_quantize(w), None)
    dims = [d for d in range(y_f.dim()) if d != 1]
    delta = (y_f - y_q).mean(dims)
    if not hasattr(layer, "bias_before_correction"):   # the float path keeps the float bias
        _, b = layer.float_weight_bias()
        layer.bias_before_correction = None if b is None else b.detach().clone()
    _bias_param(layer).add_(delta)
    return delta


BIAS_REFERENCES = ("same_input", "float_model")


@torch.no_grad()
def bias_correction(qnet: QuantizedNet, data, max_images: int | None = 2000,
                    reference: str = "same_input") -> dict:
    """Empirical bias correction (Nagel et al. 2019), in place.

    For each weighted layer in order, on calibration images:
    ``delta_c = mean_{n,h,w} [ W x_ref ]_c - mean_{n,h,w} [ Q(W) x_q ]_c`` (before the ReLU),
    ``b_c += delta_c``, where ``x_q`` is the quantized model's input to the layer (after the
    layers before it are corrected), ``W`` the float weight (the one before AdaRound, when
    AdaRound ran) and ``Q(W)`` the weight the integer model uses. ``reference`` says what ``x_ref``
    is:

    * ``"same_input"``: ``x_q`` itself, so ``delta = mean [(W - Q(W)) x_q]``: only the shift the
      quantized *weights* add is removed; the activations' own quantization is left alone;
    * ``"float_model"``: the float model's input to the layer, so the layer's whole mean shift
      (its weights' and its inputs' quantization error) is removed: what the float model computes
      on average is what the quantized one computes. At 2 bits this is the version that helps,
      with the ranges observed again after each layer (:func:`layer_by_layer`): mse/mse with
      nearest rounding went from 90.4% / 67.2% (Net / NetBN, official 10k) to 94.2% / 91.2%,
      where ``"same_input"`` in the same loop gave 85.9% / 77.3%.

    For ``QConvBNReLU`` the shift goes into BN's beta (the folded bias moves by exactly
    ``delta``).

    Args:
        qnet: a calibrated, not frozen QuantizedNet. data: images or a loader (training data).
        max_images: use at most this many images (None: all).
        reference: ``"same_input"`` or ``"float_model"`` (above).
    Returns:
        ``{layer index: delta}``.
    """
    _check_qnet(qnet)
    max_images = _check_max_images(max_images)
    if reference not in BIAS_REFERENCES:
        raise ValueError(f"reference must be one of {BIAS_REFERENCES}; got {reference!r}")
    qnet.eval()
    images = _images(data, max_images)
    deltas = {}
    for i, layer in _weighted_steps(qnet):
        x_q = _quant_input(layer, _layer_input(qnet, images, i))  # after the layers before it
        x_ref = x_q if reference == "same_input" else \
            _layer_input(qnet, images, i, _float_compute)
        deltas[i] = _correct_bias(layer, x_q, x_ref)
    return deltas


# -- AdaRound ----------------------------------------------------------------------------------

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1: reaches
    exactly 0 and 1, so rounding decisions can become hard during training."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


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

    ``W~ = S (clamp(floor(W/S) + h(V) + Z, q_min, q_max) - Z)`` with ``V`` initialised so that
    ``h(V) = W/S - floor(W/S)`` (W~ = W at the start). Adam minimises, on random batches,
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
    rest = (scaled - base).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - GAMMA) / (ZETA - rest)).requires_grad_(True)  # h(v) = rest
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
        w_soft = scale * (torch.clamp(base + rectified_sigmoid(v) + zp, lo, hi) - zp)
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
    _check_qnet(qnet)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
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


def recalibrate(qnet: QuantizedNet, data, num_batches: int | None = None) -> QuantizedNet:
    """Forget the activation ranges and observe them again (e.g. after AdaRound or bias
    correction changed the weights); pinned weight qparams stay. Learned steps (LSQ, PACT) are
    initialised again by their observers. If the calibration fails (bad data), every range is
    restored as it was, so a frozen model stays usable."""
    from .learned import LearnedQParam
    from .observer import QParam

    if not isinstance(qnet, QuantizedNet):
        raise TypeError(f"qnet must be a QuantizedNet (quantize_model); got {type(qnet).__name__}")
    qparams = [qp for layer in qnet.layers if isinstance(layer, QModule)
               for qp in (getattr(layer, "q_in", None), getattr(layer, "q_out", None))
               if isinstance(qp, QParam)]
    saved = [(qp, copy.deepcopy(qp.state_dict()), copy.deepcopy(qp.observer), qp.version)
             for qp in dict.fromkeys(qparams)]
    for qp in dict.fromkeys(qparams):
        qp.observer.reset()
        if isinstance(qp, LearnedQParam):
            qp.learned.data = torch.empty(0)       # unobserved: calibrate() initialises it
        else:
            for buf in ("min_val", "max_val", "scale", "zero_point"):
                setattr(qp, buf, torch.empty(0))
    try:
        return qnet.calibrate(data, num_batches)
    except BaseException:
        for qp, state, observer, version in saved:  # as before the call
            qp.load_state_dict(state)
            qp.observer, qp.version = observer, version
        raise
