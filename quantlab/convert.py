"""Quantize your own model: trace it with ``torch.fx``, fuse, and build a quantized graph model.

``quantize_model(model)`` runs a short pipeline of named passes (:mod:`quantlab.passes`) over the
model's ``torch.fx`` graph: trace -> classify and check -> match the table of patterns
(:data:`quantlab.patterns.PATTERNS`: what converts to what, e.g. ``conv + bn + relu`` ->
``QConvBNReLU``) -> lower each match to a quantized layer (:mod:`quantlab.modules`,
:mod:`quantlab.ops`) -> build the :class:`QuantizedNet` and configure its observers. ``Net`` and
``NetBN`` are two inputs like any other. The result keeps its layers in graph order in ``layers``
and runs them in three modes: float with fake quantization (calibration, QAT), and integer
inference. Taught in notebooks ``d_post_training_quantize`` (Net) and ``h_your_own_model`` (a ResNet).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._validate import check_bool, check_real, check_tensor
from .graph import QuantizedNet, Step
from .learned import LearnedQParam, check_learn_ranges
from .modules import QConv2d, QConvBNReLU, QLinear, check_multiplier_formula
from .observer import QParam
from .observers import WEIGHT_OBSERVERS, Observer, check_observer, make_observer
from .ops import QAdd, QCat, QInput
from .passes import (
    Context,
    UnsupportedModelError,
    check_graph,
    classify,
    fuse_conv_maxpool,
    lower,
    match,
    trace,
)
from .patterns import supported
from .qparams import check_num_bits

__all__ = ["quantize_model", "UnsupportedModelError", "supported"]


def quantize_model(net: nn.Module, num_bits: int = 8, per_channel: bool = True,
                   qat: bool = False, fixed_point: bool = False,
                   averaging_constant: float | None = None, output_bits: int | None = 8,
                   multiplier: str = "qnnpack", observer=None, weight_observer=None,
                   learn_ranges=False,
                   example_input: torch.Tensor | None = None) -> QuantizedNet:
    """Build the quantized version of any supported model (a deep copy: ``net`` is untouched).

    The model is traced with ``torch.fx``; a Conv2d's BatchNorm2d is folded into it and a
    following ReLU/ReLU6 fused (the output range is observed after it and the activation becomes
    the output clamp); a ReLU after an add is fused into the add. See the module docstring for
    the supported ops; anything else raises :class:`UnsupportedModelError` naming the node.

    Args:
        net: the float model, an ``nn.Module`` mapping one image tensor to one output tensor
            (``Net``, ``NetBN``, ``ResNet`` or your own).
        num_bits: bits of weights and activations (2..16; 8 for PyTorch's engines).
        per_channel: symmetric per-channel int weights (True) or affine per-tensor (False).
        qat: return a trainable model for quantization-aware training: activation ranges follow a
            moving average (``averaging_constant`` 0.01 unless given), BN statistics are frozen
            (``freeze_bn_stats``), the model is in train mode and carries its own default
            learning rate and augmentation for ``quantlab.training.train``.
        fixed_point: integer-only requantization of conv/linear layers (Q31 multiplier and shift)
            instead of float.
        output_bits: bits of the model's output, the logits to the host (8 by default; None for
            ``num_bits``). Below 8 bits ``num_bits`` applies to the input, every weight and every
            hidden activation, but 10 logits on 2 bits (4 levels) would mostly tie at the top
            level, so the output keeps its own width.
        multiplier: ``"qnnpack"`` (default) or ``"onnxruntime"``: how ``freeze()`` computes the
            float32 requantization multiplier of the conv/linear layers, as PyTorch's qnnpack
            (``f32(f32(S_x*S_w) * f32(1/S_y))``) or as ONNX Runtime (``f32(f32(S_x*S_w) / S_y)``).
        observer: the range estimator of the hidden activations (the outputs of the conv, linear,
            add and cat layers, except the model's output): None (min/max, or the moving average
            for QAT), a name in ``quantlab.observers.OBSERVERS`` or an ``Observer`` (copied for
            each QParam). The input keeps min/max (the pixel range, known exactly; entropy would
            clip the white strokes) and so do the logits (clipping the top logit creates ties for
            the argmax). Notebook ``da_calibration``.
        weight_observer: ``None``/``"minmax"`` or ``"mse"`` (clipping per channel with
            ``per_channel=True``).
        learn_ranges: with ``qat=True``, learn the ranges instead of following a moving average
            (``quantlab.learned``): ``True`` or ``"lsq"`` learns every step with LSQ (weights per
            output channel, activations per tensor); ``"pact"`` learns the clip of the outputs of
            conv/linear layers with a fused ReLU with PACT and the other steps with LSQ; ``False``
            (default) learns none. The steps start from ``observer`` (hidden activations and
            the input; ``"mse"`` unless given), ``weight_observer`` (``"mse"`` unless given)
            and min/max for the model's output, on the first batch or in ``calibrate()``; the
            zero points stay as initialised. Notebook ``fa_learned_step_size``.
        example_input: an input batch; when given, the float and the traced graph are run on it
            and must agree (catches a reshape that mixes the batch dimension), and the model
            accepts only inputs of its shape (``input_shape``).
    """
    args = _check_arguments(net, num_bits, per_channel, qat, fixed_point, averaging_constant,
                            output_bits, multiplier, observer, weight_observer, learn_ranges,
                            example_input)
    (num_bits, per_channel, qat, fixed_point, averaging_constant, output_bits, multiplier,
     observer, weight_observer, learn) = args
    # quantlab's qparams and observers are float32: a float64/float16 model is converted
    # (float16 -> float32 is exact; float64 -> float32 rounds each weight once)
    model = copy.deepcopy(net).float().eval()
    gm = trace(model)
    kinds = classify(gm)
    check_graph(gm, kinds)
    ctx = Context(dict(gm.named_modules()), num_bits, averaging_constant,
                  dict(num_bits=num_bits, per_channel=per_channel, fixed_point=fixed_point,
                       averaging_constant=averaging_constant, multiplier=multiplier))
    layers, steps = _input_layer(gm, kinds, ctx)
    lower(match(gm, kinds, ctx), ctx, layers, steps)
    nodes = list(gm.graph.nodes)
    x_name = next(n.name for n in nodes if n.op == "placeholder")
    out_name = ctx.ref(next(n for n in nodes if n.op == "output").args[0])[1:]
    fuse_conv_maxpool(layers, steps, out_name)
    qnet = QuantizedNet(layers, num_bits, per_channel, fixed_point, qat, steps,
                        input_name=x_name, output_name=out_name)
    _set_output_bits(qnet, output_bits, averaging_constant)
    # the input shape the model accepts: example_input's, or one the model declares (Net's fc
    # needs 28x28 images); None accepts any batch
    qnet.input_shape = tuple(example_input.shape[1:]) if example_input is not None else \
        getattr(model, "input_shape", None)
    _configure_observers(qnet, learn, observer, weight_observer, averaging_constant, qat)
    if example_input is not None:
        _check_example_input(model, gm, example_input)
    if qat:
        # fine-tuning a trained model: BN statistics frozen, i.e. training folds BN exactly as
        # inference does (the last phase of the standard recipe)
        qnet.freeze_bn_stats(True)
    return qnet.train(qat)


def _check_arguments(net, num_bits, per_channel, qat, fixed_point, averaging_constant,
                     output_bits, multiplier, observer, weight_observer, learn_ranges,
                     example_input) -> tuple:
    """quantize_model's arguments, checked and normalised (an error names the argument)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
    num_bits = check_num_bits(num_bits, "num_bits")
    per_channel, qat = check_bool(per_channel, "per_channel"), check_bool(qat, "qat")
    fixed_point = check_bool(fixed_point, "fixed_point")
    if output_bits is not None:
        output_bits = check_num_bits(output_bits, "output_bits")
    if averaging_constant is not None:
        averaging_constant = check_real(averaging_constant, "averaging_constant", 0, 1,
                                        low_open=True)
    multiplier = check_multiplier_formula(multiplier)
    observer = check_observer(observer, "observer")
    weight_observer = check_observer(weight_observer, "weight_observer", WEIGHT_OBSERVERS)
    if isinstance(weight_observer, Observer):
        raise TypeError("weight_observer must be None or one of "
                        f"{list(WEIGHT_OBSERVERS)}; got an Observer instance")
    if example_input is not None:
        check_tensor(example_input, "example_input")
        if example_input.dim() < 2 or len(example_input) == 0:
            raise ValueError(f"example_input must be a batch (N, ...) of at least one input, e.g. "
                             f"torch.zeros(1, 1, 28, 28); got shape {tuple(example_input.shape)}")
        if not example_input.is_floating_point():
            raise TypeError(f"example_input must be a float tensor like the model's inputs (the "
                            f"normalized images, e.g. torch.zeros(1, 1, 28, 28)); got dtype "
                            f"{example_input.dtype}")
        if not bool(torch.isfinite(example_input).all()):
            raise ValueError("example_input must hold finite values: it checks the traced graph "
                             "against the model, which NaN or inf cannot show")
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()):
        raise TypeError(f"net must hold at least one Conv2d or Linear layer to quantize; "
                        f"{type(net).__name__} has none")
    for name, p in list(net.named_parameters()) + list(net.named_buffers()):
        check_tensor(p, f"net.{name}")  # meta tensors (no data) cannot be quantized
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"net.{name} holds NaN or inf: a float model to quantize must be "
                             "finite")
    learn = check_learn_ranges(learn_ranges)
    if learn is not None and not qat:
        raise ValueError(f"learn_ranges={learn_ranges!r} learns ranges during quantization-aware "
                         "training: it needs qat=True")
    if averaging_constant is None and qat and learn is None:
        averaging_constant = 0.01
    return (num_bits, per_channel, qat, fixed_point, averaging_constant, output_bits, multiplier,
            observer, weight_observer, learn)


