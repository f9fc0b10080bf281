import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst

import quantlab
from quantlab import adaround as adaround_module
from quantlab import ptq
from quantlab.data import embedded_split
from quantlab.reference import ao_unavailable_reason, torch_ao_available, torch_quantized_model
from quantlab.training import pretrained

needs_ao = pytest.mark.skipif(not torch_ao_available(), reason=ao_unavailable_reason() or "ok")


@pytest.fixture(scope="module")
def data():
    x_tr, y_tr, x_te, y_te = embedded_split()
    return x_tr[:128], x_te[:200], y_te[:200]


def test_equalize_keeps_the_function_and_equalizes_grouped_ranges(data):
    calib, test, _ = data
    net = pretrained("net").eval()
    eq = ptq.equalize(net)
    with torch.no_grad():
        assert torch.allclose(net(test), eq(test), atol=1e-4, rtol=1e-4)
    r1 = eq.conv1.weight.abs().flatten(1).amax(1)
    r2 = ptq.input_channel_ranges(eq.conv2)
    assert torch.allclose(r1, r2, rtol=1e-5)
    before = net.conv1.weight.abs().flatten(1).amax(1)
    assert (before.max() / before.min()) > (r1.max() / r1.min())  # ranges closer together


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_equalize_pair_with_groups_is_exact_in_float(groups):
    torch.manual_seed(groups)
    c1, c2 = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3, groups=groups)
    with torch.no_grad():
        c1.weight[2] *= 50  # a channel with a far larger range
    x = torch.randn(2, 3, 9, 9)
    want = c2(torch.relu(c1(x)))
    s = ptq.equalize_pair(c1, c2)
    assert torch.all(s > 0)
    assert torch.allclose(c2(torch.relu(c1(x))), want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(c1.weight.abs().flatten(1).amax(1), ptq.input_channel_ranges(c2), rtol=1e-5)


def test_fold_batchnorm_gives_the_same_integers_as_qconvbnrelu(data):
    calib, test, _ = data
    netbn = pretrained("netbn")
    a = quantlab.quantize_model(netbn, 4).calibrate([calib]).freeze()
    b = quantlab.quantize_model(ptq.fold_batchnorm(netbn), 4).calibrate([calib]).freeze()
    q = a.q_in.quantize_tensor(test)
    assert torch.equal(a.integer_inference(q), b.integer_inference(q))


@pytest.mark.parametrize("name", ["net", "netbn"])
def test_bias_correction_removes_the_weights_mean_shift(data, name):
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained(name), 3).calibrate([calib])
    conv1 = qnet.layers[0]
    w_float, b_old = (t.detach().clone() for t in conv1.float_weight_bias())
    x_q = conv1.q_in.fake_quantize(calib)

    def shift():  # mean over images and positions of float-weight output - integer-weight output
        w, b = conv1.float_weight_bias()
        with torch.no_grad():
            return (conv1._op(x_q, w_float, b_old) - conv1._op(x_q, conv1.q_w.fake_quantize(w), b)
                    ).mean((0, 2, 3))

    before = shift()
    deltas = ptq.bias_correction(qnet, calib)
    assert torch.allclose(deltas[0], before, atol=1e-6)
    assert before.abs().max() > 1e-3
    assert shift().abs().max() < 1e-3 * before.abs().max()  # the mean shift is gone


@pytest.fixture(scope="module", params=["net", "netbn"])
def rounded(request, data):
    """3-bit mse/mse models after AdaRound (10 steps) and bias correction, frozen: Net after
    cross-layer equalization, NetBN as is (its QConvBNReLU layers)."""
    calib, _, _ = data
    net = pretrained(request.param)
    if request.param == "net":
        net = ptq.equalize(net)
    qnet = quantlab.quantize_model(net, 3, weight_observer="mse", observer="mse").calibrate([calib])
    stats = ptq.adaround(qnet, calib, iterations=10, batch_size=32)
    ptq.bias_correction(qnet, calib)
    return qnet.freeze(), stats


