"""Bad inputs to the surfaces added after the core (ops, learned steps, PTQ): each raises
TypeError/ValueError naming the argument, instead of computing silently wrong integers."""

import math

import torch
from bad_input import bad_input_test

import quantlab
import quantlab.data
import quantlab.engine
import quantlab.explorer
import quantlab.export
import quantlab.npz
import quantlab.reference
from quantlab import ptq
from quantlab.learned import LearnedQParam, lsq_fake_quantize, lsq_grad_scale, pact_fake_quantize
from quantlab.ops import avg_pool_requantize, requantize_to
from quantlab.training import pretrained

T, V = TypeError, ValueError
Q = torch.tensor([[3, 200, 17]], dtype=torch.int32)
X = torch.randn(4, 3)
S = torch.tensor(0.1)
ACC = torch.tensor([[6.0, -3.0]])
NAN, INF = float("nan"), float("inf")

torch.manual_seed(0)
_IMAGES = torch.rand(16, 1, 28, 28)
QNET = quantlab.quantize_model(pretrained("net"), 4).calibrate([_IMAGES])


def _adaround(**kw):
    return ptq.adaround(QNET, _IMAGES, iterations=1, **kw)


def _adaround_layer(**kw):
    layer = QNET.layers[0]
    x = layer.q_in.fake_quantize(_IMAGES[:4])
    return ptq.adaround_layer(layer, x, _IMAGES[:4], iterations=1, **kw)