def _input_layer(gm, kinds: dict, ctx: Context) -> tuple[list, list]:
    """The model's input goes straight into exactly one weighted layer: that layer quantizes it
    (``qi=True``, ``ctx.first_owner``). Otherwise a QInput layer does, as the graph's first step."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    users = list(x.users)
    if len(users) == 1 and kinds.get(users[0]) in ("conv", "linear"):
        ctx.first_owner = users[0]
        return [], []
    ctx.names[x.name] = x.name + "_q"
    return [QInput(ctx.num_bits, ctx.averaging_constant)], \
        [Step(x.name + "_q", "layer", 0, args=("%" + x.name,))]


def _set_output_bits(qnet: QuantizedNet, output_bits, averaging_constant) -> None:
    """The model's output keeps its own width (``output_bits``) when it differs from num_bits."""
    if output_bits is not None and output_bits != qnet.num_bits:
        where = qnet._qsource.get(qnet.output_name)
        if where is not None and where[1] == "out":
            qnet.layers[where[0]].q_out = QParam(output_bits, averaging_constant=averaging_constant)
            qnet.link_inputs()


def _configure_observers(qnet: QuantizedNet, learn, observer, weight_observer,
                         averaging_constant, qat: bool) -> None:
    """Learned ranges (LSQ/PACT), or the chosen observers of the hidden activations and the
    weights; QAT's forward pass simulates the integer model."""
    if learn is not None:
        _learn_ranges(qnet, learn, observer, weight_observer)
        qnet.default_lr = 3e-3  # the steps learn too: LSQ's recipe (benchmarks/bench_lsq.py)
    for layer in qnet.layers if learn is None else ():
        if observer is not None and isinstance(layer, (QConv2d, QConvBNReLU, QLinear, QAdd, QCat)) \
                and layer.q_out is not None and layer.q_out is not qnet.q_out:  # hidden ones only
            layer.q_out.observer = make_observer(copy.deepcopy(observer), None, averaging_constant)
        if weight_observer is not None and hasattr(layer, "q_w"):
            layer.q_w.observer = make_observer(weight_observer, layer.q_w.axis,
                                               name="weight_observer", allowed=WEIGHT_OBSERVERS)
    for layer in qnet.layers:
        # QAT's forward pass computes exactly what the integer model will: int32 bias and
        # requantization rounding (the calibration of PTQ keeps the plain fake quantization)
        layer.simulate_integer = qat and hasattr(layer, "link_input")


