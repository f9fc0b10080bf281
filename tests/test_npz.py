"""The .npz format (quantlab.npz): a hand-written file runs as its documentation says; every damaged
file is refused with a ValueError naming the bad key; to_npz refuses what it cannot write."""

import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from quantlab.engine import Engine
from quantlab.export import to_npz
from quantlab.modules import QLinear
from quantlab.npz import FORMAT, VERSION


@pytest.fixture(scope="module")
def written(tmp_path_factory, frozen_nets):
    qnet = frozen_nets["net", True]
    path = tmp_path_factory.mktemp("npz") / "net.npz"
    to_npz(qnet, path)
    with np.load(path) as f:
        return qnet, path, {k: f[k] for k in f.files}


def test_written_file_holds_quantlab_integers(written):
    qnet, path, arrays = written
    assert str(arrays["format"]) == FORMAT and int(arrays["version"]) == VERSION
    assert list(arrays["layers"]) == ["conv", "maxpool", "conv", "maxpool", "flatten", "linear"]
    assert np.array_equal(arrays["0.weight"], qnet.layers[0].weight_int.numpy())
    assert np.array_equal(arrays["5.bias"], qnet.layers[5].bias_int.numpy())
    assert arrays["5.weight"].shape == (10, 1000) and arrays["0.weight_scale"].shape == (40,)
    assert str(arrays["multiplier"]) == "qnnpack" and str(arrays["requantization"]) == "float"


def test_hand_written_file_computes_the_documented_formula(tmp_path):
    """A linear layer written with numpy alone, from the format's documentation."""
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (5, 7), dtype=np.int8)
    b = rng.integers(-3000, 3000, 5, dtype=np.int32)
    s_x, z_x, s_w, s_y, z_y = np.float32(0.02), 17, np.float32(0.011), np.float32(0.15), 90
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION),
              "multiplier": np.array("qnnpack"), "requantization": np.array("float"),
              "input_dtype": np.array("float32"), "input.scale": s_x,
              "input.zero_point": np.uint8(z_x), "input.range": np.array([0, 255], np.uint8),
              "output.scale": s_y, "output.zero_point": np.uint8(z_y),
              "layers": np.array(["linear"]), "0.weight": w, "0.weight_scale": s_w,
              "0.weight_zero_point": np.int8(0), "0.bias": b, "0.x_scale": s_x,
              "0.x_zero_point": np.uint8(z_x), "0.y_scale": s_y, "0.y_zero_point": np.uint8(z_y),
              "0.y_range": np.array([z_y, 255], np.uint8)}  # a fused ReLU
    np.savez(tmp_path / "hand.npz", **arrays)
    x = rng.normal(0, 1.5, (64, 7)).astype(np.float32)
    q_x = np.clip(np.rint(x / s_x) + z_x, 0, 255).astype(np.int64)
    acc = (q_x - z_x) @ w.astype(np.int64).T + b
    m = np.float32(s_x * s_w) * (np.float32(1) / s_y)
    want = np.clip(np.rint(acc.astype(np.float32) * m) + z_y, z_y, 255).astype(np.uint8)
    out = Engine(tmp_path / "hand.npz").run(x)
    assert np.array_equal(out["y_q"], want)
    assert 0 < (want == z_y).mean() < 1  # the ReLU clamp was exercised, not everything
    assert np.array_equal(out["y"], (want.astype(np.float32) - z_y) * s_y)


DAMAGES = [  # (key, new value or None to delete, what the error names)
    ("0.bias", None, "key '0.bias' is missing"),
    ("0.bias", lambda a: a.astype(np.int64), "key '0.bias' must be int32; got int64"),
    ("0.bias", lambda a: a[:-1], r"key '0.bias' must have shape \(40,\); got \(39,\)"),
    ("0.weight", lambda a: a.astype(np.float32), "key '0.weight' must be int8"),
    ("0.weight", lambda a: a[0], "key '0.weight' must have shape"),
    ("5.weight_scale", lambda a: a[:3], r"key '5.weight_scale' must have shape \(\) or \(10,\)"),
    ("5.weight_scale", lambda a: np.where(np.arange(10) == 4, np.nan, a).astype(np.float32),
     "key '5.weight_scale' must be finite, in"),
    ("0.x_scale", lambda a: np.float32(0), "key '0.x_scale' must be finite, in"),
    ("0.x_scale", lambda a: np.float32(1e-40), "key '0.x_scale' must be finite, in"),   # denormal
    ("2.y_scale", lambda a: np.float32(1e30), "key '2.y_scale' must be finite, in"),
    ("2.x_scale", lambda a: a * np.float32(1.5), "keys '2.x_scale'/'2.x_zero_point' .* must equal "
     "the qparams of the tensor the layer reads, '0.y_scale'"),
    ("5.x_zero_point", lambda a: a + np.uint8(1), "keys '5.x_scale'/'5.x_zero_point'"),
    ("output.scale", lambda a: a * np.float32(2), "keys 'output.scale'/'output.zero_point' must equal"),
    ("0.y_range", lambda a: np.array([200, 10], np.uint8), "key '0.y_range' must be .* low <= high"),
    ("0.groups", lambda a: np.int64(3), "key '0.groups' \\(3\\) must divide the 40"),
    ("2.stride", lambda a: np.array([1, 0]), "key '2.stride' must be >= 1"),
    ("1.padding", lambda a: np.array([2, 2]), "key '1.padding' must be <= kernel // 2"),
    ("version", lambda a: np.int64(2), "format version 2; this quantlab reads version 1"),
    ("format", lambda a: np.array("onnx"), "not a quantlab integer model"),
    ("multiplier", lambda a: np.array("tflite"), "key 'multiplier' must be one of"),
    ("input_dtype", lambda a: np.array("int8"), "key 'input_dtype' must be one of"),
    ("layers", lambda a: np.array(["conv", "avgpool", "conv", "maxpool", "flatten", "linear"]),
     r"key 'layers\[1\]' must be one of"),
    ("3.extra", lambda a: np.zeros(3), "unexpected key '3.extra'"),
]


