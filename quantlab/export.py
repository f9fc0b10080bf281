"""Export a frozen quantlab model to ONNX in the QOperator format (QLinearConv and friends).

``to_onnx(model, path)`` writes a frozen :class:`~quantlab.models.QuantizedNet`, or a single frozen
``QConv2d`` / ``QConvBNReLU`` / ``QLinear``, as a standard ONNX graph (opset 13 by default)::

    x (float32) -QuantizeLinear-> uint8 -QLinearConv-> uint8 -MaxPool-> ... -Flatten-> uint8
      -Reshape (N, 1000, 1, 1)-> QLinearConv 1x1 (the fc layer) -Flatten-> y_q (uint8)
      -DequantizeLinear-> y (float32)

Graph outputs: ``y`` (the dequantized output) and ``y_q`` (its integers). With
``input_dtype="uint8"`` the graph starts from the input integers ``x_q`` instead (no
QuantizeLinear), which compares integers with integers.

What each node holds, in quantlab's names:

- ``QLinearConv``: ``q_x`` (uint8) with ``S_x, Z_x``; ``q_w`` as int8 with ``S_w, Z_w`` per tensor
  (affine: ``Z_w != 0``, which ONNX Runtime supports per tensor) or per output channel (symmetric,
  ``Z_w = 0``, which ONNX requires per channel); ``q_b`` as int32 (scale ``S_x * S_w``, zero point 0);
  ``S_y, Z_y``. ONNX Runtime computes ``q_y = sat(rne(f32(acc + q_b) * M) + Z_y)`` with
  ``M = f32(f32(S_x * S_w) / S_y)``; quantlab's default ``M`` is qnnpack's
  ``f32(f32(S_x * S_w) * f32(1 / S_y))``, which differs in the last bit for some scales (freeze the
  model with ``multiplier="onnxruntime"`` for ONNX Runtime's integers).
- A fused ReLU needs no node: its output range starts at 0, so ``Z_y = 0`` and the uint8 saturation
  is the ReLU. Narrower ranges (``num_bits < 8``, or a ReLU with ``Z_y > 0``) get a ``Clip``.
- The fc layer is a 1x1 ``QLinearConv`` on the flattened features reshaped to (N, C, 1, 1), not a
  ``QLinearMatMul``: QLinearMatMul has no bias input, and adding the int32 bias outside it would
  need an integer MatMul, an Add and a float requantization of our own (MatMulInteger, Add, Cast,
  Mul, QuantizeLinear), five nodes whose float rounding no longer matches quantlab's or ONNX
  Runtime's fused requantization. The 1x1 conv is exactly ``q_w @ q_x + q_b`` with the same
  requantization as the conv layers.

Graph models (residual adds, pooling, concatenation, any model of ``quantize_model``) use four
operators of ONNX Runtime's ``com.microsoft`` domain, which the standard has no QOperator for:

- ``QLinearAdd`` for ``QAdd`` (+ a ``Clip`` at ``Z_y`` for a fused ReLU). ONNX Runtime's x86
  kernel adds in float32, quantlab in qnnpack's fixed point: the two can differ, by 1 LSB, only
  where the exact sum is a tie or a near-tie ``k + 1/2`` (exact ties come with power-of-two scale
  ratios; ``tests/test_ops.py``, and notebook ``h_your_own_model`` add by add).
- ``QLinearGlobalAveragePool`` for ``AdaptiveAvgPool2d(1)`` (measured bit-exact) and
  ``QLinearAveragePool`` for ``AvgPool2d`` (1 LSB on some outputs: it rounds its own way);
  other adaptive output sizes are refused.
- ``QLinearConcat`` for ``QCat`` (it divides by ``S_y`` where quantlab, like PyTorch, multiplies by
  ``f32(1/S_y)``: 1 LSB on near-ties).

ReLU6 is a ``Clip`` at ``[Z, Z + rne(f32(6 * f32(1/S)))]`` (``modules.relu6_limit``, as PyTorch;
not always ``Z + round(6/S)`` computed exactly). Shape steps other than flatten are refused.

Fixed-point (TFLite-style) requantization has no ONNX operator: such models are refused unless
``allow_fixed_point=True``, which exports the same graph with a note in its metadata
(``quantlab.requantization = fixed_point``): ONNX Runtime then requantizes in float (0.1-0.4% of
outputs 1 LSB off), while :mod:`quantlab.engine` reads the note and reproduces quantlab's integers.
``to_npz(model, path)`` writes the same integers and qparams as a documented ``.npz`` file
(:mod:`quantlab.npz`), which :mod:`quantlab.engine` runs with NumPy alone. Taught in notebook
``g_deploy``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .graph import QuantizedNet, _refs
from .modules import (
    MULTIPLIER_FORMULAS,
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    requantization_multiplier,
)
from .npz import write, write_atomically
from .onnx_nodes import Graph, layer_nodes, weighted_nodes
from .ops import QAdd, QAvgPool2d, QCat, QInput

#: metadata keys that tell quantlab.engine how quantlab requantized (ONNX has no field for it)
META_MULTIPLIER = "quantlab.multiplier"
META_REQUANTIZATION = "quantlab.requantization"
INPUT_DTYPES = ("float32", "uint8")
WEIGHT_DTYPES = ("uint8", "int8")


def multiplier_formula(layer) -> str:
    """Which formula produced a frozen layer's float32 multipliers: "qnnpack" or "onnxruntime".

    Read from the multipliers themselves (a loaded state_dict carries them, not the formula);
    when both formulas give the same float32 values, the layer's own ``multiplier_formula``.
    """
    if not isinstance(layer, (QConv2d, QConvBNReLU, QLinear)) or not layer.frozen:
        raise TypeError(f"layer must be a frozen QConv2d, QConvBNReLU or QLinear; got "
                        f"{type(layer).__name__}")
    matches = [f for f in MULTIPLIER_FORMULAS if torch.equal(
        requantization_multiplier(layer.q_in.scale, layer.q_w.scale, layer.q_out.scale,
                                  f).expand_as(layer.multiplier), layer.multiplier)]
    if not matches:
        raise ValueError(f"{type(layer).__name__}'s multipliers match neither formula of "
                         f"{MULTIPLIER_FORMULAS}: freeze() it again")
    own = getattr(layer, "multiplier_formula", "qnnpack")
    return own if own in matches else matches[0]


def _is_flatten(step) -> bool:
    return step.kind == "shape" and step.fn is torch.flatten and \
        tuple(step.args[1:]) in ((1,), (1, -1))


def _check_linear_inputs(net: QuantizedNet) -> None:
    """Refuse, by step, a QLinear whose input is not (N, in_features): the export writes it as a
    Reshape to (N, in, 1, 1) and a 1x1 QLinearConv, which equals PyTorch's Linear only on a
    2-D input (on (N, C, H, W) PyTorch applies it to the last dimension)."""
    by_name = {s.name: s for s in net.steps}
    for step in net.steps:
        if step.kind != "layer" or not isinstance(net.layers[step.index], QLinear):
            continue
        src = by_name.get(_refs(step.args)[0])
        while src is not None and (src.kind == "alias" or src.kind == "layer" and hasattr(
                net.layers[src.index], "integer_range")):    # a clamp keeps the rank
            src = by_name.get(_refs(src.args)[0])
        if src is None:                   # the model's input: 2-D unless its shape says otherwise
            shape = getattr(net, "input_shape", None)
            four_d = shape is not None and len(shape) != 1
        else:                             # the output of a conv, pool, add or cat is (N, C, H, W)
            four_d = src.kind == "layer" and isinstance(net.layers[src.index], (
                QConv2d, QConvBNReLU, QMaxPool2d, QAvgPool2d, QAdd, QCat, QInput))
            if isinstance(net.layers[src.index] if src.kind == "layer" else None, QInput):
                shape = getattr(net, "input_shape", None)
                four_d = shape is not None and len(shape) != 1
        if four_d:
            raise TypeError(f"graph step {step.name} (QLinear) reads '{src.name if src else 'the input'}', "
                            "which is not a flattened (N, features) tensor: a Linear on the last "
                            "dimension of an (N, C, H, W) tensor has no exact QLinearConv export")


def _chain(net: QuantizedNet) -> list:
    """The layers of ``net`` in order, if its graph is a chain the .npz format can hold (each
    layer reads the previous step's output; flatten(x, 1) and pass-throughs between them);
    otherwise TypeError naming the first step it cannot hold."""
    current, layers = net.input_name, []
    for step in net.steps:
        refs = _refs(step.args)
        if refs != [current]:
            raise TypeError(f"graph step {step.name} reads {refs}, not the previous step's output "
                            f"'{current}': the .npz format holds a chain of layers (use to_onnx "
                            "for branches, adds and concatenations)")
        if step.kind == "shape" and not _is_flatten(step):
            raise TypeError(f"graph step {step.name} ({getattr(step.fn, '__name__', step.fn)}) has "
                            "no .npz export: only flatten(x, 1) of the shape functions is held")
        if step.kind == "shape":            # flatten(x, 1) as a flatten layer on the same qparams
            flat = QFlatten(net.num_bits)
            flat.freeze(layers[-1].output_qparam if layers else net.q_in)
            layers.append(flat)
        elif step.kind == "layer":
            layers.append(net.layers[step.index])
        current = step.name
    if current != net.output_name:
        raise TypeError(f"the model's output '{net.output_name}' is not the end of its chain")
    return layers


def _layers(model, caller: str) -> list:
    """The layers of a frozen QuantizedNet, or ``[model]`` for a single frozen weighted layer."""
    if isinstance(model, QuantizedNet):
        if not model.frozen:
            raise RuntimeError("model is not frozen: qnet.calibrate(train_loader); qnet.freeze()")
        _check_linear_inputs(model)
        layers = _chain(model) if caller == "to_npz" else list(model.layers)
    elif isinstance(model, (QConv2d, QConvBNReLU, QLinear)):
        layers = [model]
    else:
        raise TypeError(f"model must be a frozen QuantizedNet, QConv2d, QConvBNReLU or QLinear; "
                        f"got {type(model).__name__}")
    if not isinstance(layers[0], (QConv2d, QConvBNReLU, QLinear)):
        raise TypeError("the first layer must be a QConv2d, QConvBNReLU or QLinear")
    if not layers[0].frozen:
        raise RuntimeError(f"model is not frozen: calibrate, then freeze() before {caller}")
    return layers


def to_onnx(model, path: str | os.PathLike | None = None, *, input_dtype: str = "float32",
            weight_dtype: str = "uint8", opset: int = 13,
            allow_fixed_point: bool = False) -> onnx.ModelProto:
    """Write a frozen QuantizedNet / QConv2d / QConvBNReLU / QLinear as an ONNX QOperator graph.

    Args:
        model: the frozen model or layer (``calibrate``, then ``freeze()``): any model of
            ``quantize_model`` (graphs with adds, pooling and concatenation use ONNX Runtime's
            ``com.microsoft`` operators, see the module docstring).
        path: where to write the ``.onnx`` file (None: only return the model).
        input_dtype: ``"float32"``: input ``x`` of float images, quantized by a QuantizeLinear
            node; ``"uint8"``: input ``x_q`` of the input integers (``q_in.quantize_tensor(x)``).
        weight_dtype: ``"uint8"`` (default): the weights stored as ``q_w + 128`` with zero point
            ``Z_w + 128`` (the same real values), which ONNX Runtime multiplies exactly on every
            CPU; ``"int8"``: quantlab's int8 weights as they are, the usual U8S8 format, which
            ONNX Runtime's AVX2 kernels (x86 without VNNI) multiply with ``vpmaddubsw``,
            saturating pairs of products to int16 (wrong integers, see notebook ``g_deploy``).
        opset: ONNX opset, 13 or later.
        allow_fixed_point: export fixed-point models anyway (see the module docstring).
    Returns:
        the ``onnx.ModelProto`` (checked by ``onnx.checker``). Outputs ``y`` (float32) and ``y_q``
        (uint8); metadata ``quantlab.multiplier`` and ``quantlab.requantization`` for
        :mod:`quantlab.engine`.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}; got {weight_dtype!r}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}; got {input_dtype!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13; got {opset!r}")
    net = _export_graph(model)
    g = Graph()
    x_in, x = _onnx_input(g, net, input_dtype)
    formulas, fixed = set(), set()
    values = {net.input_name: x}
    for step in net.steps:
        values[step.name] = _onnx_step(g, net, step, [values[n] for n in _refs(step.args)],
                                       formulas, fixed, allow_fixed_point, weight_dtype)
    onnx_model = _onnx_model(g, net, type(model).__name__, x_in, values[net.output_name], opset,
                             formulas, fixed)
    onnx.checker.check_model(onnx_model, full_check=True)
    if path is not None:            # atomically: never a truncated file under the final name
        write_atomically(path, lambda f: f.write(onnx_model.SerializeToString()))
    return onnx_model


def _export_graph(model) -> QuantizedNet:
    """The frozen graph to export: the model, or a one-layer graph around a frozen layer."""
    if isinstance(model, QuantizedNet):
        if not model.frozen:
            raise RuntimeError("model is not frozen: qnet.calibrate(train_loader); qnet.freeze()")
        net = model
    elif isinstance(model, (QConv2d, QConvBNReLU, QLinear)):
        had_name = "qname" in model.__dict__
        net = QuantizedNet([model], model.num_bits, model.q_w.axis is not None,
                           model.fixed_point, False)
        if not had_name:  # a one-layer graph for the export only: the layer keeps its own name
            del model.qname
    else:
        raise TypeError(f"model must be a frozen QuantizedNet, QConv2d, QConvBNReLU or QLinear; "
                        f"got {type(model).__name__}")
    _check_linear_inputs(net)
    first = next(net.layers[s.index] for s in net.steps if s.kind == "layer")
    if not isinstance(first, (QConv2d, QConvBNReLU, QLinear, QInput)):
        raise TypeError("the first layer must be a QConv2d, QConvBNReLU, QLinear or QInput")
    if not first.frozen:
        raise RuntimeError("model is not frozen: calibrate, then freeze() before to_onnx")
    return net


def _onnx_input(g: Graph, net: QuantizedNet, input_dtype: str):
    """The graph input (float images quantized by QuantizeLinear, or the input integers)."""
    first = next(net.layers[s.index] for s in net.steps if s.kind == "layer")
    shape = _input_shape(net, first)
    if input_dtype == "uint8":
        return helper.make_tensor_value_info("x_q", TensorProto.UINT8, shape), "x_q"
    q_in = net.q_in
    xs, xz = g.qparams("input", q_in)
    x = g.node("QuantizeLinear", ["x", xs, xz], "quantize_input")
    x = g.clip(x, q_in.quant_min, q_in.quant_max, "quantize_input")
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, shape), x