def _check_example_input(model: nn.Module, gm: torch.fx.GraphModule, example_input) -> None:
    """The traced graph must reproduce the model on ``example_input`` and on a batch of twice
    its size (a batch of one cannot reveal a hard-coded ``reshape(1, -1)``), keeping the batch
    dimension."""
    x = example_input.float()
    batches = (x, torch.cat([x, x.flip(0)]))
    for batch in batches:
        try:
            with torch.no_grad():
                want, got = model(batch), gm(batch)
        except Exception as e:  # the model itself fails on a batch of another size
            raise UnsupportedModelError(
                f"the model fails on a batch of {batch.shape[0]} example inputs "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}): quantize_model needs a "
                "model that keeps the batch dimension (no hard-coded batch size)") from e
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or \
                want.shape != got.shape or not torch.allclose(want, got) or \
                got.shape[0] != batch.shape[0]:
            raise UnsupportedModelError(
                f"the traced graph does not reproduce the model on a batch of "
                f"{batch.shape[0]} example inputs, or does not keep the batch dimension "
                f"(output shape {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__})")


def _learn_ranges(qnet: QuantizedNet, method: str, observer, weight_observer) -> None:
    """Replace the model's QParams by learned ones (:class:`quantlab.learned.LearnedQParam`):
    every weight's (per output channel), the input's and every hidden activation's (per tensor;
    PACT only after a fused ReLU, whose output is unsigned from 0), and the output's, initialised
    by min/max (clipping the top logit would create ties for the argmax)."""

    def like(q: QParam, method="lsq", per_image=True, obs="mse"):
        return LearnedQParam(q.num_bits, q.signed, q.symmetric, q.axis, method=method,
                             per_image=per_image, observer=copy.deepcopy(obs))

    act = "mse" if observer is None else observer
    output = qnet.q_out
    for layer in qnet.layers:
        if hasattr(layer, "q_w"):
            layer.q_w = like(layer.q_w, per_image=False,
                             obs="mse" if weight_observer is None else weight_observer)
        if getattr(layer, "qi", False):  # the layer that quantizes the model's input (QInput too)
            layer.q_in = like(layer.q_in, obs=act)
        q_out = getattr(layer, "q_out", None)
        if q_out is None:
            continue
        if q_out is output:
            layer.q_out = like(q_out, obs="minmax")
        else:
            fused_relu = getattr(layer, "relu", False) and not getattr(layer, "relu6", False)
            layer.q_out = like(q_out, method=method if fused_relu else "lsq", obs=act)
    qnet.link_inputs()