@pytest.mark.parametrize("key, change, message", DAMAGES, ids=[m[:30] for *_, m in DAMAGES])
def test_damaged_file_names_the_bad_key(written, tmp_path, key, change, message):
    _, _, arrays = written
    arrays = dict(arrays)
    if change is None:
        del arrays[key]
    else:
        arrays[key] = change(arrays.get(key))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        Engine(tmp_path / "bad.npz")


def test_damaged_archive_is_refused(written, tmp_path):
    _, path, _ = written
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz: not an .npz file"):
        Engine(tmp_path / "cut.npz")
    with pytest.raises(ValueError, match="no such file"):
        Engine(tmp_path / "missing.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array([FORMAT, None], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz: unreadable .npz"):
        Engine(tmp_path / "pickled.npz")
    # a flipped byte in the middle of the fc weights' compressed bytes: their CRC catches it
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("5.weight.npy")
    flipped = bytearray(data)
    flipped[info.header_offset + info.compress_size // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="flipped.npz"):
        Engine(tmp_path / "flipped.npz")


def test_to_npz_refuses_what_it_cannot_write(written, tmp_path):
    qnet, _, _ = written
    with pytest.raises(ValueError, match="path must be a file name ending in .npz"):
        to_npz(qnet, tmp_path / "net.onnx")
    with pytest.raises(ValueError, match="input_dtype must be one of"):
        to_npz(qnet, tmp_path / "net.npz", input_dtype="int8")
    with pytest.raises(TypeError, match="model must be a frozen QuantizedNet"):
        to_npz(nn.Linear(3, 2), tmp_path / "net.npz")
    layer = QLinear(nn.Linear(3, 2), True, True, 8, True)
    with pytest.raises(RuntimeError, match="not frozen"):
        to_npz(layer, tmp_path / "net.npz")
    wide = QLinear(nn.Linear(3, 2), True, True, 12, True)
    wide(torch.randn(8, 3))
    wide.freeze()
    with pytest.raises(ValueError, match="uint8 activations; this QParam has range \\[0, 4095\\]"):
        to_npz(wide, tmp_path / "net.npz")


class _Permute(nn.Module):
    """A channel permutation by indexing between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 3)
        self.fc = nn.Linear(2 * 24 * 24, 10)

    def forward(self, x):
        return self.fc(self.b(self.a(x)[:, [3, 1, 0, 2]]).flatten(1))


class _Crop(_Permute):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * 22 * 22, 10)

    def forward(self, x):
        return self.fc(self.b(self.a(x))[:, :, 1:-1, 1:-1].flatten(1))   # a spatial crop


class _LinearOnLastDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(26, 10)

    def forward(self, x):
        return self.fc(self.conv(x))                             # on (N, 2, 26, 26)'s last dim


def _frozen(model):
    import quantlab
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    return quantlab.quantize_model(model.eval()).calibrate([x]).freeze()


@pytest.mark.parametrize("cls", [_Permute, _Crop])
def test_to_npz_refuses_a_graph_step_it_cannot_hold_by_name(cls, tmp_path):
    qnet = _frozen(cls())
    with pytest.raises(TypeError, match=r"graph step getitem \(getitem\) has no .npz export"):
        to_npz(qnet, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_linear_on_the_last_dimension_is_refused_by_both_exports(tmp_path):
    from quantlab.export import to_onnx
    qnet = _frozen(_LinearOnLastDim())
    for export, path in ((to_npz, "m.npz"), (to_onnx, "m.onnx")):
        with pytest.raises(TypeError, match="graph step fc \\(QLinear\\) reads 'conv'"):
            export(qnet, tmp_path / path)


def test_an_interrupted_write_leaves_no_file_under_the_final_name(written, tmp_path, monkeypatch):
    qnet, _, _ = written
    path = tmp_path / "net.npz"

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        to_npz(qnet, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    path.write_bytes(b"the previous file")           # a failed write keeps what was there
    with pytest.raises(KeyboardInterrupt):
        to_npz(qnet, path)
    assert path.read_bytes() == b"the previous file" and len(list(tmp_path.iterdir())) == 1
    monkeypatch.undo()
    to_npz(qnet, path)
    assert Engine(path)(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)
