"""Exercises of lesson g (g_deploy): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="g_deploy",
    title="g · Exercises: a QLinearConv from an ONNX file, requantized as ONNX Runtime does (练习: 部署)",
    goal="Read the integers and qparams of a `QLinearConv` node from an ONNX file, requantize its accumulators "
         "exactly as ONNX Runtime does (its multiplier formula, rounding half to even, saturation), and put the "
         "two together: the node's output integers, checked against ONNX Runtime itself.",
    oracle="quantlab's ONNX reader and requantization, and ONNX Runtime itself",
    setup='''\
# setup: NumPy, onnx, torch (g3's convolution), and the checker
import numpy as np
import onnx
import torch

from quantlab import check''',
    exercises=[
        ex(1, "read_qlinearconv", "read a QLinearConv node's integers and qparams",
           r"""
           A `QLinearConv` node has the inputs `x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
           y_zero_point` and optionally a ninth, the int32 bias `B` (notebook g, section 1). Load the file at `path`
           with `onnx.load`, find the graph's first node whose `op_type` is `"QLinearConv"` (it need not be the first
           node), and return a dict with the keys `"x_scale", "x_zero_point", "w", "w_scale", "w_zero_point",
           "y_scale", "y_zero_point", "bias"`: the initializers those inputs name, as NumPy arrays with the dtypes the
           file stores (`onnx.numpy_helper.to_array`). Without a bias, `"bias"` is int32 zeros, one per output channel
           (`w.shape[0]`).""",
           '''
           def read_qlinearconv(path):
               """{name: NumPy array} of the first QLinearConv node's initializers (bias: int32 zeros if absent)."""''',
           '''
           model = onnx.load(path)
           consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
           node = next(n for n in model.graph.node if n.op_type == "QLinearConv")
           names = ["x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point", "bias"]
           out = {k: consts[i] for k, i in zip(names, node.input[1:]) if i}     # by the names the node gives
           out.setdefault("bias", np.zeros(out["w"].shape[0], np.int32))       # the bias is optional
           return out'''),
        ex(2, "onnxruntime_requantize", "requantize as ONNX Runtime's QLinearConv",
           r"""
           ONNX Runtime's multiplier, one per output channel $c$, is the float32 quotient
           $M_c = f_{32}\big(f_{32}(S_x S_{w,c}) / S_a\big)$ (not qnnpack's product with $f_{32}(1/S_a)$), and each output is
           $$ q_a = \mathrm{sat}\big(\mathrm{rne}(f_{32}(\mathrm{acc} + q_b) \cdot M_c) + Z_a\big) $$
           with the product in float32, rne rounding half to even (`np.rint`), and sat clamping to the range of
           `y_zero_point`'s dtype (uint8: 0..255, int8: -128..127). `acc` is an int32 array `(N, C, H, W)` of
           accumulators $\sum (q_x - Z_x)(q_w - Z_w)$, `bias` int32 `(C,)` (one per output channel, axis 1 of `acc`;
           $|\mathrm{acc} + q_b| < 2^{31}$), `x_scale`, `y_scale` float32 arrays of shape `()`, `w_scale` float32 `(C,)`
           or `()`, `y_zero_point` a uint8 or int8 array of shape `()`. Return an array of `y_zero_point`'s dtype and
           `acc`'s shape.""",
           '''
           def onnxruntime_requantize(acc, bias, x_scale, w_scale, y_scale, y_zero_point):
               """Output integers (y_zero_point's dtype) of int32 accumulators, as ONNX Runtime's QLinearConv."""''',
           '''
           m = ((x_scale * w_scale) / y_scale).reshape(1, -1, 1, 1)        # ONNX Runtime's M: the float32 quotient
           total = (acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.float32)   # acc + q_b, then float32
           y = np.rint(total * m) + int(y_zero_point)                      # float32 product, half to even
           info = np.iinfo(y_zero_point.dtype)
           return np.clip(y, info.min, info.max).astype(y_zero_point.dtype)  # saturate'''),
        ex(3, "qlinearconv", "the node's output integers",
           r"""
           Put g1 and g2 together: read the node of the file at `path` (g1) and its attributes (`strides`, `pads`,
           `group`; absent ones take ONNX's defaults 1, 0 and 1: read them with `onnx.helper.get_attribute_value`),
           compute the exact accumulators $\mathrm{acc} = \sum (q_x - Z_x)(q_w - Z_{w,c})$ of the uint8 input `q_x`
           `(N, C_in, H, W)`, and requantize them with g2. Padding is real 0, i.e. $q_x = Z_x$: pad *after*
           subtracting $Z_x$ (ONNX's `pads` are `[top, left, bottom, right]`). The integers are exact in float64, so
           `torch.nn.functional.conv2d` on float64 tensors may sum them. The check runs the same file in ONNX Runtime.""",
           '''
           def qlinearconv(path, q_x):
               """ONNX Runtime's output integers of the file's first QLinearConv node for the uint8 input q_x."""''',
           '''
           node = next(n for n in onnx.load(path).graph.node if n.op_type == "QLinearConv")
           attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
           p = read_qlinearconv(path)
           top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
           x = torch.from_numpy(q_x.astype(np.float64) - p["x_zero_point"].astype(np.float64))   # q_x - Z_x
           x = torch.nn.functional.pad(x, (left, right, top, bottom))                            # real 0 = Z_x
           w = p["w"].astype(np.float64) - p["w_zero_point"].astype(np.float64).reshape(-1, 1, 1, 1)
           acc = torch.nn.functional.conv2d(x, torch.from_numpy(w), stride=attrs.get("strides", [1, 1]),
                                            groups=attrs.get("group", 1))
           return onnxruntime_requantize(acc.numpy().astype(np.int32), p["bias"], p["x_scale"], p["w_scale"],
                                         p["y_scale"], p["y_zero_point"])'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('read_qlinearconv', 'out = {k: consts[i] for k, i in zip(names, node.input[1:]) if i}',
            'out = dict(zip(names, consts.values()))',
            'look each input up by the name', 'initializers in file order'),
    Mistake('read_qlinearconv', 'out.setdefault("bias", np.zeros(out["w"].shape[0], np.int32))',
            'pass',
            'bias is optional', 'missing bias not filled'),
    Mistake('read_qlinearconv', 'np.zeros(out["w"].shape[0], np.int32)',
            'np.zeros(out["w"].shape[0])',
            'int32 zeros', 'float64 zeros'),
    Mistake('read_qlinearconv', 'node = next(n for n in model.graph.node if n.op_type == "QLinearConv")',
            'node = model.graph.node[0]',
            'find the QLinearConv node by its op_type', 'first node taken'),
    Mistake('onnxruntime_requantize', '((x_scale * w_scale) / y_scale)',
            '((x_scale * w_scale) * (np.float32(1.0) / y_scale))',
            'ONNX Runtime divides by S_a', "qnnpack's multiplier"),
    Mistake('onnxruntime_requantize', '.astype(np.float32)   # acc + q_b',
            '.astype(np.float64)   # acc + q_b',
            'the product in float32', 'float64 product'),
    Mistake('onnxruntime_requantize', 'np.rint(total * m)',
            'np.floor(total * m + 0.5)',
            'half to even', 'ties rounded up'),
    Mistake('onnxruntime_requantize', 'return np.clip(y, info.min, info.max).astype(y_zero_point.dtype)',
            'return y.astype(y_zero_point.dtype)',
            'saturate', 'wraps instead of saturating'),
    Mistake('onnxruntime_requantize', 'info = np.iinfo(y_zero_point.dtype)',
            'info = np.iinfo(np.uint8)',
            "the range of y_zero_point's dtype", 'uint8 range for int8'),
    Mistake('onnxruntime_requantize', 'total = (acc.astype(np.int64) + bias.reshape(1, -1, 1, 1)).astype(np.float32)',
            'total = acc.astype(np.float32) + bias.reshape(1, -1, 1, 1).astype(np.float32)',
            'add the bias to the integer accumulator', 'bias added in float32'),
    Mistake('onnxruntime_requantize', 'bias.reshape(1, -1, 1, 1)).astype',
            'bias).astype',
            'one bias per output channel', 'bias along the wrong axis'),
    Mistake('qlinearconv', 'p["w_zero_point"].astype(np.float64).reshape(-1, 1, 1, 1)',
            'p["x_zero_point"].astype(np.float64)',
            'subtract the weights\' own zero point', 'Z_x subtracted from the weights'),
    Mistake('qlinearconv', 'w = p["w"].astype(np.float64) - p["w_zero_point"].astype(np.float64).reshape(-1, 1, 1, 1)',
            'w = (p["w"] - p["w_zero_point"].reshape(-1, 1, 1, 1)).astype(np.float64)',
            'wraps around in uint8', 'q_w - Z_w in uint8'),
    Mistake('qlinearconv', 'x = torch.nn.functional.pad(x, (left, right, top, bottom))',
            'x = torch.nn.functional.pad(x, (left, right, top, bottom), value=-float(p["x_zero_point"]))',
            'padding is real 0', 'padding with q_x = 0'),
    Mistake('qlinearconv', 'groups=attrs.get("group", 1))',
            'groups=1)',
            'group', 'group ignored'),
    Mistake('qlinearconv', 'stride=attrs.get("strides", [1, 1])',
            'stride=1',
            'strides', 'strides ignored'),
]
