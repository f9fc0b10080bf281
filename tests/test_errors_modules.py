"""Bad inputs to the quantized layers and models: TypeError/ValueError naming the argument, or a
RuntimeError saying what to call first (life-cycle errors)."""

import pytest
import torch
from bad_input import bad_input_test
from torch import nn

from quantlab import QParam
from quantlab.models import Net, NetBN, quantize_model
from quantlab.modules import (
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    QReLU,
    calibration_mode,
    fold_bn,
)

T, V, R = TypeError, ValueError, RuntimeError
IMAGES = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
BN4 = (torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), 1e-5)  # mean var gamma beta eps


def conv():
    torch.manual_seed(0)
    return nn.Conv2d(2, 3, 3)


def frozen_conv():
    q = QConv2d(conv(), True, True, 8, True)
    q.calibrate(torch.randn(2, 2, 5, 5))
    return q.freeze()


def frozen_linear():
    torch.manual_seed(0)
    q = QLinear(nn.Linear(4, 3), True, True, 8, True)
    q.calibrate(torch.randn(5, 4))
    return q.freeze()


_QNET = {}


def qnet():
    if "q" not in _QNET:
        torch.manual_seed(0)
        _QNET["q"] = quantize_model(Net(), 8).calibrate([IMAGES]).freeze()
    return _QNET["q"]


def i32(*shape, value=0):
    return torch.full(shape, value, dtype=torch.int32)


def bn(**kw):
    return nn.BatchNorm2d(3, **kw)


