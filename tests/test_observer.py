import io

import pytest
import torch

from quantlab import QParam, calc_min_max, calc_scale_zero_point


def test_qparam_observes_running_range_and_matches_functions():
    qp = QParam(8)
    a, b = torch.randn(10, 3), torch.randn(10, 3) * 4
    qp.update(a).update(b)
    mn, mx = calc_min_max(b, *calc_min_max(a))
    s, z = calc_scale_zero_point(mn, mx, 8)
    assert torch.equal(qp.scale, s) and torch.equal(qp.zero_point, z)
    q = qp.quantize_tensor(a)
    assert q.dtype == torch.int32
    assert torch.equal(qp.dequantize_tensor(q), qp.fake_quantize(a))


def test_qparam_per_channel_and_repr():
    qp = QParam(8, signed=True, symmetric=True, axis=0)
    assert "not observed" in repr(qp)
    qp.update(torch.randn(6, 2, 3, 3))
    assert qp.scale.shape == (6,) and torch.all(qp.zero_point == 0)
    r = repr(qp)
    assert "int8" in r and "per-channel(axis=0)" in r and "channels=6" in r
    r1 = repr(QParam(4).update(torch.tensor([-1.0, 2.0])))
    assert "uint4" in r1 and "zero_point=" in r1 and "scale=" in r1


def test_moving_average_and_frozen_observer():
    qp = QParam(8, averaging_constant=0.5)
    qp.update(torch.tensor([-1.0, 1.0]))
    qp.update(torch.tensor([-3.0, 3.0]))
    assert qp.min_val.item() == -2.0 and qp.max_val.item() == 2.0
    qp.observing = False
    qp.update(torch.tensor([-100.0, 100.0]))
    assert qp.max_val.item() == 2.0


def test_unobserved_qparam_raises():
    qp = QParam()
    for call in (lambda: qp.quantize_tensor(torch.ones(2)),
                 lambda: qp.dequantize_tensor(torch.ones(2, dtype=torch.int32)),
                 lambda: qp.fake_quantize(torch.ones(2))):
        with pytest.raises(RuntimeError, match="observed nothing"):
            call()


def test_qparam_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_bits"):
        QParam(1)
    with pytest.raises(TypeError, match="axis"):
        QParam(8, axis=1.0)
    with pytest.raises(ValueError, match="averaging_constant"):
        QParam(8, averaging_constant=0.0)
    with pytest.raises(ValueError, match="axis"):
        QParam(8, axis=3).update(torch.randn(2, 2))


@pytest.mark.parametrize("axis", [None, 0])
def test_state_dict_round_trip(axis):
    qp = QParam(8, signed=True, symmetric=axis is not None, axis=axis)
    qp.update(torch.randn(4, 5))
    buf = io.BytesIO()
    torch.save(qp.state_dict(), buf)
    buf.seek(0)
    fresh = QParam(8, signed=True, symmetric=axis is not None, axis=axis)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.observed
    for name in ("min_val", "max_val", "scale", "zero_point"):
        assert torch.equal(getattr(fresh, name), getattr(qp, name))
    with pytest.raises(RuntimeError, match="Missing key"):
        QParam().load_state_dict({})
