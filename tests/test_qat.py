"""Quantization-aware training: trains, beats PTQ, reports its own model, freezes to integers."""

import itertools

import pytest
import torch

from quantlab.models import quantize_model
from quantlab.reference import ao_unavailable_reason, torch_ao_available, torch_quantized_model
from quantlab.training import evaluate, pretrained, train

# torch.ao's int8 kernels are deprecated: without them the qnnpack oracle tests skip
# (test_export.py checks the same integers against ONNX Runtime)
needs_qnnpack = pytest.mark.skipif(not torch_ao_available(), reason=ao_unavailable_reason())


@pytest.fixture(scope="module")
def qat2(loaders):
    train_loader, _ = loaders
    net = pretrained("net")
    qnet = quantize_model(net, num_bits=2, per_channel=True, qat=True)
    history = train(qnet, train_loader, epochs=2, progress=False)
    return net, qnet, history


def test_qat_defaults_are_used_by_train(qat2):
    _, qnet, history = qat2
    assert history["lr"][0] == pytest.approx(qnet.default_lr)
    assert qnet.qat and qnet.default_augment == 0


def test_2bit_qat_reaches_90_percent_and_beats_ptq(qat2, loaders):
    net, qnet, _ = qat2
    train_loader, test_loader = loaders
    ptq = quantize_model(net, num_bits=2, per_channel=True).calibrate(train_loader).freeze()
    qnet.freeze()
    qat_acc, ptq_acc = qnet.accuracy(test_loader), ptq.accuracy(test_loader)
    assert qat_acc >= 0.90
    assert qat_acc > ptq_acc + 0.10, (qat_acc, ptq_acc)


def test_qat_accuracy_is_the_qat_models_own(qat2, loaders):
    # a public tutorial reported the PTQ copy's accuracy after QAT: guard against it
    net, qnet, _ = qat2
    train_loader, test_loader = loaders
    qnet.freeze()
    conv1 = qnet.layers[0]
    assert not torch.equal(conv1.conv.weight, net.conv1.weight)  # QAT trained its own copy
    assert torch.equal(conv1.weight_int, conv1.q_w.quantize_tensor(conv1.conv.weight.detach()))
    ptq = quantize_model(net, num_bits=2, per_channel=True).calibrate(train_loader).freeze()
    assert not torch.equal(conv1.weight_int, ptq.layers[0].weight_int)
    assert qnet.accuracy(test_loader) == pytest.approx(evaluate(qnet.quantize_inference, test_loader))


def test_observers_follow_a_moving_average_only_while_training(loaders):
    train_loader, test_loader = loaders
    qnet = quantize_model(pretrained("net"), 4, qat=True)
    images = next(iter(train_loader))[0]
    qnet(images)
    q_out = qnet.layers[0].q_out
    first = q_out.max_val.clone()
    qnet(images * 3)
    moved = q_out.max_val.clone()
    assert moved > first and moved < 3 * first  # a moving average, not the new batch's max
    qnet.eval()
    qnet(images * 10)
    assert torch.equal(q_out.max_val, moved)  # evaluation never moves the ranges
    qnet.train().freeze_observers()
    qnet(images * 10)
    assert torch.equal(q_out.max_val, moved)


@needs_qnnpack
def test_netbn_qat_folds_bn_and_freezes_bit_exact(loaders):
    train_loader, test_loader = loaders
    netbn = pretrained("netbn")
    qnet = quantize_model(netbn, num_bits=4, per_channel=True, qat=True)
    train_loader.generator.manual_seed(0)  # the same 20 batches whatever ran before
    train(qnet, list(itertools.islice(train_loader, 20)), epochs=1, progress=False)
    fake_quant_acc = evaluate(qnet, test_loader)
    qnet.freeze()
    int_acc = qnet.accuracy(test_loader)
    assert int_acc >= evaluate(netbn, test_loader) - 0.01
    assert abs(int_acc - fake_quant_acc) <= 0.01
    images = torch.cat([x for x, _ in test_loader])[:300]
    q_x = qnet.q_in.quantize_tensor(images)
    ref = torch_quantized_model(qnet, "qnnpack")
    assert torch.equal(qnet.integer_inference(q_x), ref.integer_inference(q_x))
    assert int(qnet.layers[0].weight_int.abs().max()) <= 8  # 4-bit weights


def test_batch_statistics_recipe_updates_running_stats(loaders):
    train_loader, _ = loaders
    qnet = quantize_model(pretrained("netbn"), 8, qat=True).freeze_bn_stats(False)
    bn = qnet.layers[0].bn
    before = bn.running_mean.clone()
    images = next(iter(train_loader))[0]
    loss = qnet(images).sum()
    loss.backward()
    assert not torch.equal(before, bn.running_mean)
    assert qnet.layers[0].conv.weight.grad is not None


@pytest.mark.parametrize("name, num_bits, fixed_point",
                         [("net", 2, False), ("net", 3, True), ("netbn", 4, False)])
def test_qat_forward_computes_the_integer_models_values(loaders, name, num_bits, fixed_point):
    # QAT's forward simulates the int32 bias and the requantization: after a few steps of
    # training, the fake-quantized logits equal the frozen integer model's dequantized logits
    train_loader, test_loader = loaders
    qnet = quantize_model(pretrained(name), num_bits, qat=True, fixed_point=fixed_point)
    batches = [b for _, b in zip(range(2), train_loader)]
    train(qnet, batches, epochs=1, progress=False)
    images = next(iter(test_loader))[0][:100]
    qnet.eval()
    with torch.no_grad():
        fake = qnet(images)
    plain = quantize_model(pretrained(name), num_bits, qat=True, fixed_point=fixed_point)
    plain.load_state_dict(qnet.state_dict())
    for layer in plain.layers:
        layer.simulate_integer = False
    with torch.no_grad():
        unsimulated = plain.eval()(images)
    qnet.freeze()
    integer = qnet.quantize_inference(images)
    assert torch.equal(fake, integer)
    assert not torch.equal(unsimulated, integer)  # plain fake quantization is not exact


def test_qat_bias_is_rounded_to_int32_grid_with_a_straight_through_gradient(loaders):
    train_loader, _ = loaders
    qnet = quantize_model(pretrained("net"), 4, qat=True)
    images = next(iter(train_loader))[0]
    qnet(images).sum().backward()
    fc = qnet.layers[-1]
    assert fc.fc.bias.grad is not None and fc.fc.bias.grad.abs().sum() > 0
    # the forward uses the bias on the grid S_x * S_w: any bias within 0.3 of a step of the same
    # grid point gives the same output
    qnet.eval()
    with torch.no_grad():
        step = fc.q_w.scale * fc.input_qparam().scale
        grid = torch.round(fc.fc.bias * (1.0 / step))
        outputs = []
        for offset in (-0.3, 0.0, 0.3):
            fc.fc.bias.copy_((grid + offset) * step)
            outputs.append(qnet(images))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])