CASES = {
    "QConv2d": [
        (lambda: QConv2d(None), T, "conv"),
        (lambda: QConv2d(nn.Linear(2, 2)), T, "conv"),
        (lambda: QConv2d(nn.Conv2d(1, 1, 3, padding="same")), V, "padding"),
        (lambda: QConv2d(conv(), "yes"), T, "qi"),
        (lambda: QConv2d(conv(), True, None), T, "qo"),
        (lambda: QConv2d(conv(), True, True, 1), V, "num_bits"),
        (lambda: QConv2d(conv(), True, True, 8.0), T, "num_bits"),
        (lambda: QConv2d(conv(), True, True, 8, "no"), T, "per_channel"),
        (lambda: QConv2d(conv(), relu="no"), T, "relu"),
        (lambda: QConv2d(conv(), relu=1), T, "relu"),
        (lambda: QConv2d(conv(), fixed_point="yes"), T, "fixed_point"),
        (lambda: QConv2d(conv(), averaging_constant=2), V, "averaging_constant"),
        (lambda: QConv2d(conv()).freeze(), R, "calibrate"),
        (lambda: QConv2d(conv()).quantize_inference(i32(1, 2, 5, 5)), R, "freeze()"),
        (lambda: QConv2d(conv(), False, True).freeze(), V, "q_in"),
        (lambda: QConv2d(conv(), False, True).freeze(q_in="x"), T, "q_in"),
        (lambda: QConv2d(conv(), False, True).freeze(q_in=QParam(8)), R, "q_in"),
        (lambda: frozen_conv().freeze(q_out=3), T, "q_out"),
        (lambda: QConv2d(conv()).calibrate(None), T, "x"),
        (lambda: QConv2d(conv()).calibrate(torch.full((1, 2, 5, 5), float("nan"))), V, "x"),
        (lambda: QConv2d(conv()).calibrate(torch.empty(1, 2, 5, 5, device="meta")), V, "meta"),
        (lambda: frozen_conv().quantize_inference(None), T, "q_x"),
        (lambda: frozen_conv().quantize_inference(torch.zeros(1, 2, 5, 5)), T, "q_x"),
        (lambda: frozen_conv().quantize_inference(i32(1, 2, 5, 5, value=300)), V, "q_x"),
        (lambda: frozen_conv().quantize_inference(i32(1, 3, 5, 5)), V, "q_x"),
        (lambda: frozen_conv().quantize_inference(i32(2, 5, 5, 1, 1)), V, "q_x"),
        (lambda: frozen_conv().quantize_inference(i32(5, 5)), V, "q_x"),
        (lambda: frozen_conv().quantize_inference(i32(1, 2, 2, 2)), V, "q_x"),
        (lambda: frozen_conv().quantize_inference(i32(0, 2, 5, 5)), V, "q_x"),
    ],
    "QLinear": [
        (lambda: QLinear(nn.Conv2d(1, 1, 1)), T, "fc"),
        (lambda: QLinear("fc"), T, "fc"),
        (lambda: QLinear(nn.Linear(2, 2), relu="off"), T, "relu"),
        (lambda: QLinear(nn.Linear(2, 2), True, True, 8, None), T, "per_channel"),
        (lambda: frozen_linear().quantize_inference(i32(2, 5)), V, "q_x"),
        (lambda: frozen_linear().quantize_inference(torch.zeros(2, 4, dtype=torch.bool)), T, "q_x"),
        (lambda: frozen_linear().quantize_inference(i32(2, 4, value=-1)), V, "q_x"),
    ],
    "QConvBNReLU": [
        (lambda: QConvBNReLU(conv(), None), T, "bn"),
        (lambda: QConvBNReLU(conv(), nn.BatchNorm2d(5)), T, "bn"),
        (lambda: QConvBNReLU(conv(), bn(affine=False)), V, "affine"),
        (lambda: QConvBNReLU(conv(), bn(track_running_stats=False)), V, "track_running_stats"),
        (lambda: QConvBNReLU(nn.Linear(2, 3), bn()), T, "conv"),
        (lambda: QConvBNReLU(conv(), bn(), relu="yes"), T, "relu"),
    ],
    "QMaxPool2d": [
        (lambda: QMaxPool2d(0), V, "kernel_size"),
        (lambda: QMaxPool2d(-2), V, "kernel_size"),
        (lambda: QMaxPool2d(2.0), T, "kernel_size"),
        (lambda: QMaxPool2d("2"), T, "kernel_size"),
        (lambda: QMaxPool2d(2, 0), V, "stride"),
        (lambda: QMaxPool2d(2, 1.5), T, "stride"),
        (lambda: QMaxPool2d(2, 2, 2), V, "padding"),
        (lambda: QMaxPool2d(2, 2, -1), V, "padding"),
        (lambda: QMaxPool2d(2, num_bits=20), V, "num_bits"),
        (lambda: QMaxPool2d(2).freeze(), V, "q_in"),
        (lambda: QMaxPool2d(2).quantize_inference(i32(1, 1, 4, 4)), R, "freeze()"),
        (lambda: QMaxPool2d(2).freeze(frozen_conv().q_out).quantize_inference(i32(4)), V, "q_x"),
        (lambda: QMaxPool2d(2).freeze(frozen_conv().q_out).quantize_inference(i32(1, 1, 1, 1)),
         V, "q_x"),
    ],
    "QReLU/QFlatten": [
        (lambda: QReLU(num_bits=0), V, "num_bits"),
        (lambda: QReLU().freeze(q_in=1), T, "q_in"),
        (lambda: QFlatten().freeze(frozen_conv().q_out).quantize_inference(i32(3)), V, "q_x"),
        (lambda: QFlatten().freeze(frozen_conv().q_out).quantize_inference(torch.ones(3, 3)),
         T, "q_x"),
    ],
    "fold_bn": [
        (lambda: fold_bn(None, None, *BN4), T, "weight"),
        (lambda: fold_bn(torch.ones(3, 1), None, torch.ones(2), *BN4[1:]), V, "mean"),
        (lambda: fold_bn(torch.ones(3, 1), torch.ones(3, dtype=torch.int64), *BN4), T, "bias"),
        (lambda: fold_bn(torch.ones(3, 1), None, BN4[0], -BN4[1], *BN4[2:]), V, "var"),
        (lambda: fold_bn(torch.ones(3, 1), None, *BN4[:4], 0.0), V, "eps"),
        (lambda: fold_bn(torch.ones(3, 1), None, *BN4[:4], "1e-5"), T, "eps"),
        (lambda: calibration_mode(None).__enter__(), T, "module"),
    ],
    "quantize_model": [
        (lambda: quantize_model(None), T, "net"),
        (lambda: quantize_model(nn.Sequential()), T, "net"),
        (lambda: quantize_model(Net(), num_bits=1), V, "num_bits"),
        (lambda: quantize_model(Net(), num_bits="8"), T, "num_bits"),
        (lambda: quantize_model(Net(), output_bits=1), V, "output_bits"),
        (lambda: quantize_model(Net(), output_bits=8.0), T, "output_bits"),
        (lambda: quantize_model(Net(), per_channel="yes"), T, "per_channel"),
        (lambda: quantize_model(Net(), qat=1), T, "qat"),
        (lambda: quantize_model(Net(), fixed_point=None), T, "fixed_point"),
        (lambda: quantize_model(Net(), averaging_constant=0.0), V, "averaging_constant"),
        (lambda: quantize_model(Net(), averaging_constant="0.1"), T, "averaging_constant"),
        (lambda: quantize_model(Net().to("meta")), V, "meta"),
        (lambda: quantize_model(_nan_net()), V, "net.conv1.weight"),
    ],
    "QuantizedNet": [
        (lambda: quantize_model(Net()).calibrate(IMAGES), T, "data"),
        (lambda: quantize_model(Net()).calibrate(None), T, "data"),
        (lambda: quantize_model(Net()).calibrate(5), T, "data"),
        (lambda: quantize_model(Net()).calibrate([]), V, "data"),
        (lambda: quantize_model(Net()).calibrate([["a", 1]]), T, "data"),
        (lambda: quantize_model(Net()).calibrate([IMAGES[0]]), V, "data"),
        (lambda: quantize_model(Net()).calibrate([torch.randn(2, 1, 20, 20)]), V, "data"),
        (lambda: quantize_model(Net()).calibrate([IMAGES], num_batches=0), V, "num_batches"),
        (lambda: quantize_model(Net()).calibrate([IMAGES], num_batches=1.5), T, "num_batches"),
        (lambda: quantize_model(Net()).calibrate([IMAGES * float("nan")]), V, "x"),
        (lambda: quantize_model(Net()).freeze(), R, "calibrate"),
        (lambda: quantize_model(Net()).quantize_inference(IMAGES), R, "freeze()"),
        (lambda: quantize_model(Net()).integer_inference(i32(1, 1, 28, 28)), R, "freeze()"),
        (lambda: quantize_model(Net()).size_bytes(), R, "freeze()"),
        (lambda: quantize_model(NetBN()).freeze_bn_stats("yes"), T, "frozen"),
        (lambda: qnet().quantize_inference(None), T, "x"),
        (lambda: qnet().quantize_inference(IMAGES[0]), V, "x"),
        (lambda: qnet().quantize_inference(IMAGES[:, :, :20]), V, "x"),
        (lambda: qnet().quantize_inference(IMAGES.int()), T, "x"),
        (lambda: qnet().integer_inference(IMAGES), T, "q_x"),
        (lambda: qnet().integer_inference(i32(1, 28, 28)), V, "q_x"),
        (lambda: qnet().integer_inference(i32(2, 3, 28, 28)), V, "q_x"),
        (lambda: qnet().integer_inference(i32(2, 1, 28, 28, value=999)), V, "q_x"),
        (lambda: qnet().accuracy(IMAGES), T, "loader"),
        (lambda: qnet().accuracy([]), V, "loader"),
        (lambda: qnet().accuracy([IMAGES]), T, "loader"),
        (lambda: qnet().accuracy([(IMAGES[:2], IMAGES[2:])]), T, "loader"),
        (lambda: qnet().accuracy([(IMAGES, torch.zeros(3, dtype=torch.long))]), V, "loader"),
        (lambda: qnet()(IMAGES[0]), V, "x"),
    ],
}


def _nan_net():
    net = Net()
    with torch.no_grad():
        net.conv1.weight[0, 0, 0, 0] = float("nan")
    return net


test_bad_input_raises_naming_the_argument = bad_input_test(CASES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_quantize_model_converts_a_float64_or_float16_model(dtype):
    torch.manual_seed(0)
    net = Net().to(dtype)
    q = quantize_model(net, 8).calibrate([IMAGES]).freeze()
    assert next(net.parameters()).dtype == dtype  # the caller's model is untouched
    assert q.layers[0].conv.weight.dtype == torch.float32
    assert q.quantize_inference(IMAGES).shape == (4, 10)


def test_unexpected_keys_are_reported_by_strict_loading():
    state = qnet().state_dict()
    state["layers.0.q_in.bogus"] = torch.zeros(1)
    state["layers.0.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="bogus"):
        quantize_model(Net(), 8).load_state_dict(state)
    result = quantize_model(Net(), 8).load_state_dict(state, strict=False)
    assert set(result.unexpected_keys) == {"layers.0.q_in.bogus", "layers.0.bogus"}