CASES = {
    "requantize_to": [
        (lambda: requantize_to(Q, 0.0, 0, 0.1, 0, 0, 255), V, "scale_x"),
        (lambda: requantize_to(Q, NAN, 0, 0.1, 0, 0, 255), V, "scale_x"),
        (lambda: requantize_to(Q, -0.1, 0, 0.1, 0, 0, 255), V, "scale_x"),
        (lambda: requantize_to(Q, 1e-45, 0, 0.1, 0, 0, 255), V, "scale_x"),
        (lambda: requantize_to(Q, "0.1", 0, 0.1, 0, 0, 255), T, "scale_x"),
        (lambda: requantize_to(Q, 0.1, 0, 0.0, 0, 0, 255), V, "scale_y"),
        (lambda: requantize_to(Q, 0.1, 0, INF, 0, 0, 255), V, "scale_y"),
        (lambda: requantize_to(Q, 0.1, 0.5, 0.1, 0, 0, 255), T, "zero_point_x"),
        (lambda: requantize_to(Q, 0.1, 0, 0.1, None, 0, 255), T, "zero_point_y"),
        (lambda: requantize_to(Q, 0.1, 0, 0.1, 0, 255, 0), V, "quant_min"),
        (lambda: requantize_to(Q.float(), 0.1, 0, 0.1, 0, 0, 255), T, "q_x"),
    ],
    "avg_pool_requantize": [
        (lambda: avg_pool_requantize(ACC, 0, 0.1, 0.1, 0, 0, 255), V, "count"),
        (lambda: avg_pool_requantize(ACC, NAN, 0.1, 0.1, 0, 0, 255), V, "count"),
        (lambda: avg_pool_requantize(ACC, torch.tensor([4.0, -1.0]), 0.1, 0.1, 0, 0, 255), V, "count"),
        (lambda: avg_pool_requantize(torch.tensor([NAN]), 4, 0.1, 0.1, 0, 0, 255), V, "acc"),
        (lambda: avg_pool_requantize([6.0], 4, 0.1, 0.1, 0, 0, 255), T, "acc"),
        (lambda: avg_pool_requantize(ACC, 4, 0.0, 0.1, 0, 0, 255), V, "scale_x"),
        (lambda: avg_pool_requantize(ACC, 4, 0.1, NAN, 0, 0, 255), V, "scale_y"),
        (lambda: avg_pool_requantize(ACC, 4, 0.1, 0.1, 0, 0, 0), V, "quant_min"),
        (lambda: avg_pool_requantize(ACC, 4, 0.1, 0.1, 0, 0, 255, "fast"), V, "formula"),
    ],
    "lsq_fake_quantize": [
        (lambda: lsq_fake_quantize(X, torch.tensor(0.0), 0, -8, 7), V, "scale"),
        (lambda: lsq_fake_quantize(X, torch.tensor(NAN), 0, -8, 7), V, "scale"),
        (lambda: lsq_fake_quantize(X, torch.tensor(INF), 0, -8, 7), V, "scale"),
        (lambda: lsq_fake_quantize(X, torch.tensor(1e-45), 0, -8, 7), V, "scale"),
        (lambda: lsq_fake_quantize(X, torch.tensor(-0.1), 0, -8, 7), V, "scale"),
        (lambda: lsq_fake_quantize(X, 0.1, 0, -8, 7), T, "scale"),
        (lambda: lsq_fake_quantize(X, S, 0, -8, 7, grad_scale=NAN), V, "grad_scale"),
        (lambda: lsq_fake_quantize(X, S, 0, -8, 7, grad_scale=INF), V, "grad_scale"),
        (lambda: lsq_fake_quantize(X, S, 0, -8, 7, grad_scale=0.0), V, "grad_scale"),
        (lambda: lsq_fake_quantize(X, S, 0, 7, -8), V, "quant_min"),
        (lambda: lsq_fake_quantize(X, S, 0, -8.0, 7), T, "quant_min"),
    ],
    "pact_fake_quantize": [
        (lambda: pact_fake_quantize(X, torch.tensor(0.0), 15), V, "alpha"),
        (lambda: pact_fake_quantize(X, torch.tensor(-1.0), 15), V, "alpha"),
        (lambda: pact_fake_quantize(X, torch.tensor(NAN), 15), V, "alpha"),
        (lambda: pact_fake_quantize(X, 1.0, 15), T, "alpha"),
        (lambda: pact_fake_quantize(X, torch.tensor([1.0, 2.0]), 15), T, "alpha"),
        (lambda: pact_fake_quantize(X, torch.tensor(1.0), 0), V, "quant_max"),
        (lambda: pact_fake_quantize(X, torch.tensor(1.0), -3), V, "quant_max"),
        (lambda: pact_fake_quantize(X, torch.tensor(1.0), 1.5), T, "quant_max"),
    ],
    "lsq_grad_scale": [
        (lambda: lsq_grad_scale(NAN, 7), T, "num_values"),
        (lambda: lsq_grad_scale(0, 7), V, "num_values"),
        (lambda: lsq_grad_scale(-5, 7), V, "num_values"),
        (lambda: lsq_grad_scale(100, NAN), T, "quant_max_above_zero"),
        (lambda: lsq_grad_scale(100, -1), V, "quant_max_above_zero"),
    ],
    "LearnedQParam.load_state_dict": [
        (lambda: LearnedQParam(4).load_state_dict(
            {**LearnedQParam(4).state_dict(), "learned": torch.tensor(NAN)}), RuntimeError, "learned"),
        (lambda: LearnedQParam(4).load_state_dict(
            {**LearnedQParam(4).state_dict(), "learned": torch.tensor(-0.5)}), RuntimeError, "learned"),
    ],
    "adaround": [
        (lambda: _adaround(reg=NAN), V, "reg"),
        (lambda: _adaround(reg=-1.0), V, "reg"),
        (lambda: _adaround(lr=INF), V, "lr"),
        (lambda: _adaround(lr=0.0), V, "lr"),
        (lambda: _adaround(batch_size=0), V, "batch_size"),
        (lambda: _adaround(batch_size=True), T, "batch_size"),
        (lambda: _adaround(beta_range=(2.0, 20.0)), V, "beta_range"),
        (lambda: _adaround(beta_range=(20.0, NAN)), V, "beta_range[1]"),
        (lambda: _adaround(beta_range=20.0), T, "beta_range"),
        (lambda: _adaround(warm_start=1.5), V, "warm_start"),
        (lambda: _adaround(max_images=0), V, "max_images"),
        (lambda: _adaround(max_images=-5), V, "max_images"),
        (lambda: _adaround(max_images=True), T, "max_images"),
        (lambda: _adaround_layer(reg=NAN), V, "reg"),
        (lambda: ptq.adaround_layer(QNET.layers[1], X, X), T, "layer"),
    ],
    "bias_correction": [
        (lambda: ptq.bias_correction(QNET, _IMAGES, max_images=0), V, "max_images"),
        (lambda: ptq.bias_correction(QNET, _IMAGES, max_images=-5), V, "max_images"),
        (lambda: ptq.bias_correction(QNET, _IMAGES, max_images=True), T, "max_images"),
    ],
    "quantize_model(example_input=...)": [
        (lambda: _qm(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)), T, "example_input"),
        (lambda: _qm(torch.zeros(1, 1, 28, 28, dtype=torch.int64)), T, "example_input"),
        (lambda: _qm(torch.zeros(1, 1, 28, 28, dtype=torch.bool)), T, "example_input"),
        (lambda: _qm(torch.zeros(1, 1, 28, 28, dtype=torch.complex64)), T, "example_input"),
        (lambda: _qm(torch.zeros(0, 1, 28, 28)), V, "example_input"),
        (lambda: _qm(torch.zeros(28)), V, "example_input"),
        (lambda: _qm(torch.full((1, 1, 28, 28), NAN)), V, "example_input"),
        (lambda: _qm(torch.full((1, 1, 28, 28), INF)), V, "example_input"),
        (lambda: _qm([[0.0]]), T, "example_input"),
        (lambda: _qm((torch.zeros(1, 1, 28, 28),)), T, "example_input"),
        (lambda: _qm(torch.zeros(1, 3, 28, 28)), quantlab.UnsupportedModelError, "example input"),
        (lambda: _qm(torch.zeros(1, 1, 20, 20)), quantlab.UnsupportedModelError, "example input"),
    ],
    # the public helpers of the newer modules, found by calling each with wrong kinds of values
    "helpers": [
        (lambda: quantlab.engine.quantize_multiplier(-0.5), V, "multiplier"),
        (lambda: quantlab.engine.quantize_multiplier(NAN), V, "multiplier"),
        (lambda: quantlab.engine.quantize_multiplier("0.5"), V, "multiplier"),
        (lambda: quantlab.export.multiplier_formula(QNET), T, "layer"),
        (lambda: quantlab.export.multiplier_formula(None), T, "layer"),
        (lambda: ptq.input_channel_ranges(torch.nn.Linear(2, 3)), T, "conv"),
        (lambda: quantlab.reference.narrow(torch.zeros(2), QNET.layers[0].q_out), T, "x"),
        (lambda: quantlab.reference.x86_conv_kernel("conv1"), T, "layer"),
        (lambda: quantlab.npz.graph(None), T, "arrays"),
        (lambda: quantlab.npz.read(None), T, "path"),
        (lambda: quantlab.npz.write(3, {}), T, "path"),
        (lambda: quantlab.npz.write("/nonexistent/x.npz", [1, 2]), T, "arrays"),
        (lambda: quantlab.npz.write_atomically("/tmp/never.bin", None), T, "write_to"),
        (lambda: quantlab.explorer.report(None), T, "result"),
        (lambda: quantlab.explorer.explore(X, quantlab.explorer.Setting(per_channel=True), ch_axis=2),
         V, "ch_axis"),
        (lambda: quantlab.explorer.explore(X, ch_axis="0"), V, "ch_axis"),
        (lambda: quantlab.data.check_idx_file("x", "pixels"), V, "kind"),
        (lambda: quantlab.training.tensors_sha256([1]), T, "state"),
        (lambda: quantlab.training.model_config(None), T, "model"),
        (lambda: quantlab.training.save_checkpoint(QNET, None), T, "path"),
    ],
}


def _qm(example_input):
    return quantlab.quantize_model(pretrained("net"), 8, example_input=example_input)


test_bad_input_raises_naming_the_argument = bad_input_test(CASES)


def test_the_checks_accept_what_the_layers_use():
    # the smallest normal float32 is a scale; a learned step clamped at MIN_STEP is too
    assert requantize_to(Q, 1.2e-38, 0, 1.0, 0, 0, 255).dtype == torch.int32
    y = lsq_fake_quantize(X, torch.tensor(1e-8), 0, -8, 7)
    assert torch.isfinite(y).all()
    assert math.isclose(lsq_grad_scale(100, 7), 1 / math.sqrt(700))

