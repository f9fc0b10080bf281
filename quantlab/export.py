"""Export a frozen quantlab model to ONNX in the QOperator format (QLinearConv and friends).

``to_onnx(model, path)`` writes a frozen :class:`~quantlab.models.QuantizedNet`, or a single frozen
``QConv2d`` / ``QConvBNReLU`` / ``QLinear``, as a standard ONNX graph (opset 13 by default):

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
from onnx import TensorProto, helper, numpy_helper

from .models import QuantizedNet
from .modules import (
    MULTIPLIER_FORMULAS,
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    QReLU,
    requantization_multiplier,
)
from .npz import write

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
    matches = [f for f in MULTIPLIER_FORMULAS if torch.equal(
        requantization_multiplier(layer.q_in.scale, layer.q_w.scale, layer.q_out.scale,
                                  f).expand_as(layer.multiplier), layer.multiplier)]
    if not matches:
        raise ValueError(f"{type(layer).__name__}'s multipliers match neither formula of "
                         f"{MULTIPLIER_FORMULAS}: freeze() it again")
    own = getattr(layer, "multiplier_formula", "qnnpack")
    return own if own in matches else matches[0]


class _Graph:
    """Collects nodes and initializers; names tensors uniquely."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, name: str, value, dtype) -> str:
        name = f"{name}_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.count += 1
        out = f"{name}_out" if name else f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or f"{op}_{self.count}",
                                           **attrs))
        return out

    def qparams(self, prefix: str, qparam) -> tuple[str, str]:
        """(scale, zero point) initializers of an unsigned 8-bit activation QParam."""
        if qparam.signed or qparam.quant_max > 255:
            raise ValueError(f"{prefix}: ONNX's QLinear operators take uint8 activations; this "
                             f"QParam has range [{qparam.quant_min}, {qparam.quant_max}]")
        return (self.const(f"{prefix}_scale", float(qparam.scale), np.float32),
                self.const(f"{prefix}_zero_point", int(qparam.zero_point), np.uint8))

    def clip(self, x: str, low: int, high: int, name: str) -> str:
        """A Clip node when [low, high] is narrower than uint8's [0, 255]."""
        if (low, high) == (0, 255):
            return x
        lo = self.const(f"{name}_min", low, np.uint8)
        hi = self.const(f"{name}_max", high, np.uint8)
        return self.node("Clip", [x, lo, hi], f"{name}_clip")


def _weighted(g: _Graph, layer, x: str, name: str, allow_fixed_point: bool,
              weight_dtype: str) -> str:
    if not layer.frozen:
        raise RuntimeError(f"{name} is not frozen: calibrate and freeze() before to_onnx")
    if layer.fixed_point and not allow_fixed_point:
        raise ValueError(
            f"{name} uses fixed-point requantization (Q31 multiplier and shift), which no ONNX "
            "operator expresses: ONNX Runtime's QLinearConv requantizes in float32. Freeze the "
            "model with fixed_point=False, or pass allow_fixed_point=True to export it anyway "
            "(the graph is marked; ONNX Runtime's integers may then differ by 1 LSB)")
    if layer.num_bits > 8:
        raise ValueError(f"{name}: ONNX's QLinearConv takes 8-bit integers; num_bits is "
                         f"{layer.num_bits}")
    q_w = layer.q_w
    w = layer.weight_int.to(torch.int64).numpy()
    if isinstance(layer, QLinear):  # (out, in) -> (out, in, 1, 1): a 1x1 conv on (N, in, 1, 1)
        w = w.reshape(w.shape[0], w.shape[1], 1, 1)
        x = g.node("Reshape", [x, g.const("fc_shape", [0, -1, 1, 1], np.int64)], f"{name}_reshape")
        attrs = dict(kernel_shape=[1, 1])
    else:
        c = layer.conv
        pad_h, pad_w = c.padding
        attrs = dict(kernel_shape=list(c.kernel_size), strides=list(c.stride),
                     pads=[pad_h, pad_w, pad_h, pad_w], dilations=list(c.dilation),
                     group=c.groups)
    xs, xz = g.qparams(f"{name}_x", layer.q_in)
    ys, yz = g.qparams(f"{name}_y", layer.q_out)
    per_channel = q_w.axis is not None
    w_scale = q_w.scale.numpy().astype(np.float32)
    w_zp = q_w.zero_point.numpy().astype(np.int64)
    if per_channel and np.any(w_zp != w_zp[0]):
        raise ValueError(f"{name}: ONNX Runtime needs one weight zero point for all channels "
                         "(symmetric per-channel weights)")
    if weight_dtype == "uint8":  # the same real weights: (q_w + 128) - (Z_w + 128) = q_w - Z_w
        w, w_zp = w + 128, w_zp + 128
    dt = np.uint8 if weight_dtype == "uint8" else np.int8
    inputs = [x, xs, xz, g.const(f"{name}_w", w, dt), g.const(f"{name}_w_scale", w_scale,
                                                                np.float32),
              g.const(f"{name}_w_zero_point", w_zp, dt), ys, yz,
              g.const(f"{name}_bias", layer.bias_int.numpy(), np.int32)]
    y = g.node("QLinearConv", inputs, name, **attrs)
    low = int(layer.q_out.zero_point) if layer.relu else layer.q_out.quant_min
    y = g.clip(y, max(low, layer.q_out.quant_min), layer.q_out.quant_max, name)
    if isinstance(layer, QLinear):
        y = g.node("Flatten", [y], f"{name}_flatten", axis=1)
    return y


