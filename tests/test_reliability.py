"""Regression tests for the 8 silent wrong results of issue 12 (each fails on the code before the fix).

Small random layers and models only: the whole module runs in seconds.
"""

import warnings

import pytest
import torch
from torch import nn

import quantlab
from quantlab import calc_scale_zero_point, quantize
from quantlab.models import Net, quantize_model
from quantlab.modules import QConv2d, QLinear


def _images(n=4, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _frozen_net(**kw):
    torch.manual_seed(0)
    return quantize_model(Net(), **kw).calibrate([_images(8)]).freeze()


# 1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-39, 2.9e-39, 1.4e-45])
def test_1_tiny_scale_is_refused_instead_of_int32_min(scale):
    # before: 1/scale overflowed to inf, 0 * inf = NaN, and quantize returned -2147483648
    with pytest.raises(ValueError, match="scale"):
        quantize(torch.zeros(3), scale, 0)
    with pytest.raises(ValueError, match="scale"):
        quantlab.fake_quantize(torch.zeros(3), scale, 0)


def test_1_smallest_accepted_scale_stays_in_range():
    scale = torch.tensor(1 / torch.finfo(torch.float32).max, dtype=torch.float32)
    while not torch.isfinite(1.0 / scale):  # the smallest float32 with a finite reciprocal
        scale = torch.nextafter(scale, torch.tensor(1.0))
    q = quantize(torch.tensor([0.0, 1e-30, -1e-30, 3e38]), scale, 7)
    assert q.tolist() == [7, 255, 0, 255]


# 2 ------------------------------------------------------------------------------------------
def _conv_with(weight_c0, bias_c0, num_bits=8, per_channel=True):
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight[:] = torch.tensor([weight_c0, 0.5]).reshape(2, 1, 1, 1)
        conv.bias[:] = torch.tensor([bias_c0, 0.1])
    q = QConv2d(conv, True, True, num_bits, per_channel)
    x = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    q.calibrate(x)
    return q, x


def test_2_all_zero_channel_with_ordinary_bias_is_exact():
    # before: S_w = eps, b / (S_x * S_w) > 2**31 saturated silently; the channel's output was
    # clamped far below its bias (README: "all-zero channels are safe")
    q, x = _conv_with(0.0, 3.0)
    with pytest.warns(UserWarning, match="all-zero weights"):
        q.freeze()
    assert int(q.bias_int.abs().max()) <= 2**31 - 1
    assert bool((q.weight_int[0] == 0).all())
    out = q.q_out.dequantize_tensor(q.quantize_inference(q.q_in.quantize_tensor(x)))
    exact = q.conv(x).clamp(min=q.q_out.min_val.item(), max=q.q_out.max_val.item())
    assert torch.allclose(out[0, 0], exact[0, 0], atol=float(q.q_out.scale))  # the bias, 3.0


def test_2_tiny_weight_channel_is_refused_naming_layer_and_channel():
    q, _ = _conv_with(1e-9, 3.0)
    q.qname = "conv1"
    with pytest.raises(ValueError, match=r"conv1.*channel\(s\) \[0\]"):
        q.freeze()


def test_2_sixteen_bit_bias_is_exact_in_int64():
    # before: a 16-bit layer's ordinary bias saturated to 2**31 - 1 (or became 2**31)
    q, _ = _conv_with(0.3, 2.0, num_bits=16)
    q.freeze()
    expected = torch.round(torch.tensor(2.0) * (1.0 / (q.q_w.scale[0] * q.q_in.scale)))
    assert int(q.bias_int[0]) == int(expected) > 2**31


def test_2_bias_at_the_int32_limit_is_not_rounded_to_2_31():
    # f32(2**31 - 1) == 2**31: the clamp in float32 produced 2147483648
    q, _ = _conv_with(0.5, 0.0)
    with torch.no_grad():
        q.freeze()
        s = float(q.q_w.scale[0] * q.q_in.scale)
        q.conv.bias[0] = (2**31 - 1) * s
    with pytest.raises(ValueError, match="channel"):
        q.freeze()  # b / (S_x S_w) rounds to 2**31 in float32: refused, never stored


# 3 ------------------------------------------------------------------------------------------
def test_3_unbatched_conv_input_matches_the_batched_result():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1)  # C_out == H == W: the old broadcast silently mixed axes
    q = QConv2d(conv, True, True, 8, True)
    x = torch.randn(2, 3, 3, 3)
    q.calibrate(x)
    q.freeze()
    q_x = q.q_in.quantize_tensor(x)
    batched = q.quantize_inference(q_x)
    single = q.quantize_inference(q_x[1])
    assert single.shape == conv(x[1]).shape == (3, 3, 3)
    assert torch.equal(single, batched[1])


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5), (4, 5)])
def test_3_linear_accepts_what_nn_linear_accepts(shape):
    torch.manual_seed(0)
    fc = nn.Linear(5, 3)
    q = QLinear(fc, True, True, 8, True)
    x = torch.randn(*shape)
    q.calibrate(x.reshape(-1, 5))
    q.freeze()
    out = q.quantize_inference(q.q_in.quantize_tensor(x))
    assert out.shape == fc(x).shape
    rows = q.quantize_inference(q.q_in.quantize_tensor(x.reshape(-1, 5)))
    assert torch.equal(out.reshape(-1, 3), rows)


