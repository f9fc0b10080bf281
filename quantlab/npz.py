"""The ``.npz`` format of an integer model: integers and qparams any NumPy reads (no torch, no onnx).

:func:`quantlab.export.to_npz` writes it from a frozen ``QuantizedNet`` / ``QConv2d`` /
``QConvBNReLU`` / ``QLinear``; ``quantlab.engine.Engine("net.npz")`` runs it, bit-identical with
the ``.onnx`` file of the same model (:func:`graph` rebuilds the very nodes ``to_onnx`` writes) and
with quantlab's ``integer_inference``. The file is ``np.savez_compressed`` (no pickled objects):
strings are 0-d unicode arrays, ``C`` below is the layer's number of output channels.

Version 1, global keys:

=================  =======  =======  ========================================================
key                dtype    shape    meaning
=================  =======  =======  ========================================================
format             str      ()       ``"quantlab-integer-model"``
version            int64    ()       ``1``
multiplier         str      ()       ``"qnnpack"``: ``M = f32(f32(S_x*S_w) * f32(1/S_y))``;
                                     ``"onnxruntime"``: ``M = f32(f32(S_x*S_w) / S_y)``
requantization     str      ()       ``"float"``: ``rne(f32(acc) * M)``; ``"fixed_point"``:
                                     TFLite's ``MultiplyByQuantizedMultiplier`` (Q31 ``M``)
input_dtype        str      ()       ``"float32"``: images, quantized ``clamp(rne(x / S) + Z)``;
                                     ``"uint8"``: the input integers themselves
input.scale        float32  ()       ``S`` of the input
input.zero_point   uint8    ()       ``Z`` of the input
input.range        uint8    (2,)     ``[quant_min, quant_max]`` of the input integers
output.scale       float32  ()       the logits' ``S``: ``y = S * (y_q - Z)``
output.zero_point  uint8    ()       the logits' ``Z``
layers             str      (L,)     the layer kinds in order: conv, linear, maxpool, flatten, clip
=================  =======  =======  ========================================================

Layer ``i`` (keys ``"{i}.{name}"``; activations are NCHW, as in PyTorch):

- ``conv`` and ``linear``: ``weight`` int8, (C, C_in/groups, kh, kw) or (C, in_features): ``q_w``;
  ``weight_scale`` float32 and ``weight_zero_point`` int8, () per tensor or (C,) per channel;
  ``bias`` int32 (C,) (scale ``S_x * S_w``, zero point 0); ``x_scale``, ``y_scale`` float32 ();
  ``x_zero_point``, ``y_zero_point`` uint8 (); ``y_range`` uint8 (2,): the output clamp (a fused ReLU
  is ``[Z_y, quant_max]``). ``conv`` also: ``stride``, ``padding``, ``dilation`` int64 (2,) and
  ``groups`` int64 (). Computed as ``y_q = clamp(requantize(sum (q_x - Z_x)(q_w - Z_w) + q_b)
  + Z_y, *y_range)``, the padding being ``q_x = Z_x``.
- ``maxpool``: ``kernel``, ``stride``, ``padding`` int64 (2,) (padding counts as -inf).
- ``flatten``: no keys (``(N, C, H, W) -> (N, C*H*W)``).
- ``clip``: ``range`` uint8 (2,) (a ReLU on its own is ``[Z, quant_max]``).

:func:`read` checks everything above and raises ``ValueError`` naming the file and the first bad
key (missing, unexpected, wrong dtype or shape, a non-positive scale, an empty range, a newer
version, a member whose CRC fails).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
import zlib

import numpy as np

FORMAT, VERSION = "quantlab-integer-model", 1
MULTIPLIERS = ("qnnpack", "onnxruntime")
REQUANTIZATIONS = ("float", "fixed_point")
INPUT_DTYPES = ("float32", "uint8")

_QPARAMS = {"weight_scale": (np.float32, [(), ("C",)]),
            "weight_zero_point": (np.int8, [(), ("C",)]),
            "bias": (np.int32, [("C",)]),
            "x_scale": (np.float32, [()]), "x_zero_point": (np.uint8, [()]),
            "y_scale": (np.float32, [()]), "y_zero_point": (np.uint8, [()]),
            "y_range": (np.uint8, [(2,)])}
_PAIR = (np.int64, [(2,)])
#: every layer kind's keys: (dtype, accepted shapes); a str in a shape is a size named once
LAYERS = {
    "conv": {"weight": (np.int8, [("C", "C_in/groups", "kh", "kw")]), **_QPARAMS,
             "stride": _PAIR, "padding": _PAIR, "dilation": _PAIR, "groups": (np.int64, [()])},
    "linear": {"weight": (np.int8, [("C", "in_features")]), **_QPARAMS},
    "maxpool": {"kernel": _PAIR, "stride": _PAIR, "padding": _PAIR},
    "flatten": {},
    "clip": {"range": (np.uint8, [(2,)])},
}
GLOBALS = {"format": (np.str_, [()]), "version": (np.int64, [()]),
           "multiplier": (np.str_, [()]), "requantization": (np.str_, [()]),
           "input_dtype": (np.str_, [()]),
           "input.scale": (np.float32, [()]), "input.zero_point": (np.uint8, [()]),
           "input.range": (np.uint8, [(2,)]),
           "output.scale": (np.float32, [()]), "output.zero_point": (np.uint8, [()]),
           "layers": (np.str_, [("L",)])}


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    return os.fspath(path)


def write_atomically(path, write_to) -> None:
    """Call ``write_to(file_object)`` on a temporary file beside ``path``, then rename it to
    ``path``: an interrupted or failed write never leaves a truncated file under the final name
    (``os.replace`` is atomic on one file system)."""
    name = _check_path(path)
    if not callable(write_to):
        raise TypeError(f"write_to must be a function of a file object; got {type(write_to).__name__}")
    folder = os.path.dirname(os.path.abspath(name))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(name), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_to(f)
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write(path, arrays: dict) -> None:
    """Check ``arrays`` (the keys above, without format and version) and save them to ``path``
    (atomically: see :func:`write_atomically`)."""
    _check_path(path)
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of NumPy arrays; got {type(arrays).__name__}")
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION, np.int64), **arrays}
    _check(arrays, os.fspath(path))
    # a file object: np.savez would append ".npz" to a str path
    write_atomically(path, lambda f: np.savez_compressed(f, **arrays))


def read(path) -> dict:
    """Load and check a version-1 file: ``{key: array}`` (raises ValueError naming the bad key)."""
    name = _check_path(path)
    if not os.path.isfile(name):
        raise ValueError(f"{name}: no such file")
    if not zipfile.is_zipfile(name):
        raise ValueError(f"{name}: not an .npz file (not a zip archive; truncated or corrupt?)")
    try:
        with np.load(name, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{name}: unreadable .npz ({type(e).__name__}: {e})") from None
    _check(arrays, name)
    return arrays


def _check_key(arrays, key, dtype, shapes, sizes, name):
    if key not in arrays:
        raise ValueError(f"{name}: key {key!r} is missing")
    a = arrays[key]
    ok = a.dtype.kind == "U" if dtype is np.str_ else a.dtype == dtype
    if not ok:
        want = "str" if dtype is np.str_ else np.dtype(dtype).name
        raise ValueError(f"{name}: key {key!r} must be {want}; got {a.dtype}")
    for shape in shapes:
        if len(shape) == a.ndim and all(isinstance(s, str) and sizes.get(s, n) == n or s == n
                                        for s, n in zip(shape, a.shape)):
            sizes.update({s: n for s, n in zip(shape, a.shape) if isinstance(s, str)})
            return a
    want = " or ".join(str(tuple(sizes.get(s, s) for s in shape)) for shape in shapes)
    raise ValueError(f"{name}: key {key!r} must have shape {want}; got {a.shape}")


def _check_choice(value, key, choices, name):
    if str(value) not in choices:
        raise ValueError(f"{name}: key {key!r} must be one of {choices}; got {str(value)!r}")


#: the scales a file may hold: normal float32 (a denormal one has an infinite reciprocal) and
#: small enough that the product of two of them, S_x S_w, stays a finite float32
SCALE_RANGE = (1.1754943508222875e-38, 1e19)


def _check_positive(arrays, key, name, low=1):
    a = arrays[key]
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a < SCALE_RANGE[0]) | (a > SCALE_RANGE[1])
        want = f"finite, in [{SCALE_RANGE[0]:.4g}, {SCALE_RANGE[1]:g}] (a normal float32 scale)"
    else:
        bad, want = a < low, f">= {low}"
    if np.any(bad):
        raise ValueError(f"{name}: key {key!r} must be {want}; got {a.tolist()}")


def _check_chain(arrays, kinds, name) -> None:
    """Each conv/linear layer's input qparams must be those of the tensor it reads: the model's
    input for the first, else the previous conv/linear layer's output (max-pool, flatten and clip
    keep their input's qparams); the model's output qparams are the last layer's."""
    scale, zp, where = arrays["input.scale"], arrays["input.zero_point"], "'input.scale'"
    for i, kind in enumerate(kinds):
        if kind not in ("conv", "linear"):
            continue
        p = f"{i}."
        if arrays[p + "x_scale"] != scale or arrays[p + "x_zero_point"] != zp:
            raise ValueError(f"{name}: keys {p + 'x_scale'!r}/{p + 'x_zero_point'!r} "
                             f"({float(arrays[p + 'x_scale'])}, {int(arrays[p + 'x_zero_point'])}) "
                             f"must equal the qparams of the tensor the layer reads, {where} "
                             f"({float(scale)}, {int(zp)})")
        scale, zp, where = arrays[p + "y_scale"], arrays[p + "y_zero_point"], repr(p + "y_scale")
    if arrays["output.scale"] != scale or arrays["output.zero_point"] != zp:
        raise ValueError(f"{name}: keys 'output.scale'/'output.zero_point' must equal the last "
                         f"layer's output qparams, {where}")


