"""The ONNX nodes of each quantized layer, written by :func:`quantlab.export.to_onnx`.

``Graph`` collects nodes and initializers; ``weighted_nodes`` writes a conv or linear layer as a
``QLinearConv`` (+ ``Clip`` for a narrower fused ReLU/ReLU6); ``layer_nodes`` writes every other
layer (``MaxPool``, ``Flatten``, ``Clip`` for ReLU/ReLU6, and ONNX Runtime's ``com.microsoft``
``QLinearAdd``, ``QLinearConcat``, ``QLinear(Global)AveragePool``). The export's module docstring
says what each node holds, in quantlab's names. ``onnxruntime_layer`` runs one such layer alone in
ONNX Runtime on given input integers (notebook ``h_your_own_model`` compares each add with it).
Taught in notebook ``g_deploy``.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ._validate import check_int_tensor
from .modules import QFlatten, QLinear, QMaxPool2d, relu6_limit
from .ops import QAdd, QAvgPool2d, QCat, QInput

__all__ = ["Graph", "weighted_nodes", "layer_nodes", "onnxruntime_layer"]


class Graph:
    """Collects nodes and initializers; names tensors uniquely."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0
        self.contrib = False  # uses com.microsoft operators

    def contrib_node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """A node of ONNX Runtime's com.microsoft domain (QLinearAdd, QLinearConcat, ...)."""
        self.contrib = True
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, domain="com.microsoft",
                                           **attrs))
        return out

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


def weighted_nodes(g: Graph, layer, x: str, name: str, allow_fixed_point: bool,
                   weight_dtype: str) -> str:
    """The QLinearConv of a frozen conv or linear layer (a linear layer: a 1x1 conv on (N, C, 1, 1))."""
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
    high = layer.q_out.quant_max
    if layer.relu and layer.relu6:  # ReLU6: also the clip at relu6_limit, Z_y + rne(f32(6 f32(1/S_y)))
        high = min(high, relu6_limit(layer.q_out))
    y = g.clip(y, max(low, layer.q_out.quant_min), high, name)
    if isinstance(layer, QLinear):
        y = g.node("Flatten", [y], f"{name}_flatten", axis=1)
    return y



def layer_nodes(g: Graph, layer, ins: list[str], name: str) -> str:
    """The ONNX nodes of an unweighted layer of the graph."""
    x = ins[0]
    if isinstance(layer, QMaxPool2d):
        k = layer.kernel_size
        s = layer.stride or k
        p = layer.padding
        return g.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    if isinstance(layer, QFlatten):
        return g.node("Flatten", [x], name, axis=1)
    if hasattr(layer, "integer_range"):  # a clamp: ReLU max(q, Z), ReLU6 [Z, relu6_limit]
        return g.clip(x, *layer.integer_range(), name)
    if isinstance(layer, QInput):  # the input is already quantized with its q_in
        return x
    if isinstance(layer, QAdd):
        a_s, a_z = g.qparams(f"{name}_a", layer.q_in)
        b_s, b_z = g.qparams(f"{name}_b", layer.q_in_b)
        y_s, y_z = g.qparams(f"{name}_y", layer.q_out)
        y = g.contrib_node("QLinearAdd", [ins[0], a_s, a_z, ins[1], b_s, b_z, y_s, y_z], name)
        low = int(layer.q_out.zero_point) if layer.relu else layer.q_out.quant_min
        return g.clip(y, max(low, layer.q_out.quant_min), layer.q_out.quant_max, name)
    if isinstance(layer, QCat):
        y_s, y_z = g.qparams(f"{name}_y", layer.q_out)
        inputs = [y_s, y_z]
        for i, (x_i, q) in enumerate(zip(ins, layer.q_ins)):
            inputs += [x_i, *g.qparams(f"{name}_x{i}", q)]
        y = g.contrib_node("QLinearConcat", inputs, name, axis=layer.dim)
        return g.clip(y, layer.q_out.quant_min, layer.q_out.quant_max, name)
    if isinstance(layer, QAvgPool2d):
        s, z = g.qparams(name, layer.q_in)
        size = layer.output_size
        if size is not None:
            if size not in (1, (1, 1), [1, 1]):
                raise TypeError(f"{name}: adaptive average pooling to {size} has no ONNX "
                                "operator; only output_size 1 (QLinearGlobalAveragePool)")
            return g.contrib_node("QLinearGlobalAveragePool", [x, s, z, s, z], name,
                                  channels_last=0)
        k, st, p = (v if isinstance(v, (tuple, list)) else (v, v)
                    for v in (layer.kernel_size, layer.stride or layer.kernel_size,
                              layer.padding))
        return g.contrib_node("QLinearAveragePool", [x, s, z, s, z], name, kernel_shape=list(k),
                              strides=list(st), pads=[p[0], p[1], p[0], p[1]],
                              ceil_mode=int(layer.ceil_mode),
                              count_include_pad=int(layer.count_include_pad))
    raise TypeError(f"{name} ({type(layer).__name__}) has no ONNX export")


def onnxruntime_layer(layer, *q_inputs: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's output integers of one frozen ``QAdd``, ``QAvgPool2d`` or ``QCat`` run alone.

    The layer is written with the same nodes as in :func:`quantlab.export.to_onnx`
    (``QLinearAdd`` + ``Clip``, ``QLinear(Global)AveragePool``, ``QLinearConcat``) into a graph
    whose inputs are the given integers (uint8, as the export's), and run on ONNX Runtime's CPU
    provider, so a difference from ``layer.quantize_inference(*q_inputs)`` is this one operator's,
    not carried in from an earlier layer.

    Args:
        layer: a frozen ``QAdd`` (two inputs), ``QAvgPool2d`` (one) or ``QCat`` (one per branch).
        q_inputs: integer tensors in [0, 255], the layer's input integers.

    Returns:
        an int32 tensor of ONNX Runtime's output integers, shaped like quantlab's.
    """
    import onnxruntime as ort

    counts = {QAdd: 2, QAvgPool2d: 1}
    kind = next((k for k in (QAdd, QAvgPool2d, QCat) if isinstance(layer, k)), None)
    if kind is None:
        raise TypeError("layer must be a frozen QAdd, QAvgPool2d or QCat; got "
                        f"{type(layer).__name__}")
    if not layer.frozen:
        raise RuntimeError("layer is not frozen: calibrate and freeze() it first")
    expected = counts.get(kind, len(getattr(layer, "q_ins", ())))
    if len(q_inputs) != expected:
        raise ValueError(f"q_inputs must be {expected} tensor(s) for a {kind.__name__}; got "
                         f"{len(q_inputs)}")
    arrays = {}
    for i, q in enumerate(q_inputs):
        check_int_tensor(q, f"q_inputs[{i}]")
        if int(q.min()) < 0 or int(q.max()) > 255:
            raise ValueError(f"q_inputs[{i}] must hold integers in [0, 255] (uint8); got "
                             f"[{int(q.min())}, {int(q.max())}]")
        arrays[f"x{i}"] = q.numpy().astype(np.uint8)
    g = Graph()
    y = layer_nodes(g, layer, list(arrays), "layer")
    graph = helper.make_graph(
        g.nodes, "one_layer",
        [helper.make_tensor_value_info(n, onnx.TensorProto.UINT8, list(a.shape))
         for n, a in arrays.items()],
        [helper.make_tensor_value_info(y, onnx.TensorProto.UINT8, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, arrays)[0].astype(np.int32))