# 4 ------------------------------------------------------------------------------------------
def test_4_calibrating_after_freeze_unfreezes_loudly():
    qnet = _frozen_net(num_bits=8)
    x = _images(4)
    assert qnet.frozen
    with pytest.warns(UserWarning, match="no longer frozen"):
        qnet.calibrate([_images(8, seed=1) * 3])
    assert not qnet.frozen
    with pytest.raises(RuntimeError, match="freeze\\(\\) again"):
        qnet.quantize_inference(x)
    qnet.freeze()
    assert qnet.frozen


def test_4_training_mode_forward_after_freeze_unfreezes():
    qnet = _frozen_net(num_bits=8, qat=True)
    qnet.train()
    with pytest.warns(UserWarning, match="no longer frozen"):
        qnet(_images(4, seed=2) * 5)
    with pytest.raises(RuntimeError, match="freeze\\(\\) again"):
        qnet.layers[0].quantize_inference(torch.zeros(1, 1, 28, 28, dtype=torch.int32))


def test_4_eval_forward_and_reloading_keep_a_model_frozen():
    qnet = _frozen_net(num_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qnet.eval()(_images(2))
    assert qnet.frozen
    fresh = quantize_model(Net(), num_bits=8)
    fresh.load_state_dict(qnet.state_dict())
    assert fresh.frozen


# 5 ------------------------------------------------------------------------------------------
def test_5_fixed_point_refuses_an_accumulator_beyond_int32():
    torch.manual_seed(0)
    fc = nn.Linear(4000, 2)  # 16-bit: |acc| up to 4000 * 32767 * 65535 >> 2**31
    q = QLinear(fc, True, True, 16, True, fixed_point=True)
    q.calibrate(torch.rand(8, 4000))
    q.qname = "fc"
    with pytest.raises(ValueError, match=r"fc: fixed_point=True needs \|acc \+ bias\|"):
        q.freeze()
    q_float = QLinear(fc, True, True, 16, True, fixed_point=False)
    q_float.calibrate(torch.rand(8, 4000))
    q_float.freeze()  # the float requantization of the exact accumulator is fine


# 6 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_6_to_dtype_keeps_the_frozen_integer_state(dtype):
    qnet = _frozen_net(num_bits=8, per_channel=True)
    q_x = qnet.q_in.quantize_tensor(_images(16, seed=3))
    before = qnet.integer_inference(q_x)
    state = {k: v.clone() for k, v in qnet.state_dict().items() if not k.endswith(("weight", "bias"))
             or "_int" in k}
    qnet.to(dtype)
    assert qnet.layers[0].multiplier.dtype == torch.float32
    assert qnet.layers[0].q_in.scale.dtype == torch.float32
    for k, v in state.items():
        assert torch.equal(qnet.state_dict()[k], v), k
    assert torch.equal(qnet.integer_inference(q_x), before)


# 7 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_7_widest_float32_range_gives_a_finite_scale(symmetric):
    scale, zp = calc_scale_zero_point(-3e38, 3e38, num_bits=8, symmetric=symmetric)
    assert torch.isfinite(scale)
    assert abs(float(scale) - 6e38 / 255) / (6e38 / 255) < 1e-6
    assert 0 <= int(zp) <= 255
    q = quantize(torch.tensor([-3e38, 0.0, 3e38]), scale, zp)
    assert q.tolist()[0] == 0 and q.tolist()[2] == 255


# 8 ------------------------------------------------------------------------------------------
def test_8_failed_freeze_restores_training_mode():
    torch.manual_seed(0)
    qnet = quantize_model(Net(), num_bits=8, qat=True)
    qnet.calibrate([_images(4)])
    with torch.no_grad():
        qnet.layers[0].conv.weight[0] = 0.0
        qnet.layers[0].conv.weight[0, 0, 0, 0] = 1e-12  # tiny, not zero: refuse
        qnet.layers[0].conv.bias[0] = 500.0
    assert qnet.training
    with pytest.raises(ValueError, match=r"layers\[0\] \(QConv2d\).*channel"):
        qnet.freeze()
    assert qnet.training and all(m.training for m in qnet.modules())


def test_8_failed_freeze_restores_mode_and_names_the_weight():
    torch.manual_seed(0)
    qnet = quantize_model(Net(), num_bits=8, qat=True)
    qnet.calibrate([_images(4)])
    with torch.no_grad():
        qnet.layers[2].conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\[2\] \(QConv2d\)'s weight must hold only finite"):
        qnet.freeze()
    assert qnet.training


def test_8_an_add_that_refuses_to_freeze_is_named():
    from quantlab.models import ResNet
    from quantlab.observer import QParam
    from quantlab.ops import QAdd
    torch.manual_seed(0)
    qnet = quantize_model(ResNet(), num_bits=8)
    qnet.calibrate([_images(4)])
    i, add = next((i, m) for i, m in enumerate(qnet.layers) if isinstance(m, QAdd))
    add.q_out = QParam(8)                       # as if the add's output had never been observed
    with pytest.raises(RuntimeError, match=rf"layers\[{i}\] \(QAdd\): QAdd has no observed output"):
        qnet.freeze()