def _check_range(arrays, key, name):
    low, high = arrays[key].tolist()
    if low > high:
        raise ValueError(f"{name}: key {key!r} must be [low, high] with low <= high; got "
                         f"{[low, high]}")


def _check(arrays: dict, name: str) -> None:
    sizes: dict = {}
    if "format" not in arrays or arrays["format"].dtype.kind != "U" \
            or str(arrays["format"]) != FORMAT:
        raise ValueError(f"{name}: not a quantlab integer model (key 'format' must be "
                         f"{FORMAT!r})")
    version = _check_key(arrays, "version", *GLOBALS["version"], sizes, name)
    if int(version) != VERSION:
        raise ValueError(f"{name}: format version {int(version)}; this quantlab reads version "
                         f"{VERSION} (key 'version')")
    for key, (dtype, shapes) in GLOBALS.items():
        _check_key(arrays, key, dtype, shapes, sizes, name)
    _check_choice(arrays["multiplier"], "multiplier", MULTIPLIERS, name)
    _check_choice(arrays["requantization"], "requantization", REQUANTIZATIONS, name)
    _check_choice(arrays["input_dtype"], "input_dtype", INPUT_DTYPES, name)
    for key in ("input.scale", "output.scale"):
        _check_positive(arrays, key, name)
    _check_range(arrays, "input.range", name)
    expected = set(GLOBALS)
    kinds = [str(k) for k in arrays["layers"]]
    if not kinds:
        raise ValueError(f"{name}: key 'layers' lists no layer")
    for i, kind in enumerate(kinds):
        _check_choice(kind, f"layers[{i}]", tuple(LAYERS), name)
        sizes = {}
        for key, (dtype, shapes) in LAYERS[kind].items():
            _check_key(arrays, f"{i}.{key}", dtype, shapes, sizes, name)
            expected.add(f"{i}.{key}")
        p = f"{i}."
        for key in ("weight_scale", "x_scale", "y_scale", "stride", "dilation", "groups", "kernel"):
            if p + key in arrays and key in LAYERS[kind]:
                _check_positive(arrays, p + key, name)
        for key in ("y_range", "range"):
            if key in LAYERS[kind]:
                _check_range(arrays, p + key, name)
        if kind == "conv" and sizes["C"] % int(arrays[p + "groups"]):
            raise ValueError(f"{name}: key {p + 'groups'!r} ({int(arrays[p + 'groups'])}) must "
                             f"divide the {sizes['C']} output channels of {p + 'weight'!r}")
        if kind in ("conv", "maxpool") and np.any(arrays[p + "padding"] < 0):
            raise ValueError(f"{name}: key {p + 'padding'!r} must be >= 0; got "
                             f"{arrays[p + 'padding'].tolist()}")
        if kind == "maxpool" and np.any(arrays[p + "padding"] > arrays[p + "kernel"] // 2):
            raise ValueError(f"{name}: key {p + 'padding'!r} must be <= kernel // 2; got "
                             f"{arrays[p + 'padding'].tolist()}")
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise ValueError(f"{name}: unexpected key {unexpected[0]!r} (layers: {kinds})")
    _check_chain(arrays, kinds, name)


def graph(arrays: dict):
    """The ONNX graph ``to_onnx`` writes for the same model, as plain data for the engine.

    Returns:
        ``(nodes, consts, input name, output names)``, each node ``(op_type, name, inputs,
        outputs, attributes)`` with ONNX's operators and attribute names.
    """
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be the dict npz.read returns; got {type(arrays).__name__}")
    nodes, consts = [], {}

    def const(name, value):
        consts[name] = np.asarray(value)
        return name

    def node(op, inputs, name, **attrs):
        nodes.append((op, name, inputs, [name + "_out"], attrs))
        return name + "_out"

    def clip(x, rng, name):
        if tuple(rng.tolist()) == (0, 255):
            return x
        return node("Clip", [x, const(name + "_min", rng[0]), const(name + "_max", rng[1])],
                    name + "_clip")

    a = arrays
    if str(a["input_dtype"]) == "float32":
        x_in = "x"
        x = node("QuantizeLinear", [x_in, const("input_scale", a["input.scale"]),
                                    const("input_zero_point", a["input.zero_point"])],
                 "quantize_input")
        x = clip(x, a["input.range"], "quantize_input")
    else:
        x_in = x = "x_q"
    for i, kind in enumerate(str(k) for k in a["layers"]):
        p, name = f"{i}.", f"{kind}_{i}"
        if kind in ("conv", "linear"):
            w = a[p + "weight"]
            if kind == "linear":
                w = w.reshape(*w.shape, 1, 1)
                x = node("Reshape", [x, const(name + "_shape", np.array([0, -1, 1, 1]))],
                         name + "_reshape")
                attrs = dict(kernel_shape=[1, 1])
            else:
                (ph, pw) = a[p + "padding"].tolist()
                attrs = dict(kernel_shape=list(w.shape[2:]), strides=a[p + "stride"].tolist(),
                             pads=[ph, pw, ph, pw], dilations=a[p + "dilation"].tolist(),
                             group=int(a[p + "groups"]))
            inputs = [x] + [const(name + "_" + k, w if k == "weight" else a[p + k])
                            for k in ("x_scale", "x_zero_point", "weight", "weight_scale",
                                      "weight_zero_point", "y_scale", "y_zero_point", "bias")]
            x = clip(node("QLinearConv", inputs, name, **attrs), a[p + "y_range"], name)
            if kind == "linear":
                x = node("Flatten", [x], name + "_flatten", axis=1)
        elif kind == "maxpool":
            (ph, pw) = a[p + "padding"].tolist()
            x = node("MaxPool", [x], name, kernel_shape=a[p + "kernel"].tolist(),
                     strides=a[p + "stride"].tolist(), pads=[ph, pw, ph, pw])
        elif kind == "flatten":
            x = node("Flatten", [x], name, axis=1)
        else:
            x = clip(x, a[p + "range"], name)
    nodes.append(("Identity", "output_integers", [x], ["y_q"], {}))
    nodes.append(("DequantizeLinear", "dequantize", ["y_q", const("output_scale", a["output.scale"]),
                                                     const("output_zero_point",
                                                           a["output.zero_point"])], ["y"], {}))
    return nodes, consts, x_in, ["y", "y_q"]