def _layers(model, caller: str) -> list:
    """The layers of a frozen QuantizedNet, or ``[model]`` for a single frozen weighted layer."""
    if isinstance(model, QuantizedNet):
        if not model.frozen:
            raise RuntimeError("model is not frozen: qnet.calibrate(train_loader); qnet.freeze()")
        layers = list(model.layers)
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
        model: the frozen model or layer (``calibrate``, then ``freeze()``).
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
    layers = _layers(model, "to_onnx")
    first, last = layers[0], layers[-1]
    g = _Graph()
    ndim = 2 if isinstance(first, QLinear) else 4
    channels = first.fc.in_features if isinstance(first, QLinear) else first.conv.in_channels
    shape = ["N", channels] + (["H", "W"] if ndim == 4 else [])
    if input_dtype == "float32":
        x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
        xs, xz = g.qparams("input", first.q_in)
        x = g.node("QuantizeLinear", ["x", xs, xz], "quantize_input")
        x = g.clip(x, first.q_in.quant_min, first.q_in.quant_max, "quantize_input")
    else:
        x_in = helper.make_tensor_value_info("x_q", TensorProto.UINT8, shape)
        x = "x_q"
    formulas, fixed = set(), set()
    for i, layer in enumerate(layers):
        name = f"{type(layer).__name__.lower()}_{i}"
        if isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
            x = _weighted(g, layer, x, name, allow_fixed_point, weight_dtype)
            formulas.add(multiplier_formula(layer))
            fixed.add(bool(layer.fixed_point))
        elif isinstance(layer, QMaxPool2d):
            k = layer.kernel_size
            s = layer.stride or k
            p = layer.padding
            x = g.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
        elif isinstance(layer, QFlatten):
            x = g.node("Flatten", [x], name, axis=1)
        elif isinstance(layer, QReLU):  # max(q, Z): a clip at the zero point
            x = g.clip(x, int(layer.q_in.zero_point), layer.q_in.quant_max, name)
        else:
            raise TypeError(f"layer {i} ({type(layer).__name__}) has no ONNX export")
    out_q = last.output_qparam
    g.nodes.append(helper.make_node("Identity", [x], ["y_q"], name="output_integers"))
    ys, yz = g.qparams("output", out_q)
    g.nodes.append(helper.make_node("DequantizeLinear", ["y_q", ys, yz], ["y"], name="dequantize"))
    out_shape = ["N", "C"] + (["OH", "OW"] if isinstance(last, (QConv2d, QConvBNReLU)) else [])
    graph = helper.make_graph(
        g.nodes, "quantlab_" + type(model).__name__, [x_in],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("y_q", TensorProto.UINT8, out_shape)], g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="quantlab")
    onnx_model.ir_version = min(onnx_model.ir_version, 8 if opset <= 17 else 10)
    formula = "qnnpack" if "qnnpack" in formulas else "onnxruntime"
    if len(formulas) > 1:
        raise ValueError("the layers were frozen with different multiplier formulas: freeze the "
                         "model again with one of them")
    helper.set_model_props(onnx_model, {META_MULTIPLIER: formula,
                                        META_REQUANTIZATION: "fixed_point" if True in fixed
                                        else "float"})
    onnx_model.doc_string = (
        f"quantlab integer model. quantlab requantized with the {formula} multiplier formula"
        + (" and fixed-point (Q31) requantization, which ONNX cannot express: ONNX Runtime "
           "requantizes in float" if True in fixed else "") + ".")
    onnx.checker.check_model(onnx_model, full_check=True)
    if path is not None:
        onnx.save(onnx_model, os.fspath(path))
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
        elif isinstance(layer, QReLU):
            kinds.append("clip")
            values = {"range": np.array([int(layer.q_in.zero_point), layer.q_in.quant_max],
                                        np.uint8)}
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