def test_adaround_gives_integer_weights_next_to_the_float_ones(rounded):
    qnet, stats = rounded
    for i, st in stats.items():
        layer = qnet.layers[i]
        assert torch.equal(layer.weight_int, st["weight_int"])  # freeze keeps AdaRound's choice
        floor = torch.floor(st["scaled"]).to(torch.int32)
        lo, hi = layer.q_w.quant_min, layer.q_w.quant_max
        inside = (floor >= lo) & (floor + 1 <= hi)
        w = layer.weight_int[inside]
        assert torch.all((w == floor[inside]) | (w == floor[inside] + 1))  # up or down only
    assert sum(st["changed"] for st in stats.values()) > 0  # some differ from nearest rounding


@needs_ao
def test_adaround_cle_bias_corrected_models_are_bit_exact_with_qnnpack(rounded, data):
    _, test, _ = data
    qnet, _ = rounded
    q = qnet.q_in.quantize_tensor(test)
    assert torch.equal(qnet.integer_inference(q), torch_quantized_model(qnet, "qnnpack").integer_inference(q))


def test_adaround_cle_bias_corrected_models_are_bit_exact_with_onnxruntime(rounded, data):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from quantlab.export import to_onnx

    _, test, _ = data
    qnet = copy.deepcopy(rounded[0]).freeze(multiplier="onnxruntime")  # ORT's multiplier formula
    q = qnet.q_in.quantize_tensor(test)
    s = ort.InferenceSession(to_onnx(qnet, input_dtype="uint8").SerializeToString(),
                             providers=["CPUExecutionProvider"])
    theirs = s.run(["y_q"], {"x_q": q.numpy().astype(np.uint8)})[0]
    assert np.array_equal(theirs.astype(np.int32), qnet.integer_inference(q).numpy())


def test_adaround_lowers_the_layer_reconstruction_error(data):
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained("net"), 2, weight_observer="mse").calibrate([calib])
    fc = qnet.layers[5]
    with torch.no_grad():
        x_f = ptq._layer_input(qnet, calib, 5, ptq._float_compute)
        x_q = ptq._layer_input(qnet, calib, 5)
    w, b = fc.float_weight_bias()
    with torch.no_grad():
        target = fc._op(x_f, w, b)
        nearest = (fc._op(x_q, fc.q_w.fake_quantize(w), b) - target).pow(2).mean()
    ptq.adaround_layer(fc, x_q, x_f, iterations=100, batch_size=32,
                       generator=torch.Generator().manual_seed(0))
    w2, _ = fc.float_weight_bias()
    with torch.no_grad():
        learned = (fc._op(x_q, w2, b) - target).pow(2).mean()
    assert learned < 0.9 * nearest


@pytest.mark.parametrize("name", ["net", "netbn"])
def test_adaround_targets_stay_the_float_models_after_earlier_layers_are_rounded(data, name,
                                                                                  monkeypatch):
    # asymmetric reconstruction: each layer learns to map the quantized model's input to the
    # float model's output; once conv1 is rounded (its weight pinned), conv2's and fc's targets
    # must still come from the float conv1, not the rounded one
    calib, _, _ = data
    net = pretrained(name).eval()
    qnet = quantlab.quantize_model(net, 2, weight_observer="mse").calibrate([calib])
    seen, real = {}, ptq.adaround_layer

    def spy(layer, x_q, x_f, *args, **kwargs):
        seen[next(i for i, m in enumerate(qnet.layers) if m is layer)] = x_f.clone()
        return real(layer, x_q, x_f, *args, **kwargs)

    monkeypatch.setattr(adaround_module, "adaround_layer", spy)  # adaround() looks it up in its module
    ptq.adaround(qnet, calib, iterations=5, batch_size=32)
    f = net if name == "net" else ptq.fold_batchnorm(net)
    with torch.no_grad():
        a1 = F.max_pool2d(F.relu(f.conv1(calib)), 2, 2)
        a2 = torch.flatten(F.max_pool2d(F.relu(f.conv2(a1)), 2, 2), 1)
    assert sorted(seen) == [0, 2, 5]
    assert not torch.equal(qnet.layers[0].float_weight_bias()[0], f.conv1.weight)  # pinned
    torch.testing.assert_close(seen[2], a1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[5], a2, rtol=1e-5, atol=1e-5)


def test_adaround_of_chosen_layers_leaves_the_others_nearest(data):
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained("net"), 2).calibrate([calib])
    stats = ptq.adaround(qnet, calib, iterations=5, layers=[5])
    assert list(stats) == [5]
    assert qnet.layers[5].q_w.observing is False and qnet.layers[0].q_w.observing is True
    with pytest.raises(ValueError, match="layers"):
        ptq.adaround(qnet, calib, iterations=1, layers=[1])