def _onnx_step(g: Graph, net: QuantizedNet, step, ins: list[str], formulas: set, fixed: set,
               allow_fixed_point: bool, weight_dtype: str) -> str:
    """The ONNX nodes of one step of the graph; returns the name of its output."""
    if step.kind == "alias":
        return ins[0]
    if step.kind == "shape":
        if step.fn is torch.flatten and tuple(step.args[1:]) in ((1,), (1, -1)):
            return g.node("Flatten", ins[:1], step.name, axis=1)
        raise TypeError(f"graph step {step.name} ({getattr(step.fn, '__name__', step.fn)}) has "
                        "no ONNX export: only flatten(x, 1) of the shape functions is exported")
    layer = net.layers[step.index]
    name = f"{type(layer).__name__.lower()}_{step.index}"
    if isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
        formulas.add(multiplier_formula(layer))
        fixed.add(bool(layer.fixed_point))
        return weighted_nodes(g, layer, ins[0], name, allow_fixed_point, weight_dtype)
    return layer_nodes(g, layer, ins, name)


def _onnx_model(g: Graph, net: QuantizedNet, model_name: str, x_in, x: str, opset: int,
                formulas: set, fixed: set) -> onnx.ModelProto:
    """The model: outputs ``y_q`` and ``y``, opsets, and the metadata quantlab.engine reads."""
    g.nodes.append(helper.make_node("Identity", [x], ["y_q"], name="output_integers"))
    ys, yz = g.qparams("output", net.q_out)
    g.nodes.append(helper.make_node("DequantizeLinear", ["y_q", ys, yz], ["y"], name="dequantize"))
    out_shape = _output_shape(net)
    graph = helper.make_graph(
        g.nodes, "quantlab_" + model_name, [x_in],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("y_q", TensorProto.UINT8, out_shape)], g.inits)
    opsets = [helper.make_opsetid("", opset)]
    if g.contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="quantlab")
    onnx_model.ir_version = min(onnx_model.ir_version, 8 if opset <= 17 else 10)
    if len(formulas) > 1:
        raise ValueError("the layers were frozen with different multiplier formulas: freeze the "
                         "model again with one of them")
    formula = "qnnpack" if "qnnpack" in formulas else "onnxruntime"
    helper.set_model_props(onnx_model, {META_MULTIPLIER: formula,
                                        META_REQUANTIZATION: "fixed_point" if True in fixed
                                        else "float"})
    onnx_model.doc_string = (
        f"quantlab integer model. quantlab requantized with the {formula} multiplier formula"
        + (" and fixed-point (Q31) requantization, which ONNX cannot express: ONNX Runtime "
           "requantizes in float" if True in fixed else "") + ".")
    return onnx_model


