"""The checks of exercises/g_deploy.ipynb's exercises (exercises/g_exercises.ipynb): a QLinearConv node read
from an ONNX file, requantized as ONNX Runtime does (notebook g_deploy).

Oracles: quantlab's ONNX reader and NumPy kernels (``engine._onnx_graph``,
``engine_kernels.requantization_multiplier`` and the requantization of ``engine_kernels._Conv``), and ONNX
Runtime itself for the whole node (g3). The files are built here with the ``onnx`` package, in a temporary
folder of this process; only their paths and NumPy arrays cross to the learner's process. Weights are
uint8 in g3's files, so that no CPU's ONNX Runtime saturates u8 x s8 pairs (notebook g, section 1).
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile

import numpy as np
from hypothesis import strategies as st

from .common import Case, Exercise, Mismatch, floats32, show

KEYS = ("x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point", "bias")
_FOLDER: list[str] = []
_COUNT = itertools.count()


def _folder() -> str:
    if not _FOLDER:
        _FOLDER.append(tempfile.mkdtemp(prefix="quantlab_g_"))
        atexit.register(shutil.rmtree, _FOLDER[0], True)
    return _FOLDER[0]


def conv_file(x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None, *,
              shuffle=False, quantize_first=False, **attrs) -> str:
    """Write a one-QLinearConv ONNX model (opset 13, IR 8) and return its path. ``shuffle`` stores the
    initializers in another order than the node's inputs (with names that do not tell their role);
    ``quantize_first`` puts a QuantizeLinear (float input -> x) before the conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    values = [np.asarray(x_scale, np.float32), np.asarray(x_zero_point), np.asarray(w),
              np.asarray(w_scale, np.float32), np.asarray(w_zero_point), np.asarray(y_scale, np.float32),
              np.asarray(y_zero_point)] + ([np.asarray(bias, np.int32)] if bias is not None else [])
    names = [f"c{i}" for i in range(len(values))]
    inits = [numpy_helper.from_array(v, n) for v, n in zip(values, names)]
    if shuffle:
        inits = inits[::-1]
    x_type = helper.np_dtype_to_tensor_dtype(values[1].dtype)
    nodes = []
    if quantize_first:
        inits = [numpy_helper.from_array(np.asarray(0.5, np.float32), "in_scale"),
                 numpy_helper.from_array(values[1].copy(), "in_zero_point")] + inits
        nodes.append(helper.make_node("QuantizeLinear", ["x_float", "in_scale", "in_zero_point"], ["x"]))
        graph_in = helper.make_tensor_value_info("x_float", TensorProto.FLOAT, [None] * 4)
    else:
        graph_in = helper.make_tensor_value_info("x", x_type, [None] * 4)
    nodes.append(helper.make_node("QLinearConv", ["x"] + names, ["y"], **attrs))
    graph = helper.make_graph(nodes, "one_qlinearconv", [graph_in],
                              [helper.make_tensor_value_info("y", x_type, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = f"{_folder()}/conv_{next(_COUNT)}.onnx"
    onnx.save(model, path)
    return path


# -- g1 -------------------------------------------------------------------------------------------

def _read_oracle(path):
    from ..engine import _onnx_graph

    nodes, consts, _, _, _ = _onnx_graph(path)
    node = next(n for n in nodes if n.op_type == "QLinearConv")
    out = {k: consts[i] for k, i in zip(KEYS, node.input[1:]) if i}
    if "bias" not in out:
        out["bias"] = np.zeros(out["w"].shape[0], np.int32)
    return out


def _same_array(key, e, g) -> Mismatch | None:
    if not isinstance(g, (np.ndarray, np.generic)):
        return Mismatch(f"{key}: a NumPy array {show(e.tolist())}", f"{key}: a {type(g).__name__}",
                        "return NumPy arrays (onnx.numpy_helper.to_array)")
    g = np.asarray(g)
    if g.shape != e.shape or not np.array_equal(g.astype(np.float64), e.astype(np.float64)):
        return Mismatch(f"{key}: {e.tolist() if e.size <= 16 else e.shape}",
                        f"{key}: {g.tolist() if g.size <= 16 else g.shape}")
    if g.dtype != e.dtype:
        return Mismatch(f"{key}: dtype {e.dtype}", f"{key}: the right values as {g.dtype}",
                        f"keep {key}'s dtype as the file stores it ({e.dtype}): do not convert it")
    return None


def _g1():
    u8 = np.uint8
    w = np.array([[[[130, 120], [128, 140]]], [[[100, 200], [128, 128]]]], u8)
    base = dict(x_scale=0.02, x_zero_point=np.uint8(10), w=w, w_scale=[0.01, 0.03],
                w_zero_point=np.array([128, 127], u8), y_scale=0.05, y_zero_point=np.uint8(7))

    def cases():
        return [
            Case(dict(path=conv_file(**base, bias=[5, -7])), desc="2 output channels, a bias"),
            Case(dict(path=conv_file(**base, bias=[5, -7], shuffle=True)),
                 "look each input up by the name the node gives (node.input): the file may store its "
                 "initializers in any order", desc="a file whose initializers are stored in another order"),
            Case(dict(path=conv_file(**base)), "QLinearConv's ninth input, the bias, is optional",
                 desc="a QLinearConv without a bias"),
            Case(dict(path=conv_file(**base, bias=[1, 2], quantize_first=True)),
                 "find the QLinearConv node by its op_type: here a QuantizeLinear node comes first",
                 desc="a QuantizeLinear node, then the QLinearConv"),
            Case(dict(path=conv_file(0.1, np.int8(-3), w.astype(np.int16).clip(0, 127).astype(np.int8) - 64,
                                     0.02, np.int8(0), 0.3, np.int8(5), [0, 9])),
                 "int8 input, weights and zero points: keep the file's dtypes",
                 desc="int8 x, w, zero points, per-tensor weight scale"),
        ]

    def compare(e, g):
        if not isinstance(g, dict):
            return Mismatch(f"a dict with the keys {list(KEYS)}", show(g) if not isinstance(g, np.ndarray)
                            else "an array", "return a dict {name: NumPy array}")
        missing = [k for k in KEYS if k not in g]
        if missing == ["bias"]:
            return Mismatch("bias: " + str(e["bias"].tolist()), "no 'bias' key",
                            "QLinearConv's bias is optional: without it, return int32 zeros, one per output "
                            "channel")
        if missing:
            return Mismatch(f"the keys {list(KEYS)}", f"the keys {sorted(g)}")
        for k in KEYS:
            m = _same_array(k, e[k], g[k])
            if m is not None and m.hint and k == "bias" and not np.any(e["bias"]):
                m.hint = "a missing bias is int32 zeros, one per output channel"
            if m is not None:
                return m
        return None

    @st.composite
    def strat(draw):
        c_out, c_in, k = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        w = np.array(draw(st.lists(st.integers(0, 255), min_size=c_out * c_in * k * k,
                                   max_size=c_out * c_in * k * k)), np.uint8).reshape(c_out, c_in, k, k)
        bias = draw(st.one_of(st.none(), st.lists(st.integers(-1000, 1000), min_size=c_out, max_size=c_out)))
        path = conv_file(0.01, np.uint8(draw(st.integers(0, 255))), w, [0.02] * c_out,
                         np.full(c_out, draw(st.integers(0, 255)), np.uint8), 0.1,
                         np.uint8(draw(st.integers(0, 255))), bias, shuffle=draw(st.booleans()),
                         quantize_first=draw(st.booleans()))
        return Case(dict(path=path), desc=f"a random file: {c_out} output channels, bias "
                    f"{'absent' if bias is None else 'present'}")

    return Exercise("g", 1, "read_qlinearconv", _read_oracle, compare, cases, strat,
                    "the initializers the QLinearConv node's inputs 2..9 name, with the file's dtypes; "
                    "int32 zeros for a missing bias", max_examples=10)


# -- g2 -------------------------------------------------------------------------------------------

def _requantize_oracle(acc, bias, x_scale, w_scale, y_scale, y_zero_point):
    """quantlab's engine: ONNX Runtime's multiplier and the requantization of engine_kernels._Conv."""
    from ..engine_kernels import _Conv, requantization_multiplier

    c = acc.shape[1]
    conv = object.__new__(_Conv)
    conv.bias, conv.bias_in_acc, conv.fixed_point = np.asarray(bias).astype(np.int64), False, False
    conv.m = np.broadcast_to(requantization_multiplier(x_scale, w_scale, y_scale, "onnxruntime"),
                             (c,)).astype(np.float32)
    conv.z_y, conv.out_dtype = int(y_zero_point), np.asarray(y_zero_point).dtype
    return conv.requantize(acc.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)   # NHWC inside the engine


def _same_integers(e, g) -> Mismatch | None:
    if not isinstance(g, (np.ndarray, np.generic)):
        return Mismatch(f"a NumPy array {show(e.tolist())}", f"a {type(g).__name__}", "return a NumPy array")
    g = np.asarray(g)
    if g.shape != e.shape:
        return Mismatch(f"shape {e.shape}", f"shape {g.shape}")
    if g.dtype.kind not in "iu":
        return Mismatch(f"a {e.dtype} array", f"a {g.dtype} array", "return integers of y_zero_point's dtype")
    bad = g.astype(np.int64) != e.astype(np.int64)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        where = "" if e.size <= 16 else f" at index {list(i)} ({int(bad.sum())} of {bad.size} differ)"
        return Mismatch((str(e.tolist()) if e.size <= 16 else str(e[i])) + where,
                        (str(g.tolist()) if g.size <= 16 else str(g[i])) + where)
    if g.dtype != e.dtype:
        return Mismatch(f"a {e.dtype} array", f"the right values as {g.dtype}",
                        f"return y_zero_point's dtype ({e.dtype}): .astype(y_zero_point.dtype)")
    return None


def _g2():
    f32, i32 = np.float32, np.int32

    def case(acc, bias, sx, sw, sy, zy, hint="", desc=""):
        acc = np.asarray(acc, i32)
        if acc.ndim == 1:
            acc = acc.reshape(1, 1, 1, -1)
        return Case(dict(acc=acc, bias=np.asarray(bias, i32), x_scale=np.asarray(sx, f32),
                         w_scale=np.asarray(sw, f32), y_scale=np.asarray(sy, f32), y_zero_point=zy),
                    hint, desc)

    # E: ONNX Runtime's product is exactly the tie -21.5 (rne: -22); qnnpack's M gives -21.499998 -> -21
    # F: ONNX Runtime's float32 product is exactly -34.5 (-> -34); the float64 product is beyond it (-> -35)
    # G: 2**24 + 1 and the bias 1: f32(acc + q_b) = 2**24 + 2, f32(acc) + f32(q_b) = 2**24; M = 333 / 2**25
    cases = [
        case(np.array([[[[100, -200, 37]], [[5, 7, 9]], [[-50, 400, 1000]]]]), [10, -20, 30], 1.0,
             [0.25, 0.5, 0.125], 2.0, np.uint8(100),
             "one bias per output channel: bias[c] goes with acc[:, c] (axis 1), reshape it to (1, C, 1, 1)"),
        case([1, 3, 5, -1, -3, -5, 7], [0], 1.0, [0.5], 1.0, np.uint8(10),
             "exact ties (M = 0.5): rne rounds half to even (np.rint), not half up (floor(v + 0.5))"),
        case([1000, 2000, -1000, 100], [0], 1.0, [0.5], 1.0, np.uint8(20),
             "saturate: clamp to the dtype's range before converting (astype alone wraps around)"),
        case([-1000, -200, 100, 400], [3], 1.0, [0.5], 1.0, np.int8(-5),
             "y_zero_point is int8 here: saturate to the range of y_zero_point's dtype, -128..127"),
        case([-19699], [0], 0.00884225033223629, [0.001653925166465342], 0.013399370014667511, np.uint8(30),
             "ONNX Runtime divides by S_a: M = f32(f32(S_x S_w) / S_a); qnnpack's f32(S_x S_w) * "
             "f32(1 / S_a) differs in the last bit here and moves this tie"),
        case([-36542], [0], 0.014429419301450253, [0.0032622278667986393], 0.049858175218105316,
             np.uint8(40), "compute the product in float32, as ONNX Runtime: here it is exactly the tie "
             "-34.5; in float64 it lies beyond it"),
        case([2**24 + 1], [1], 1.0, [333 / 2**25], 1.0, np.uint8(0),
             "add the bias to the integer accumulator, then convert to float32 once: f32(acc) + f32(q_b) "
             "rounds twice (2**24 + 1 is not a float32)"),
        case(np.arange(-24, 24).reshape(2, 3, 2, 4) * 997, [7, -70, 700], 0.02, [0.003, 0.001, 0.002], 0.04,
             np.int8(3), "a batch of 2, 3 channels, 2 x 4 outputs each: the same formula everywhere"),
    ]

    @st.composite
    def strat(draw):
        n, c, h, w = (draw(st.integers(1, 3)) for _ in range(4))
        acc = np.array(draw(st.lists(st.integers(-2**20, 2**20), min_size=n * c * h * w,
                                     max_size=n * c * h * w)), i32).reshape(n, c, h, w)
        bias = draw(st.lists(st.integers(-2**20, 2**20), min_size=c, max_size=c))
        dt = draw(st.sampled_from([np.uint8, np.int8]))
        zy = dt(draw(st.integers(int(np.iinfo(dt).min), int(np.iinfo(dt).max))))
        sw = draw(st.lists(floats32(1e-4, 1e-1), min_size=c, max_size=c))
        return case(acc, bias, draw(floats32(1e-3, 1.0)), sw, draw(floats32(1e-2, 10.0)), zy)

    return Exercise("g", 2, "onnxruntime_requantize", _requantize_oracle, _same_integers, lambda: cases,
                    strat,
                    "M = f32(f32(S_x S_w) / S_a) per channel; q_a = sat(rne(f32(acc + q_b) * M) + Z_a) in "
                    "y_zero_point's dtype")


# -- g3 -------------------------------------------------------------------------------------------

def _run_onnxruntime(path, q_x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": q_x})[0]


def _g3():
    u8 = np.uint8
    rng = np.random.default_rng(0)

    def weights(c_out, c_in_g, k):
        return rng.integers(0, 256, (c_out, c_in_g, k, k)).astype(u8)

    def x(n, c, h, w, lo=0, hi=256):
        return rng.integers(lo, hi, (n, c, h, w)).astype(u8)

    def cases():
        w1 = weights(2, 1, 3)
        w_up = 128 + w1 // 2                              # every q_w >= Z_w = 128
        w_g = weights(4, 1, 3)
        return [
            Case(dict(path=conv_file(0.02, u8(128), w_up, [0.01, 0.02], np.array([128, 128], u8), 0.2, u8(10),
                                     [50, -50], kernel_shape=[3, 3]), q_x=x(1, 1, 5, 5)),
                 desc="2 output channels, 3x3, Z_x = Z_w = 128, no padding"),
            Case(dict(path=conv_file(0.02, u8(200), w_up, [0.01, 0.02], np.array([128, 128], u8), 0.2, u8(10),
                                     [50, -50], kernel_shape=[3, 3]), q_x=x(1, 1, 5, 5)),
                 "subtract the weights' own zero point Z_w[c] (one per output channel), not the input's Z_x",
                 desc="Z_x = 200, Z_w = 128"),
            Case(dict(path=conv_file(0.02, u8(3), w1, [0.01, 0.02], np.array([250, 5], u8), 0.5, u8(10),
                                     [50, -50], kernel_shape=[3, 3]), q_x=x(1, 1, 5, 5)),
                 "q_w - Z_w wraps around in uint8: convert to a wider type (float64) before subtracting",
                 desc="weights both sides of Z_w = 250 and 5"),
            Case(dict(path=conv_file(0.02, u8(90), w1, [0.01, 0.02], np.array([120, 130], u8), 0.5, u8(10),
                                     [50, -50], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), q_x=x(1, 1, 4, 4)),
                 "padding is real 0, i.e. q_x = Z_x: pad with 0 after subtracting Z_x",
                 desc="pads [1, 1, 1, 1], Z_x = 90"),
            Case(dict(path=conv_file(0.02, u8(7), w_g, [0.01] * 4, np.full(4, 128, u8), 0.3, u8(60),
                                     None, kernel_shape=[3, 3], group=2), q_x=x(2, 2, 5, 5)),
                 "the node's group attribute: each group of input channels feeds its own output channels "
                 "(groups= in conv2d)", desc="group = 2, 2 images"),
            Case(dict(path=conv_file(0.02, u8(7), w1, [0.01, 0.02], np.array([128, 128], u8), 0.5, u8(10),
                                     [50, -50], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 0]),
                      q_x=x(1, 1, 7, 6)),
                 "the node's strides attribute (and the pads' order [top, left, bottom, right])",
                 desc="strides [2, 2], pads [0, 1, 2, 0]"),
        ]

    @st.composite
    def strat(draw):
        group = draw(st.integers(1, 2))
        c_in, c_out = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 2))
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        pads = [draw(st.integers(0, 1)) for _ in range(4)]
        h, w_ = k + draw(st.integers(0, 3)), k + draw(st.integers(0, 3))
        seed = draw(st.integers(0, 2**31))
        g = np.random.default_rng(seed)
        w = g.integers(0, 256, (c_out, c_in // group, k, k)).astype(u8)
        z_w = g.integers(0, 256, c_out).astype(u8)
        bias = None if draw(st.booleans()) else g.integers(-5000, 5000, c_out)
        path = conv_file(draw(floats32(1e-3, 0.1)), u8(g.integers(0, 256)), w,
                         [draw(floats32(1e-3, 0.05)) for _ in range(c_out)], z_w,
                         draw(floats32(0.05, 2.0)), u8(g.integers(0, 256)), bias, kernel_shape=[k, k],
                         strides=[s, s], pads=pads, group=group)
        q_x = g.integers(0, 256, (draw(st.integers(1, 2)), c_in, h, w_)).astype(u8)
        return Case(dict(path=path, q_x=q_x), desc=f"a random QLinearConv: {c_in} -> {c_out} channels, "
                    f"{k}x{k}, stride {s}, pads {pads}, group {group}, q_x of shape {q_x.shape}")

    return Exercise("g", 3, "qlinearconv", _run_onnxruntime, _same_integers, cases, strat,
                    "read the node (g1) and its attributes, acc = conv of (q_x - Z_x) padded with 0 and "
                    "(q_w - Z_w[c]) with its strides and group, exact in float64; requantize with g2",
                    max_examples=10)


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_g1(), _g2(), _g3()]