@settings(max_examples=50, deadline=None)
@given(hst.lists(hst.floats(-6.0, 6.0, allow_nan=False, width=32), min_size=1, max_size=64),
       hst.sampled_from([(-2, 1), (-8, 7), (-128, 127)]))
def test_adaround_starts_at_w_between_the_levels_and_at_the_clamp_beyond(values, grid):
    lo, hi = grid
    scaled = torch.tensor(values, dtype=torch.float32)
    v0 = adaround_module._initial_v(scaled)
    start = adaround_module._soft_weight(scaled, v0, 1.0, 0.0, lo, hi)
    inside = (scaled >= lo) & (scaled <= hi)
    assert ((start - scaled).abs()[inside] <= 1e-4 + 1e-6).all()        # W~ = W between the levels
    beyond = start[~inside]
    assert ((beyond == lo) | (beyond == hi)).all()                       # the clamp beyond them ...
    moved = adaround_module._soft_weight(scaled, torch.randn(scaled.shape) * 5, 1.0, 0.0, lo, hi)
    assert torch.equal(moved[~inside], beyond)                           # ... whatever V becomes


def test_rectified_sigmoid_reaches_zero_and_one():
    h = ptq.rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert h[0] == 0.0 and h[2] == 1.0 and abs(float(h[1]) - 0.5) < 1e-6


def test_ptq_errors(data):
    calib, _, _ = data
    with pytest.raises(TypeError, match="QuantizedNet"):
        ptq.adaround(pretrained("net"), calib)
    with pytest.raises(RuntimeError, match="calibrated"):
        ptq.bias_correction(quantlab.quantize_model(pretrained("net"), 4), calib)
    qnet = quantlab.quantize_model(pretrained("net"), 4).calibrate([calib])
    with pytest.raises(ValueError, match="iterations"):
        ptq.adaround(qnet, calib, iterations=-1)
    with pytest.raises(TypeError, match="iterations"):
        ptq.adaround(qnet, calib, iterations=1.5)
    with pytest.raises(TypeError, match="NetBN"):
        ptq.fold_batchnorm(pretrained("net"))
    with pytest.raises(TypeError, match="data"):
        ptq.adaround(qnet, [torch.zeros(3, dtype=torch.int32)])
    qnet.freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        ptq.adaround(qnet, calib)


class _Branches(torch.nn.Module):
    """Parallel branches (a concatenation) and a residual add: not a chain of layers."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.a = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 1)
        self.mix = torch.nn.Conv2d(8, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        y = F.relu(self.mix(y) + x)                                # residual add
        return self.fc(F.max_pool2d(y, 2).flatten(1))

    def inputs(self, x):
        """The float model's input to each conv/linear, by name."""
        x0 = x
        x = F.max_pool2d(F.relu(self.stem(x0)), 2)
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        z = F.max_pool2d(F.relu(self.mix(y) + x), 2).flatten(1)
        return {"stem": x0, "a": x, "b": x, "mix": y, "fc": z}


def _name_in(net, layer):
    """The float model's name of a quantized layer's conv/linear (biases are unchanged copies)."""
    mod = getattr(layer, "conv", None) or layer.fc
    return next(n for n in ("stem", "a", "b", "mix", "fc") if torch.equal(mod.bias, getattr(net, n).bias))


def test_bias_correction_follows_the_graph_on_branches_and_adds(data):
    # each layer's correction uses the input the graph gives it (its own branch's), measured
    # here with a forward pre-hook on the layer while the quantized model runs
    calib, _, _ = data
    torch.manual_seed(0)
    net = _Branches().eval()
    qnet = quantlab.quantize_model(net, 4).calibrate([calib])
    ref = copy.deepcopy(qnet).eval()
    deltas = ptq.bias_correction(qnet, calib)
    assert len(deltas) == 5
    for i, delta in deltas.items():       # redo each correction in order on the copy, by hook
        layer = ref.layers[i]
        seen = []
        handle = layer.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            ref(calib)
        handle.remove()
        x_in = layer.q_in.fake_quantize(seen[0]) if layer.qi else seen[0]
        w, _ = layer.float_weight_bias()
        with torch.no_grad():
            want = (layer._op(x_in, w, None) - layer._op(x_in, layer.q_w.fake_quantize(w), None))
            want = want.mean([d for d in range(want.dim()) if d != 1])
            torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)
            bias = layer.conv.bias if hasattr(layer, "conv") else layer.fc.bias
            bias.add_(want)


