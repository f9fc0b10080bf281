"""The NumPy engine: bit-exact with quantlab on every embedded test digit and on random layers,
float and fixed-point requantization, both multiplier formulas, from the .onnx file and from the
.npz file (whose damaged versions are refused, naming the key); it runs with torch blocked (and
with onnx blocked too for an .npz)."""

import copy
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_export import _random_layer
from torch import nn

from quantlab.engine import Engine, multiply_by_quantized_multiplier, quantize_multiplier
from quantlab.export import to_npz, to_onnx
from quantlab.fixed_point import multiply_by_quantized_multiplier as torch_mbqm
from quantlab.fixed_point import quantize_multiplier as torch_qm


@pytest.fixture(scope="module")
def data(embedded):
    x_tr, _, x_te, _ = embedded
    return x_tr, x_te


def variant(qnet, fixed_point: bool, multiplier: str):
    qnet = copy.deepcopy(qnet)
    for layer in qnet.layers:
        if hasattr(layer, "fixed_point"):
            layer.fixed_point = fixed_point
    qnet.fixed_point = fixed_point
    return qnet.freeze(multiplier=multiplier)


@pytest.mark.parametrize("name", ["net", "netbn"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("fixed_point", [False, True], ids=["float", "fixed_point"])
@pytest.mark.parametrize("multiplier", ["qnnpack", "onnxruntime"])
def test_engine_bit_exact_with_quantlab_on_every_test_digit(calibrated_nets, data, tmp_path, name,
                                                             per_channel, fixed_point, multiplier):
    _, x_te = data
    qnet = variant(calibrated_nets[name, per_channel], fixed_point, multiplier)
    path = tmp_path / "model.onnx"
    to_onnx(qnet, path, allow_fixed_point=fixed_point)
    out = Engine(path, chunk_size=300).run(x_te.numpy())  # chunks of uneven size too
    ours = qnet.integer_inference(qnet.q_in.quantize_tensor(x_te))
    assert out["y_q"].dtype == np.uint8
    assert np.array_equal(out["y_q"], ours.numpy())
    assert np.array_equal(out["y"], qnet.q_out.dequantize_tensor(ours).numpy())
    to_npz(qnet, tmp_path / "model.npz")
    out_npz = Engine(tmp_path / "model.npz").run(x_te.numpy())
    assert out_npz["y_q"].dtype == np.uint8
    assert np.array_equal(out_npz["y_q"], out["y_q"]) and np.array_equal(out_npz["y"], out["y"])


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_engine_bit_exact_on_random_layers(per_channel, tmp_path):
    rng, gen = random.Random(77 + per_channel), torch.Generator().manual_seed(5)
    for i in range(60):
        layer, x, cfg = _random_layer(rng, gen, per_channel)
        if i % 2:  # every other layer requantizes in fixed point
            layer.fixed_point = True
            layer.freeze()
        q_x = layer.q_in.quantize_tensor(x)
        ours = layer.quantize_inference(q_x).numpy()
        model = to_onnx(layer, input_dtype="uint8", allow_fixed_point=True)
        got = Engine(model).run(q_x.numpy().astype(np.uint8))["y_q"]
        assert np.array_equal(got, ours), cfg
        to_npz(layer, tmp_path / "layer.npz", input_dtype="uint8")
        got = Engine(tmp_path / "layer.npz").run(q_x.numpy().astype(np.uint8))["y_q"]
        assert np.array_equal(got, ours), cfg


def test_engine_float64_accumulation_when_float32_is_not_exact():
    fc = nn.Linear(1000, 3)
    with torch.no_grad():
        fc.weight.fill_(1.0)
        fc.weight[0, 0] = -1.0
    from quantlab.modules import QLinear

    layer = QLinear(fc, True, True, 8, False)
    layer(torch.rand(4, 1000))
    layer.freeze()
    engine = Engine(to_onnx(layer, input_dtype="uint8"))
    conv = next(iter(engine.convs.values()))
    assert conv.bound >= 2**24 and conv.dtype == np.float64
    q_x = torch.full((2, 1000), 255, dtype=torch.int32)
    q_x[1, ::3] = 0
    assert np.array_equal(engine.run(q_x.numpy().astype(np.uint8))["y_q"],
                          layer.quantize_inference(q_x).numpy())


def test_numpy_fixed_point_equals_quantlab_fixed_point():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**31), 2**31, 20_000, dtype=np.int64)
    ms = rng.uniform(1e-6, 2.0, 20_000)
    pairs = [quantize_multiplier(m) for m in ms]
    assert pairs == [torch_qm(m) for m in ms]
    m0, shift = (np.array(p, np.int64) for p in zip(*pairs))
    ours = multiply_by_quantized_multiplier(acc, m0, shift)
    ref = torch_mbqm(torch.from_numpy(acc), torch.from_numpy(m0), torch.from_numpy(shift))
    assert np.array_equal(ours, ref.numpy())


