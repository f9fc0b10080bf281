"""A NumPy-only integer engine for exported quantlab models (no torch anywhere in its imports).

``Engine("net.onnx")`` loads the ONNX file written by :func:`quantlab.export.to_onnx`, and
``Engine("net.npz")`` the integers and qparams written by :func:`quantlab.export.to_npz` (format in
:mod:`quantlab.npz`; rebuilt into the same graph, so both give the same integers), and runs it
with NumPy: ``engine(x)`` returns the graph's first output (the dequantized logits),
``engine.run(x)`` every output by name (``y_q`` holds the logit integers). It implements the
operators that file uses: QuantizeLinear, QLinearConv, MaxPool, Flatten, Reshape, Clip, Identity,
DequantizeLinear, and for graph models ONNX Runtime's com.microsoft QLinearAdd,
QLinearGlobalAveragePool, QLinearAveragePool and QLinearConcat, each computed as quantlab computes
it (qnnpack's integers: the fixed-point add, the integer window sum times ``f32(S_x/(S_y n))``, the
concatenation's ``rne(f32(S_x (q - Z_x)) * f32(1/S_y))``), not as ONNX Runtime rounds them.
``import quantlab.engine`` needs only numpy (quantlab's package ``__init__`` is lazy; onnx is
imported to read an ``.onnx`` file), so a deployed model runs where torch is not installed, and an
``.npz`` model where onnx is not either.

QLinearConv, as TFLite's reference ``integer_ops/conv.h`` (``acc`` exact, then requantize):

    acc = sum (q_x - Z_x)(q_w - Z_w) + q_b                     one output channel
    q_y = clamp(rne(f32(acc) * M) + Z_y)                        float requantization, or
    q_y = clamp(MultiplyByQuantizedMultiplier(acc, M0, shift) + Z_y)    fixed point (Q31)

with ``M`` computed from the scales as the file's metadata says (``quantlab.multiplier``: qnnpack's
``f32(f32(S_x*S_w) * f32(1/S_y))`` or ONNX Runtime's ``f32(f32(S_x*S_w) / S_y)``, the latter for
files without the note). The products are summed as an im2col matrix product on BLAS: in float32
when ``max_c sum_k |q_w - Z_w| * max|q_x - Z_x| < 2**24`` (every partial sum is then an integer that
float32 holds exactly, in any summation order, with or without FMA), else in float64 (exact below
2**53: any 8-bit layer with fewer than 1.3e11 products per output). The bias is added in float64,
exactly, unless the bound plus ``max|q_b|`` stays below 2**24. The fixed-point path converts the
exact sum to int64 and follows gemmlowp in int64 NumPy arithmetic.

A MaxPool right after a QLinearConv is applied to the accumulators before requantizing: the
requantization is non-decreasing per channel, so the integers are the same, at a quarter of the
requantization work. Activations are kept NHWC inside (contiguous channels for the matrix
products) and converted where the ONNX semantics need NCHW (Flatten, Reshape, graph outputs).
Taught in notebook ``g_deploy``.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from . import npz
from .engine_kernels import (  # noqa: F401  (quantlab.engine's API: the kernels it runs)
    FLOAT32_EXACT,
    FLOAT64_EXACT,
    INT32_MAX,
    INT32_MIN,
    _Conv,
    _max_pool,
    _nchw,
    _nhwc,
    _range,
    _windows,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantization_multiplier,
)

META_MULTIPLIER = "quantlab.multiplier"
META_REQUANTIZATION = "quantlab.requantization"
MULTIPLIERS, REQUANTIZATIONS = npz.MULTIPLIERS, npz.REQUANTIZATIONS


class Node(NamedTuple):
    """One operator of the graph (an ONNX NodeProto's fields, attributes as a dict)."""
    op_type: str
    name: str
    input: list
    output: list
    attrs: dict


def _onnx_graph(model):
    """(nodes, initializers, input names, output names, metadata) of an ONNX model or file."""
    import onnx  # only here: an .npz model runs without onnx installed
    from onnx import numpy_helper

    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if not os.path.isfile(name):
            raise ValueError(f"{name}: no such file")
        try:
            model = onnx.load(name)
        except Exception as e:  # protobuf's DecodeError, a truncated file
            raise ValueError(f"{name}: not a readable ONNX model (damaged or truncated? "
                             f"{type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be a path (.onnx or .npz) or an onnx.ModelProto; got "
                        f"{type(model).__name__}")
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    nodes = [Node(n.op_type, n.name, list(n.input), list(n.output),
                  {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
             for n in g.node]
    inputs = [i.name for i in g.input if i.name not in consts]
    meta = {p.key: p.value for p in model.metadata_props}
    for i in g.input:
        if i.name in inputs:
            t = i.type.tensor_type
            meta["input_shape"] = [d.dim_value if d.HasField("dim_value") else None
                                   for d in t.shape.dim] if t.HasField("shape") else None
    return nodes, consts, inputs, [o.name for o in g.output], meta


def _npz_graph(path):
    """The same, from a checked ``.npz`` file (quantlab.npz)."""
    arrays = npz.read(path)
    nodes, consts, x_in, outputs = npz.graph(arrays)
    meta = {META_MULTIPLIER: str(arrays["multiplier"]),
            META_REQUANTIZATION: str(arrays["requantization"]),
            "input_range": tuple(int(v) for v in arrays["input.range"])}
    return [Node(*n) for n in nodes], consts, [x_in], outputs, meta


class Engine:
    """Integer inference of an exported model with NumPy.

    Args:
        model: path of an ``.onnx`` file from :func:`quantlab.export.to_onnx` (or its
            ModelProto), or of an ``.npz`` file from :func:`quantlab.export.to_npz` (the name
            ends in ``.npz``; checked on load, ValueError naming the bad key).
        multiplier: ``"qnnpack"`` or ``"onnxruntime"``; None: the file's ``quantlab.multiplier``
            note, else ONNX Runtime's formula (what the ONNX standard runtime computes).
        requantization: ``"float"`` or ``"fixed_point"``; None: the file's note, else float.
        chunk_size: images per chunk (small chunks stay in the CPU caches).
    """

    OPS = ("QuantizeLinear", "QLinearConv", "MaxPool", "Flatten", "Reshape", "Clip", "Identity",
           "DequantizeLinear", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool",
           "QLinearConcat")

    def __init__(self, model, multiplier: str | None = None, requantization: str | None = None,
                 chunk_size: int = 256):
        if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".npz"):
            graph = _npz_graph(model)
        else:
            graph = _onnx_graph(model)
        self.nodes, self.consts, self.inputs, self.outputs, meta = graph
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
        self.multiplier = multiplier or meta.get(META_MULTIPLIER, "onnxruntime")
        self.requantization = requantization or meta.get(META_REQUANTIZATION, "float")
        if self.multiplier not in MULTIPLIERS:
            raise ValueError(f"multiplier must be one of {MULTIPLIERS}; got {self.multiplier!r}")
        if self.requantization not in REQUANTIZATIONS:
            raise ValueError(f"requantization must be one of {REQUANTIZATIONS}; got "
                             f"{self.requantization!r}")
        self.chunk_size = chunk_size
        if len(self.inputs) != 1:
            raise ValueError(f"the graph must have one input; it has {self.inputs}")
        first = next((n for n in self.nodes if self.inputs[0] in n.input), None)
        #: "float32" (images, quantized by the graph's QuantizeLinear) or "uint8" (integers)
        self.input_dtype = "float32" if first is not None and \
            first.op_type == "QuantizeLinear" else "uint8"
        #: the input's shape without the batch (None: a dimension the file does not fix)
        shape = meta.get("input_shape")
        self.input_shape = tuple(shape[1:]) if shape else None
        #: the integers a uint8 input may hold (the .npz file's input range)
        self.input_range = meta.get("input_range", (0, 255))
        consumers: dict[str, int] = {}
        for node in self.nodes:
            if node.op_type not in self.OPS:
                raise ValueError(f"operator {node.op_type} ({node.name}) is not supported by the "
                                 f"NumPy engine; supported: {self.OPS}")
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        self.convs = {n.output[0]: _Conv(n, self.consts, self.multiplier, self.requantization)
                      for n in self.nodes if n.op_type == "QLinearConv"}
        # a MaxPool that alone reads a conv's output pools that conv's accumulators
        self.fused = {}
        for node in self.nodes:
            src = node.input[0] if node.input else None
            if node.op_type == "MaxPool" and src in self.convs and consumers[src] == 1 \
                    and src not in self.outputs:
                self.fused[src] = node.output[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[self.outputs[0]]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on a batch (NCHW images or their integers); ``{output name: array}``."""
        x = self._check_input(x)
        try:
            parts = [self._run_chunk(x[i:i + self.chunk_size])
                     for i in range(0, x.shape[0], self.chunk_size)]
        except ValueError as e:  # NumPy's shape errors, deep in a layer
            if "shape" not in str(e) and "broadcast" not in str(e) and "reshape" not in str(e):
                raise
            raise ValueError(f"x of shape {x.shape} does not fit the model ({e})") from None
        return {name: np.concatenate([p[name] for p in parts]) for name in self.outputs}

    def _check_input(self, x) -> np.ndarray:
        """A batch (N, C, H, W) of what the model takes: finite float images, or integers in the
        input's range (as ``QuantizedNet.integer_inference`` requires), of the file's shape."""
        want = "float32 images" if self.input_dtype == "float32" else \
            f"integers in [{self.input_range[0]}, {self.input_range[1]}]"
        try:
            x = np.asarray(x)
        except Exception as e:
            raise TypeError(f"x must be an array of {want}; got {type(x).__name__}") from e
        if x.dtype.kind not in "fiu" or x.dtype == np.float16 and self.input_dtype == "uint8":
            raise TypeError(f"x must be an array of {want}; got dtype {x.dtype}")
        if x.ndim not in (2, 4) or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, C, H, W), or (N, features) for a "
                             f"model that starts with a Linear; got shape {x.shape}")
        if self.input_shape is not None and (len(self.input_shape) != x.ndim - 1 or any(
                w is not None and d != w for d, w in zip(x.shape[1:], self.input_shape))):
            shape = ", ".join("?" if w is None else str(w) for w in self.input_shape)
            raise ValueError(f"x must have shape (N, {shape}); got {x.shape}")
        if self.input_dtype == "float32":
            if x.dtype.kind != "f":
                raise TypeError(f"x must be {want} (this model quantizes its input); got dtype "
                                f"{x.dtype}: pass images, or export with input_dtype='uint8'")
            if not np.isfinite(x).all():
                raise ValueError("x must hold only finite values (no NaN or inf)")
            return x
        if x.dtype.kind == "f":
            raise TypeError(f"x must be {want} (this model takes the input's integers); got "
                            f"dtype {x.dtype}")
        lo, hi = self.input_range
        if x.min() < lo or x.max() > hi:
            raise ValueError(f"x must hold {want}; got values from {x.min()} to {x.max()}")
        return x.astype(np.uint8)

    def _run_chunk(self, x: np.ndarray) -> dict[str, np.ndarray]:
        env = dict(self.consts)
        env[self.inputs[0]] = _nhwc(x)
        for node in self.nodes:
            out = node.output[0]
            if node.op_type == "MaxPool" and node.input[0] in self.fused:
                conv = self.convs[node.input[0]]
                env[out] = conv.requantize(self._pool(node, env[node.input[0]], -np.inf))
                continue
            args = [env[n] if n else None for n in node.input]
            if node.op_type == "QLinearConv":
                acc = self.convs[out].accumulate(args[0])
                env[out] = acc if out in self.fused else self.convs[out].requantize(acc)
            else:
                env[out] = getattr(self, "_" + node.op_type)(node, *args)
        return {name: _nchw(env[name]) for name in self.outputs}

    # -- the element-wise and shape operators (ONNX semantics) ---------------------------------
    def _QuantizeLinear(self, node, x, scale, zero_point=None):
        if np.ndim(scale) != 0:
            raise ValueError(f"{node.name}: only per-tensor QuantizeLinear is supported")
        zp = np.uint8(0) if zero_point is None else zero_point
        lo, hi = _range(zp.dtype)  # ONNX: saturate(rne(x / scale) + zero_point), in float32
        q = np.rint(x.astype(np.float32) / np.float32(scale)) + np.float32(zp)
        return np.clip(q, lo, hi).astype(zp.dtype)

    def _DequantizeLinear(self, node, q, scale, zero_point=None):
        if np.ndim(scale) != 0:
            raise ValueError(f"{node.name}: only per-tensor DequantizeLinear is supported")
        zp = 0 if zero_point is None else int(zero_point)
        return (q.astype(np.int32) - zp).astype(np.float32) * np.float32(scale)

    def _Clip(self, node, x, low=None, high=None):
        lo, hi = _range(x.dtype)
        return np.clip(x, lo if low is None else low, hi if high is None else high)

    def _Identity(self, node, x):
        return x

    def _pool(self, node, x, fill):
        a = node.attrs
        if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", (1, 1))):
            raise ValueError(f"{node.name}: MaxPool with ceil_mode or dilations is not supported")
        kernel = tuple(a["kernel_shape"])
        return _max_pool(x, kernel, tuple(a.get("strides", kernel)),
                         tuple(a.get("pads", (0, 0, 0, 0))), fill)

    def _MaxPool(self, node, x):
        return self._pool(node, x, _range(x.dtype)[0])

    def _Flatten(self, node, x):
        axis = node.attrs.get("axis", 1)
        x = _nchw(x)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)

    def _Reshape(self, node, x, shape):
        x = _nchw(x)
        shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)]
        return _nhwc(x.reshape(shape))

    # -- the com.microsoft operators of graph models, with quantlab's (qnnpack's) integers ---------
    def _QLinearAdd(self, node, a, s_a, z_a, b, s_b, z_b, s_y, z_y):
        """``Z_y + RoundingDivideByPOT(m_a (q_a - Z_a) + m_b (q_b - Z_b), shift)`` (qnnpack's q8vadd;
        quantlab.ops.quantized_add): both multipliers on one shift, the larger in [2**21, 2**22)."""
        m_a, m_b = np.float32(s_a) / np.float32(s_y), np.float32(s_b) / np.float32(s_y)
        shift = 21 - (math.frexp(float(max(m_a, m_b)))[1] - 1)
        scale = np.float32(2.0**shift)
        qm_a, qm_b = int(np.rint(m_a * scale)), int(np.rint(m_b * scale))
        acc = (a.astype(np.int64) - int(z_a)) * qm_a + (b.astype(np.int64) - int(z_b)) * qm_b
        y = (acc + ((1 << (shift - 1)) - (acc < 0))) >> shift     # round half away from zero
        lo, hi = _range(z_y.dtype)
        return np.clip(y + int(z_y), lo, hi).astype(z_y.dtype)

    @staticmethod
    def _average(sums: np.ndarray, counts, s_x, s_y, z_y) -> np.ndarray:
        """``Z_y + rne(f32(sum) * f32(S_x / f32(S_y * n)))`` (quantlab.ops.avg_pool_requantize)."""
        m = np.float32(s_x) / (np.float32(s_y) * np.asarray(counts, dtype=np.float32))
        y = np.rint(sums.astype(np.float32) * m) + np.float32(z_y)
        lo, hi = _range(z_y.dtype)
        return np.clip(y, lo, hi).astype(z_y.dtype)

    def _QLinearGlobalAveragePool(self, node, x, s_x, z_x, s_y, z_y):
        if node.attrs.get("channels_last", 0) or x.ndim != 4:
            raise ValueError(f"{node.name}: QLinearGlobalAveragePool needs NCHW input")
        sums = (x.astype(np.int64) - int(z_x)).sum(axis=(1, 2), keepdims=True)  # NHWC inside
        return self._average(sums, x.shape[1] * x.shape[2], s_x, s_y, z_y)

    def _QLinearAveragePool(self, node, x, s_x, z_x, s_y, z_y):
        a = node.attrs
        if a.get("ceil_mode", 0) or a.get("channels_last", 0) or \
                a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"{node.name}: QLinearAveragePool with ceil_mode, channels_last or "
                             "auto_pad is not supported")
        kernel = tuple(a["kernel_shape"])
        strides, pads = tuple(a.get("strides", kernel)), tuple(a.get("pads", (0, 0, 0, 0)))
        xi = x.astype(np.int64) - int(z_x)            # padding is real 0: 0 after subtracting Z
        ones = np.ones((1,) + x.shape[1:3] + (1,), np.int64)
        if any(pads):
            widths = ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0))
            xi, ones = np.pad(xi, widths), np.pad(ones, widths)
        sums = _windows(xi, kernel, strides, (1, 1)).sum(axis=(4, 5))
        if a.get("count_include_pad", 0):
            counts = kernel[0] * kernel[1]
        else:
            counts = _windows(ones, kernel, strides, (1, 1)).sum(axis=(4, 5))
        return self._average(sums, counts, s_x, s_y, z_y)

    def _QLinearConcat(self, node, s_y, z_y, *inputs):
        """Each input onto the output grid: ``Z_y + rne(f32(S_x (q_x - Z_x)) * f32(1/S_y))``
        (quantlab.ops.requantize_to, as PyTorch's quantized cat), then concatenated."""
        axis = node.attrs["axis"]
        inv = np.float32(1.0) / np.float32(s_y)
        lo, hi = _range(z_y.dtype)
        parts = []
        for x, s_x, z_x in zip(inputs[0::3], inputs[1::3], inputs[2::3]):
            r = (x.astype(np.int64) - int(z_x)).astype(np.float32) * np.float32(s_x)
            parts.append(np.clip(np.rint(r * inv) + np.float32(z_y), lo, hi).astype(z_y.dtype))
        if parts[0].ndim == 4:  # NHWC inside: the ONNX (NCHW) axis moves
            axis = {0: 0, 1: 3, 2: 1, 3: 2}[axis % 4]
        return np.concatenate(parts, axis=axis)