def test_adaround_follows_the_graph_on_branches_and_adds(data, monkeypatch):
    # AdaRound's float targets are the float model's inputs to each layer (branch by branch),
    # and it runs through residual adds and concatenations
    calib, _, _ = data
    torch.manual_seed(0)
    net = _Branches().eval()
    qnet = quantlab.quantize_model(net, 4).calibrate([calib])
    seen, real = {}, ptq.adaround_layer

    def spy(layer, x_q, x_f, *args, **kwargs):
        seen[layer] = x_f.clone()
        return real(layer, x_q, x_f, *args, **kwargs)

    monkeypatch.setattr(ptq, "adaround_layer", spy)
    stats = ptq.adaround(qnet, calib, iterations=3, batch_size=32)
    assert len(stats) == 5
    with torch.no_grad():
        want = net.inputs(calib)
    for layer, x_f in seen.items():
        torch.testing.assert_close(x_f, want[_name_in(net, layer)], rtol=1e-5, atol=1e-5)
    qnet.freeze()
    q_x = qnet.q_in.quantize_tensor(calib)
    assert qnet.integer_inference(q_x).shape == (len(calib), 10)


def test_recalibrate_reinitialises_learned_steps(data):
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained("net"), 4, qat=True, learn_ranges=True)
    qnet.calibrate([calib])
    before = float(qnet.layers[0].q_out.scale)
    ptq.recalibrate(qnet, [calib * 0.5])             # crashed: LearnedQParam has no min_val setter
    assert float(qnet.layers[0].q_out.scale) < before


def test_a_failed_recalibrate_keeps_a_frozen_models_ranges(data):
    calib, test, _ = data
    qnet = quantlab.quantize_model(pretrained("net")).calibrate([calib]).freeze()
    q_x = qnet.q_in.quantize_tensor(test)
    want = qnet.integer_inference(q_x)
    with pytest.raises(ValueError, match="batch of images of shape"):
        ptq.recalibrate(qnet, [calib[:, :, :27, :27]])
    assert qnet.frozen and torch.equal(qnet.integer_inference(q_x), want)


@pytest.mark.parametrize("name", ["net", "netbn"])
def test_float_model_bias_correction_removes_the_whole_mean_shift(data, name):
    """reference="float_model": after correcting layer k, its mean pre-activation on the quantized
    model's inputs equals the float model's on the float inputs (per channel)."""
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained(name), 2, weight_observer="mse").calibrate([calib])
    deltas = ptq.bias_correction(qnet, calib, reference="float_model")
    for i, layer in ptq._weighted_steps(qnet):
        with torch.no_grad():
            x_q = ptq._quant_input(layer, ptq._layer_input(qnet, calib, i))
            x_f = ptq._layer_input(qnet, calib, i, ptq._float_compute)
            w, b = layer.float_weight_bias()
            w_f, b_f = ptq._float_weight_bias(layer)
            dims = [0, 2, 3] if x_q.dim() == 4 else [0]
            gap = (layer._op(x_f, w_f, b_f) - layer._op(x_q, layer.q_w.fake_quantize(w), b)).mean(dims)
        assert deltas[i].abs().max() > 1e-3                  # there was a shift to remove
        assert gap.abs().max() < 1e-4 * max(1.0, float(b_f.abs().max()))
        # the float path keeps the float bias (later layers' references are the float model's)
        assert not torch.equal(b, b_f)
    with pytest.raises(ValueError, match="reference"):
        ptq.bias_correction(qnet, calib, reference="float")