def test_engine_errors(tmp_path, calibrated_nets):
    model = to_onnx(variant(calibrated_nets["net", True], False, "qnnpack"))
    with pytest.raises(ValueError, match="multiplier must be one of"):
        Engine(model, multiplier="tflite")
    with pytest.raises(ValueError, match="requantization must be one of"):
        Engine(model, requantization="int")
    with pytest.raises(TypeError, match=r"path \(.onnx or .npz\) or an onnx.ModelProto"):
        Engine(42)
    with pytest.raises(ValueError, match="chunk_size"):
        Engine(model, chunk_size=0)
    model.graph.node[2].op_type = "AveragePool"
    with pytest.raises(ValueError, match="AveragePool"):
        Engine(model)


BLOCKED = textwrap.dedent("""
    import sys, importlib.abc
    BLOCKED = sys.argv[4].split(",")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    import numpy as np
    import quantlab.engine
    for blocked in BLOCKED:
        assert not any(m.split(".")[0] == blocked for m in sys.modules), blocked
        try:
            __import__(blocked)
            raise SystemExit("the block did not work")
        except ImportError:
            pass
    engine = quantlab.engine.Engine(sys.argv[1])
    y_q = engine.run(np.load(sys.argv[2]))["y_q"]
    assert np.array_equal(y_q, np.load(sys.argv[3])), "engine differs from quantlab"
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
    print("ok without", "+".join(BLOCKED), y_q.shape)
""")


@pytest.mark.parametrize("suffix, blocked", [("onnx", "torch"), ("npz", "torch,onnx")])
def test_engine_runs_with_torch_blocked(calibrated_nets, data, tmp_path, suffix, blocked):
    _, x_te = data
    qnet = variant(calibrated_nets["netbn", True], True, "qnnpack")
    path = tmp_path / f"m.{suffix}"
    if suffix == "onnx":
        to_onnx(qnet, path, allow_fixed_point=True)
    else:
        to_npz(qnet, path)
    np.save(tmp_path / "x.npy", x_te[:200].numpy())
    np.save(tmp_path / "y.npy", qnet.integer_inference(qnet.q_in.quantize_tensor(x_te[:200])).numpy())
    script = tmp_path / "run.py"
    script.write_text(BLOCKED)
    out = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy"), blocked],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok without {blocked.replace(',', '+')} (200, 10)" in out.stdout


@pytest.mark.parametrize("suffix", [".onnx", ".npz"])
@pytest.mark.parametrize("input_dtype", ["float32", "uint8"])
def test_engine_refuses_inputs_integer_inference_refuses(frozen_nets, tmp_path, suffix, input_dtype):
    # the engine returned other logits for NaN pixels, out-of-range or float integers and wrong
    # dtypes, and raw NumPy errors for a wrong shape: each is now refused, naming x
    qnet = frozen_nets["net", True]
    path = tmp_path / f"net{suffix}"
    (to_onnx if suffix == ".onnx" else to_npz)(qnet, path, input_dtype=input_dtype)
    engine = Engine(path)
    assert engine.input_dtype == input_dtype
    images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    q = qnet.q_in.quantize_tensor(torch.from_numpy(images)).numpy().astype(np.uint8)
    good = images if input_dtype == "float32" else q
    assert engine(good).shape == (2, 10)
    bad_values = images.copy()
    bad_values[0, 0, 3, 3] = np.nan
    if input_dtype == "uint8":
        bad_values = q.astype(np.int64)
        bad_values[0, 0, 3, 3] = 300
    with pytest.raises(ValueError, match="x must hold"):
        engine(bad_values)
    other = q.astype(np.int64) if input_dtype == "float32" else images
    with pytest.raises(TypeError, match="x must be"):
        engine(other)
    with pytest.raises(ValueError, match="x .*shape"):   # .onnx: its input shape; .npz: the fc's
        engine(good[:, :, :20, :20])
    with pytest.raises(ValueError, match="x must be a non-empty batch"):
        engine(good[0])


def test_engine_names_a_damaged_onnx_file(frozen_nets, tmp_path):
    path = tmp_path / "net.onnx"
    to_onnx(frozen_nets["net", True], path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="net.onnx: not a readable ONNX model"):
        Engine(path)
    with pytest.raises(ValueError, match="no such file"):
        Engine(tmp_path / "missing.onnx")
