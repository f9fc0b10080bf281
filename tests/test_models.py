"""Whole-model quantization of Net / NetBN: accuracy, bit-exactness, save/load, errors."""

import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from quantlab.models import Net, NetBN, quantize_model
from quantlab.reference import ao_unavailable_reason, torch_ao_available, torch_quantized_model
from quantlab.training import evaluate, pretrained

# torch.ao's int8 kernels are deprecated: without them the qnnpack oracle tests skip
# (test_export.py checks the same integers against ONNX Runtime)
needs_qnnpack = pytest.mark.skipif(not torch_ao_available(), reason=ao_unavailable_reason())


@pytest.fixture(scope="module")
def loaders(embedded):
    x_tr, y_tr, x_te, y_te = embedded
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=256)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=500)
    return train, test


@pytest.fixture(scope="module")
def frozen(frozen_nets):
    return frozen_nets


@pytest.mark.parametrize("name", ["net", "netbn"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_accuracy_close_to_float(frozen, loaders, name, per_channel):
    _, test = loaders
    float_acc = evaluate(pretrained(name), test)
    int_acc = frozen[name, per_channel].accuracy(test)
    assert int_acc >= float_acc - 0.003, (float_acc, int_acc)


@needs_qnnpack
@pytest.mark.parametrize("name", ["net", "netbn"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_whole_model_bit_exact_with_pytorch_qnnpack(frozen, loaders, name, per_channel):
    _, test = loaders
    qnet = frozen[name, per_channel]
    ref = torch_quantized_model(qnet, "qnnpack")
    images = torch.cat([x for x, _ in test])[:500]
    q_x = qnet.q_in.quantize_tensor(images)
    assert torch.equal(qnet.integer_inference(q_x), ref.integer_inference(q_x))


def test_quantize_model_does_not_touch_the_float_model(loaders):
    train, _ = loaders
    net = pretrained("netbn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    quantize_model(net, 8, qat=True).calibrate(train, num_batches=2)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_fc_accumulator_is_provably_exact_in_float32(frozen):
    for qnet in frozen.values():
        fc = qnet.layers[-1]
        assert fc.accumulator_bound() < 2**24 and fc.acc_dtype == torch.float32


def test_fixed_point_model_agrees_with_float_requantization(loaders):
    train, test = loaders
    a = quantize_model(pretrained("net"), 8).calibrate(train, num_batches=4).freeze()
    b = quantize_model(pretrained("net"), 8, fixed_point=True).calibrate(train,
                                                                         num_batches=4).freeze()
    images = torch.cat([x for x, _ in test])
    la, lb = a.quantize_inference(images), b.quantize_inference(images)
    assert (la.argmax(1) == lb.argmax(1)).float().mean() > 0.99
    assert (la - lb).abs().max() <= 8 * a.q_out.scale  # a few LSB after three layers


def test_frozen_model_state_dict_round_trip(frozen, loaders):
    _, test = loaders
    qnet = frozen["netbn", True]
    buf = io.BytesIO()
    torch.save(qnet.state_dict(), buf)
    buf.seek(0)
    fresh = quantize_model(NetBN(), 8, per_channel=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.frozen
    images = torch.cat([x for x, _ in test])[:200]
    assert torch.equal(fresh.quantize_inference(images), qnet.quantize_inference(images))


def test_model_size(frozen):
    size = frozen["net", True].size_bytes()
    assert size["float32"] == 4 * 11170
    assert size["integer"] < size["float32"] / 3


def test_errors(loaders):
    train, _ = loaders
    qnet = quantize_model(Net(), 8)
    with pytest.raises(RuntimeError, match="freeze"):
        qnet.quantize_inference(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="no batches"):
        qnet.calibrate([])
    with pytest.raises(TypeError, match="image tensors"):
        qnet.calibrate([("not", "images")])
    with pytest.raises(RuntimeError, match="observed nothing"):
        qnet.freeze()
    with pytest.raises(TypeError, match="Net or NetBN"):
        quantize_model(torch.nn.Linear(2, 2))
    qnet.calibrate(train, num_batches=1).freeze()
    with pytest.raises(TypeError, match="integer tensor"):
        qnet.integer_inference(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="outside"):
        qnet.integer_inference(torch.full((1, 1, 28, 28), -1, dtype=torch.int32))
    # calibrate accepts a plain iterable of image batches
    images = next(iter(train))[0]
    quantize_model(Net(), 8).calibrate([images[:10], images[10:20]]).freeze()
