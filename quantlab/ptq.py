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

The float-model transforms are here; the layer-by-layer methods have modules of their own, and every
name is importable from here as well: :mod:`quantlab.ptq_steps` (each layer's inputs, bias
correction, recalibration), :mod:`quantlab.adaround`, :mod:`quantlab.layerwise` (AdaRound, GPTQ or
nearest rounding, one layer at a time, with bias correction against the float model).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# the layer-by-layer methods live in their own modules; every name stays importable from here
from .adaround import GAMMA, ZETA, adaround, adaround_layer, rectified_sigmoid  # noqa: F401
from .layerwise import ROUNDINGS, gptq_layer, input_columns, layer_by_layer, layer_hessian  # noqa: F401
from .models import Net, NetBN
from .modules import fold_bn
from .ptq_steps import (  # noqa: F401
    BIAS_REFERENCES,
    _check_max_images,
    _check_qnet,
    _correct_bias,
    _float_compute,
    _float_layer,
    _float_weight_bias,
    _images,
    _layer_input,
    _quant_input,
    _weighted_steps,
    bias_correction,
    recalibrate,
)

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