def _u8(qparam, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point uint8) of an unsigned <= 8-bit activation QParam."""
    if qparam.signed or qparam.quant_max > 255:
        raise ValueError(f"{what}: the .npz format holds uint8 activations; this QParam has "
                         f"range [{qparam.quant_min}, {qparam.quant_max}]")
    return (np.array(float(qparam.scale), np.float32),
            np.array(int(qparam.zero_point), np.uint8))


def _npz_weighted(layer, name: str) -> dict:
    if not layer.frozen:
        raise RuntimeError(f"{name} is not frozen: calibrate and freeze() before to_npz")
    if layer.num_bits > 8:
        raise ValueError(f"{name}: the .npz format holds 8-bit integers; num_bits is "
                         f"{layer.num_bits}")
    bias = layer.bias_int.to(torch.int64).numpy()
    if np.abs(bias).max(initial=0) > 2**31 - 1:
        raise ValueError(f"{name}: a bias does not fit int32")
    q_w, q_out = layer.q_w, layer.q_out
    per_channel = q_w.axis is not None
    x_scale, x_zp = _u8(layer.q_in, f"{name}'s input")
    y_scale, y_zp = _u8(q_out, f"{name}'s output")
    low = int(q_out.zero_point) if layer.relu else q_out.quant_min
    out = {"weight": layer.weight_int.to(torch.int64).numpy().astype(np.int8),
           "weight_scale": q_w.scale.numpy().astype(np.float32).reshape(-1 if per_channel else ()),
           "weight_zero_point": q_w.zero_point.numpy().astype(np.int8).reshape(
               -1 if per_channel else ()),
           "bias": bias.astype(np.int32), "x_scale": x_scale, "x_zero_point": x_zp,
           "y_scale": y_scale, "y_zero_point": y_zp,
           "y_range": np.array([max(low, q_out.quant_min), q_out.quant_max], np.uint8)}
    if not isinstance(layer, QLinear):
        c = layer.conv
        out.update(stride=np.array(c.stride, np.int64), padding=np.array(c.padding, np.int64),
                   dilation=np.array(c.dilation, np.int64), groups=np.array(c.groups, np.int64))
    return out


def to_npz(model, path: str | os.PathLike, *, input_dtype: str = "float32") -> dict:
    """Write a frozen QuantizedNet / QConv2d / QConvBNReLU / QLinear as integers and qparams.

    The format (keys, dtypes, shapes, version) is documented in :mod:`quantlab.npz`: per layer
    the int8 weights ``q_w``, int32 bias ``q_b``, the scales (float32) and zero points (uint8
    activations, int8 weights), the output clamp and the conv/pool geometry, plus the multiplier
    formula and the requantization (float or fixed point, which the ``.npz`` holds exactly, unlike
    ONNX). ``quantlab.engine.Engine(path)`` runs it with NumPy alone, with the integers of
    quantlab's ``integer_inference`` and of the ``.onnx`` export.

    Args:
        model: the frozen model or layer.
        path: the file to write (its name must end in ``.npz``, as the engine dispatches on it).
        input_dtype: ``"float32"`` (images, quantized with the input's qparams) or ``"uint8"``
            (the input integers).
    Returns:
        the ``{key: array}`` written.
    """
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}; got {input_dtype!r}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".npz"):
        raise ValueError(f"path must be a file name ending in .npz; got {path!r}")
    layers = _layers(model, "to_npz")
    first = layers[0]
    in_scale, in_zp = _u8(first.q_in, "the input")
    out_scale, out_zp = _u8(layers[-1].output_qparam, "the output")
    arrays = {"input_dtype": np.array(input_dtype), "input.scale": in_scale,
              "input.zero_point": in_zp,
              "input.range": np.array([first.q_in.quant_min, first.q_in.quant_max], np.uint8),
              "output.scale": out_scale, "output.zero_point": out_zp}
    kinds, formulas, fixed = [], set(), set()
    for i, layer in enumerate(layers):
        name = f"{type(layer).__name__.lower()}_{i}"
        if isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
            kinds.append("linear" if isinstance(layer, QLinear) else "conv")
            values = _npz_weighted(layer, name)
            formulas.add(multiplier_formula(layer))
            fixed.add(bool(layer.fixed_point))
        elif isinstance(layer, QMaxPool2d):
            k, s, p = layer.kernel_size, layer.stride or layer.kernel_size, layer.padding
            kinds.append("maxpool")
            values = {"kernel": np.array([k, k], np.int64), "stride": np.array([s, s], np.int64),
                      "padding": np.array([p, p], np.int64)}
        elif isinstance(layer, QFlatten):
            kinds.append("flatten")
            values = {}
        elif hasattr(layer, "integer_range"):     # a clamp: ReLU, ReLU6
            kinds.append("clip")
            values = {"range": np.array(layer.integer_range(), np.uint8)}
        else:
            raise TypeError(f"layer {i} ({type(layer).__name__}) has no .npz export")
        arrays.update({f"{i}.{k}": v for k, v in values.items()})
    if len(formulas) > 1 or len(fixed) > 1:
        raise ValueError("the layers were frozen with different multiplier formulas or "
                         "requantizations: freeze the model again with one of each")
    arrays.update(multiplier=np.array(formulas.pop()),
                  requantization=np.array("fixed_point" if fixed.pop() else "float"),
                  layers=np.array(kinds))
    write(path, arrays)
    return arrays


def _input_shape(net: QuantizedNet, first) -> list:
    if getattr(net, "input_shape", None) is not None:
        return ["N", *net.input_shape]
    if isinstance(first, QLinear):
        return ["N", first.fc.in_features]
    if isinstance(first, (QConv2d, QConvBNReLU)):
        return ["N", first.conv.in_channels, "H", "W"]
    return ["N", "C", "H", "W"]


def _output_shape(net: QuantizedNet) -> list:
    """The output's symbolic shape: (N, C) after a linear layer or a flatten, else (N, C, OH, OW)
    (aliases and clamps keep the rank of their input)."""
    names = {s.name: s for s in net.steps}
    step = names.get(net.output_name)
    while step is not None and (step.kind == "alias" or step.kind == "layer" and hasattr(
            net.layers[step.index], "integer_range")):
        step = names.get(_refs(step.args)[0])
    if step is not None and step.kind == "layer" and isinstance(net.layers[step.index],
                                                                (QLinear, QFlatten)):
        return ["N", "C"]
    if step is not None and step.kind == "shape":
        return ["N", "C"]
    return ["N", "C", "OH", "OW"]