def test_layer_hessian_of_a_conv_is_its_im2col_gram_matrix(data):
    """H = 2 X^T X / N from F.unfold's columns, one block per group; the conv of x with w equals
    the columns times w's rows (so H is the Hessian of the layer's squared output error)."""
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained("net"), 4).calibrate([calib])
    conv2 = qnet.layers[2]
    x = torch.relu(torch.randn(6, 40, 13, 13, dtype=torch.float64))
    h = ptq.layer_hessian(conv2, x)
    assert h.shape == (20, 18, 18)
    cols = ptq.input_columns(conv2, x)                      # (groups, N L, 18)
    w = conv2.conv.weight.detach().double()
    y = F.conv2d(x, w, None, groups=20)                      # (6, 40, 11, 11)
    for g in range(20):
        rows = w[2 * g:2 * g + 2].reshape(2, -1)
        mine = (cols[g] @ rows.T).reshape(6, 121, 2).permute(0, 2, 1).reshape(6, 2, 11, 11)
        assert torch.allclose(mine, y[:, 2 * g:2 * g + 2], atol=1e-10)
        assert torch.allclose(h[g], 2 * cols[g].T @ cols[g] / cols.shape[1])


@pytest.mark.parametrize("index", [0, 2, 5])
def test_gptq_layer_lowers_the_output_error_below_nearest(data, index):
    calib, _, _ = data
    qnet = quantlab.quantize_model(pretrained("net"), 2, weight_observer="mse").calibrate([calib])
    layer = qnet.layers[index]
    with torch.no_grad():
        x_in = ptq._quant_input(layer, ptq._layer_input(qnet, calib, index))
    w = layer.float_weight_bias()[0].detach().clone()
    layer.q_w.update(w)
    with torch.no_grad():
        nearest = (layer._op(x_in, layer.q_w.fake_quantize(w), None) - layer._op(x_in, w, None))
    stats = ptq.gptq_layer(layer, x_in)
    w_q = layer.float_weight_bias()[0].detach()
    with torch.no_grad():
        err = layer._op(x_in, w_q, None) - layer._op(x_in, w, None)
    assert err.pow(2).sum() < 0.9 * nearest.pow(2).sum()
    assert stats["changed"] > 0
    # the rounded weight lies on the weight QParam's grid: freeze() keeps exactly these integers
    assert torch.equal(layer.q_w.quantize_tensor(w_q), stats["weight_int"])
    assert int(stats["weight_int"].min()) >= layer.q_w.quant_min
    assert int(stats["weight_int"].max()) <= layer.q_w.quant_max


def test_gptq_on_grid_with_identity_hessian_is_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 18, generator=g)
    scale = w.abs().amax(1) / 1.5
    zp = torch.zeros(8, dtype=torch.int32)
    from quantlab.gptq import gptq_on_grid
    q = gptq_on_grid(w, torch.eye(18, dtype=torch.float64), scale, zp, -2, 1)
    assert torch.equal(q, torch.clamp(torch.round(w * (1.0 / scale[:, None])), -2, 1).to(torch.int32))


@pytest.mark.parametrize("rounding", ["adaround", "gptq", "nearest"])
def test_layer_by_layer_observes_each_range_after_its_layer_and_freezes(data, rounding):
    calib, x_te, _ = data
    qnet = quantlab.quantize_model(pretrained("netbn"), 2, weight_observer="mse",
                                   observer="mse").calibrate([calib])
    options = {"batch_size": 32} if rounding == "adaround" else {}
    stats = ptq.layer_by_layer(qnet, calib, rounding=rounding, iterations=5, **options)
    assert sorted(stats) == [0, 2, 5] and all(s["delta"] is not None for s in stats.values())
    # the ranges are those of the final (rounded, corrected) model: observing again moves nothing
    scales = [float(qnet.layers[i].q_out.scale) for i in (0, 2, 5)]
    ptq.recalibrate(qnet, calib.split(500))
    assert scales == [float(qnet.layers[i].q_out.scale) for i in (0, 2, 5)]
    qnet.freeze()
    if rounding != "nearest":
        for i in (0, 2, 5):
            assert torch.equal(qnet.layers[i].weight_int, stats[i]["weight_int"])
    with pytest.raises(ValueError, match="rounding"):
        ptq.layer_by_layer(quantlab.quantize_model(pretrained("net"), 2).calibrate([calib]),
                           calib, rounding="rtn")
    if rounding != "adaround":  # AdaRound's options are refused, not silently ignored
        with pytest.raises(TypeError, match="batch_size: AdaRound's options"):
            ptq.layer_by_layer(qnet, calib, rounding=rounding, batch_size=32)
