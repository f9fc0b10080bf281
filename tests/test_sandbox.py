"""quantlab.sandbox: the data-only encoding between the grader and the learner's process."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import sandbox

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                        b.view(-1).view(torch.uint8) if b.numel() else b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            a.tobytes() == b.tobytes()
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (2, 3, 4)])
def test_tensors_cross_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 300).to(dtype) if dtype != torch.bool else \
        torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point and t.numel():
        t.view(-1)[0] = float("nan")
    back = sandbox.decode(sandbox.encode(t))
    assert _same(t, back), (t, back)
    # a non-contiguous view and a tensor that requires grad cross as plain values
    if t.dim() == 3 and t.numel():
        assert _same(t.transpose(0, 2).contiguous(), sandbox.decode(sandbox.encode(t.transpose(0, 2))))


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=5),
                    lambda kids: st.lists(kids, max_size=3) | st.tuples(kids, kids), max_leaves=8))
def test_python_values_cross_with_their_types(v):
    assert _same(v, sandbox.decode(sandbox.encode(v)))


def test_numpy_values_and_opaque_objects():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _same(a, sandbox.decode(sandbox.encode(a)))
    s = sandbox.decode(sandbox.encode(np.float32(1.5)))
    assert isinstance(s, np.float32) and s == 1.5
    m = sandbox.decode(sandbox.encode(torch.nn.Linear(2, 3)))
    assert isinstance(m, sandbox.Opaque) and type(m).__name__ == "Linear"
    assert "in_features=2" in repr(m)
    q = sandbox.decode(sandbox.encode(torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)))
    assert isinstance(q, sandbox.Opaque) and type(q).__name__ == "Tensor"
    d = sandbox.decode(sandbox.encode({"a": (1, 2.0)}))
    assert d == {"a": (1, 2.0)}


@pytest.mark.parametrize("bad", [{"$": "tensor", "dtype": "Tensor", "shape": [1], "data": "AA=="},
                                 {"$": "code", "src": "import os"}, {"no": "tag"}])
def test_decoding_builds_only_data(bad):
    with pytest.raises(ValueError):
        sandbox.decode(bad)
