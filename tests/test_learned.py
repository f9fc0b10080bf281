"""Learned ranges (quantlab.learned): LSQ and PACT gradients against the papers' formulas and an
independent autograd formulation, initialisation, freeze to ordinary scales, the integer model
against qnnpack and ONNX Runtime, fake-quant/integer agreement, and argument checks."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.data import embedded_split
from quantlab.learned import (
    LEARN_RANGES,
    LearnedQParam,
    lsq_fake_quantize,
    lsq_grad_scale,
    pact_fake_quantize,
)
from quantlab.models import quantize_model
from quantlab.quantize import fake_quantize
from quantlab.reference import ao_unavailable_reason, torch_ao_available, torch_quantized_model
from quantlab.training import pretrained, train

needs_qnnpack = pytest.mark.skipif(not torch_ao_available(), reason=ao_unavailable_reason())


def lsq_by_hand(x, s, z, qmin, qmax, g, upstream):
    """LSQ's value and gradients in float64 NumPy, straight from the paper's equations
    (Esser et al. 2020, eq. 1-3, with a zero point: -Q_n = qmin - Z, Q_p = qmax - Z)."""
    x, s, upstream = (np.asarray(a, dtype=np.float64) for a in (x, s, upstream))
    t = x / s
    low, high = qmin - z, qmax - z
    value = s * np.clip(np.round(t), low, high)
    inside = (t > low) & (t < high)
    ds = np.where(inside, np.round(t) - t, np.where(t <= low, low, high))
    return value, upstream * inside, float(np.sum(upstream * ds) * g)


def lsq_reference(x, s, z, qmin, qmax, g):
    """The paper's reference code (Appendix): grad_scale and round_pass by detach tricks."""
    s_scaled = (s - s * g).detach() + s * g               # value s, gradient scaled by g
    t = torch.clamp(x / s_scaled + z, qmin, qmax) - z
    t = (torch.round(t) - t).detach() + t                # round_pass
    return t * s_scaled


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.floats(0.01, 2.0), st.integers(0, 2**31 - 1))
def test_lsq_gradient_equals_the_papers_formula(num_bits, signed, step, seed):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = (-(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1) if signed else (0, 2**num_bits - 1)
    z = 0 if signed else int(torch.randint(0, qmax + 1, (), generator=gen))
    x = torch.randn(200, generator=gen) * step * qmax / 2
    upstream = torch.randn(200, generator=gen)
    s = torch.tensor(step, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    g = lsq_grad_scale(x.numel(), qmax - z)
    y = lsq_fake_quantize(xr, s, torch.tensor(z), qmin, qmax, grad_scale=g)
    (y * upstream).sum().backward()
    value, dx, ds = lsq_by_hand(x.numpy(), step, z, qmin, qmax, g, upstream.numpy())
    # the forward is quantlab's fake quantization, bit for bit
    assert torch.equal(y.detach(), fake_quantize(x, torch.tensor(step), z, num_bits, signed))
    np.testing.assert_allclose(y.detach().numpy(), value, rtol=1e-6, atol=1e-6)
    inside_boundary = np.abs(x.numpy() / step - np.round(x.numpy() / step)) > 1e-4
    np.testing.assert_array_equal(xr.grad.numpy()[inside_boundary], dx[inside_boundary])
    assert s.grad.item() == pytest.approx(ds, rel=1e-4, abs=1e-5)


def test_lsq_matches_the_papers_reference_code_per_channel():
    # per output channel (axis 0) with the gradient scale of one channel's weights
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    steps = torch.rand(6, generator=gen) * 0.5 + 0.1
    upstream = torch.randn(w.shape, generator=gen)
    g = lsq_grad_scale(w[0].numel(), 1)
    a, b = steps.clone().requires_grad_(True), steps.clone().requires_grad_(True)
    wa, wb = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ya = lsq_fake_quantize(wa, a, torch.zeros(6, dtype=torch.int32), -2, 1, axis=0, grad_scale=g)
    yb = lsq_reference(wb, b.reshape(6, 1, 1, 1), 0, -2, 1, g)
    (ya * upstream).sum().backward()
    (yb * upstream).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    # the input gradient: 1 inside the range (the reference's is (1/s) * s), 0 outside
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-6, atol=0)
    assert bool((wa.grad == 0).any()) and bool((wa.grad != 0).any())


def test_lsq_step_gradient_against_a_finite_difference_of_the_surrogate():
    # LSQ differentiates s * round(clamp(x/s)) with round's derivative taken as 1: the central
    # difference of s * (clamp(x/s) + r) in float64, the rounding offsets r frozen, is its gradient
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, generator=gen, dtype=torch.float64)
    s0, h = 0.37, 1e-6
    t0 = torch.clamp(x / s0, -8, 7)
    r = torch.round(t0) - t0

    def surrogate(s):
        return ((torch.clamp(x / s, -8, 7) + r) * s).sum()

    fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    s = torch.tensor(s0, requires_grad=True)
    lsq_fake_quantize(x.float(), s, torch.tensor(0), -8, 7).sum().backward()
    assert s.grad.item() == pytest.approx(fd.item(), rel=1e-4)


def test_pact_clip_gradient_counts_the_clipped_values():
    x = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.7, 3.0], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    y = pact_fake_quantize(x, alpha, 3)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (y * upstream).sum().backward()
    # values on the grid alpha/3 * {0..3}, clipped at alpha
    torch.testing.assert_close(y, torch.tensor([0.0, 1 / 3, 1.0, 1.0, 1.0, 1.0]))
    assert alpha.grad.item() == 4.0 + 5.0 + 6.0           # d/d alpha = 1 where x >= alpha
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]  # straight through below alpha


def test_learned_qparam_initialises_from_its_observer_then_learns():
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(64, 8, 5, 5, generator=gen))
    q = LearnedQParam(2, observer="mse")
    q.train()
    q(x)                                                   # initialised by the MSE observer
    from quantlab.observer import QParam
    ref = QParam(2, observer="mse").update(x)
    assert torch.equal(q.scale, ref.scale) and int(q.zero_point) == 0
    assert q.max_val.item() == pytest.approx(3 * ref.scale.item())
    before = q.scale.clone()
    q(x * 5)                                               # learning now: the range stays
    assert torch.equal(q.scale, before)
    upstream = torch.randn(x.shape, generator=gen)
    (q(x) * upstream).sum().backward()
    g = lsq_grad_scale(8 * 5 * 5, 3)                       # N: the features of one image
    _, _, ds = lsq_by_hand(x.numpy(), before.item(), 0, 0, 3, g, upstream.numpy())
    assert q.learned.grad.item() == pytest.approx(ds, rel=1e-4)


def lsq_model(loaders, name, bits, learn=True, steps=6):
    """An LSQ model after calibration and a few training steps (steps moved off their init)."""
    train_loader, _ = loaders
    batches = [b for _, b in zip(range(steps), train_loader)]
    qnet = quantize_model(pretrained(name), bits, qat=True, learn_ranges=learn)
    qnet.calibrate(batches[:2])
    init = {n: p.detach().clone() for n, p in qnet.named_parameters() if n.endswith("learned")}
    train(qnet, batches, epochs=1, lr=3e-3, progress=False)
    moved = [n for n, p in qnet.named_parameters() if n.endswith("learned")
             and not torch.equal(p.detach(), init[n])]
    return qnet, init, moved


@pytest.fixture(scope="module")
def lsq2(loaders):
    qnet, init, moved = lsq_model(loaders, "net", 2)
    return qnet.freeze(), init, moved


def test_every_range_is_learned_and_moves(lsq2):
    qnet, init, moved = lsq2
    assert len(init) == 7          # the input, 3 weight tensors (per channel), 3 outputs
    assert sorted(moved) == sorted(init)


def test_freeze_turns_learned_steps_into_ordinary_scales(lsq2):
    qnet, _, _ = lsq2
    conv1, conv2, fc = qnet.layers[0], qnet.layers[2], qnet.layers[5]
    assert type(conv2.q_in).__name__ == "QParam"         # the copy of conv1's output: a plain one
    assert torch.equal(conv2.q_in.scale, conv1.q_out.learned.detach())
    assert torch.equal(fc.q_w.scale, fc.q_w.learned.detach())
    m = (conv1.q_w.scale * conv1.q_in.scale) * (1.0 / conv1.q_out.scale)
    assert torch.equal(conv1.multiplier, m)               # M from the learned steps


def test_training_after_freeze_makes_the_model_stale(loaders):
    qnet, _, _ = lsq_model(loaders, "net", 3, steps=2)
    qnet.freeze()
    assert qnet.frozen
    batches = [b for _, b in zip(range(1), loaders[0])]
    train(qnet, batches, epochs=1, progress=False)
    assert not qnet.frozen
    with pytest.raises(RuntimeError, match="freeze"):
        qnet.quantize_inference(batches[0][0])


def test_frozen_lsq_model_saves_and_loads(lsq2, tmp_path):
    from quantlab.training import load_checkpoint, save_checkpoint
    qnet, _, _ = lsq2
    save_checkpoint(qnet, tmp_path / "lsq.pt")
    other = quantize_model(pretrained("net"), 2, qat=True, learn_ranges=True)
    load_checkpoint(other, tmp_path / "lsq.pt")
    x = embedded_split()[2][:50]
    assert torch.equal(other.quantize_inference(x), qnet.quantize_inference(x))


@needs_qnnpack
def test_2bit_lsq_integers_equal_qnnpack(lsq2):
    qnet, _, _ = lsq2
    x = embedded_split()[2][:300]
    q_x = qnet.q_in.quantize_tensor(x)
    assert torch.equal(torch_quantized_model(qnet, "qnnpack").integer_inference(q_x),
                       qnet.integer_inference(q_x))


def test_2bit_lsq_integers_equal_onnxruntime(lsq2):
    ort = pytest.importorskip("onnxruntime")
    from quantlab.export import to_onnx
    qnet, _, _ = lsq2
    same = copy.deepcopy(qnet).freeze(multiplier="onnxruntime")
    x = embedded_split()[2][:300]
    q_x = same.q_in.quantize_tensor(x)
    s = ort.InferenceSession(to_onnx(same, input_dtype="uint8").SerializeToString(),
                             providers=["CPUExecutionProvider"])
    theirs = s.run(["y_q"], {"x_q": q_x.numpy().astype(np.uint8)})[0]
    assert np.array_equal(theirs, same.integer_inference(q_x).numpy())


@pytest.mark.parametrize("name, bits, learn", [("net", 2, True), ("netbn", 3, True),
                                               ("net", 4, True), ("netbn", 2, "pact")])
def test_fake_quant_predictions_equal_the_integer_models(loaders, name, bits, learn):
    # the QAT forward simulates the int32 bias and requantization: on the 1,000 embedded test
    # digits the fake-quantized model predicts what the frozen integer model predicts
    qnet, _, moved = lsq_model(loaders, name, bits, learn, steps=3)
    assert moved
    images, _ = next(iter(loaders[1]))
    qnet.eval()
    with torch.no_grad():
        fake = qnet(images)
    qnet.freeze()
    integer = qnet.quantize_inference(images)
    assert (fake.argmax(1) == integer.argmax(1)).float().mean() >= 0.9995
    assert torch.equal(fake, integer)                     # in fact every logit


def test_pact_learns_the_conv_output_clips(loaders):
    qnet = quantize_model(pretrained("net"), 2, qat=True, learn_ranges="pact")
    methods = [(q.method, q.learned.numel()) for q in (qnet.layers[0].q_out, qnet.layers[2].q_out,
                                                       qnet.layers[5].q_out, qnet.layers[0].q_w)]
    assert [m for m, _ in methods] == ["pact", "pact", "lsq", "lsq"]


@pytest.mark.parametrize("bad", ["LSQ", "minmax", 1, None, 0.5])
def test_learn_ranges_is_validated(bad):
    with pytest.raises(ValueError, match=r"learn_ranges must be one of .*'pact'") as e:
        quantize_model(pretrained("net"), 4, qat=True, learn_ranges=bad)
    assert str(LEARN_RANGES) in str(e.value)


def test_learn_ranges_needs_qat():
    with pytest.raises(ValueError, match="learn_ranges=True .*qat=True"):
        quantize_model(pretrained("net"), 4, learn_ranges=True)


def test_learned_qparam_arguments_are_validated():
    with pytest.raises(ValueError, match="method must be one of"):
        LearnedQParam(4, method="dorefa")
    with pytest.raises(ValueError, match="method='pact'"):
        LearnedQParam(4, signed=True, method="pact")
    q = LearnedQParam(4, method="pact")
    with pytest.raises(ValueError, match="range starting at 0"):
        q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    with pytest.raises(AttributeError, match="learned"):
        q.scale = torch.tensor(1.0)


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_a_step_pushed_below_zero_still_learns_and_freeze_refuses_it(method):
    # an optimizer step can push the learned value to 0 or below: the forward pass floors it,
    # but its gradient passes the floor, so the loss can pull it back up; until it has, freeze()
    # refuses it by name instead of freezing the floor into integers
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(32, 4, 3, 3, generator=gen)) * 3
    q = LearnedQParam(4, method=method)
    q.train()
    q(x)                                                  # initialised by the observer
    with torch.no_grad():
        q.learned.fill_(-0.01)                            # what a too-large optimizer step does
    loss = (q(x) - x).pow(2).mean()                       # wants a larger step: x is clipped
    loss.backward()
    assert q.learned.grad is not None and q.learned.grad.item() < 0, q.learned.grad
    opt = torch.optim.SGD([q.learned], lr=1.0)
    for _ in range(50):
        if q.learned.item() > 0.05:
            break
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    assert q.learned.item() > 0.05                        # recovered
    with torch.no_grad():
        q.learned.fill_(-0.01)
    with pytest.raises(ValueError, match=r"learned (step|clip alpha) of conv1 is -0\.01 "):
        q.check_usable("conv1")
    with torch.no_grad():
        q.learned.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        q.check_usable()


def test_freeze_names_the_layer_whose_learned_step_collapsed(loaders):
    qnet, _, _ = lsq_model(loaders, "net", 3, steps=1)
    with torch.no_grad():
        qnet.layers[2].q_w.learned[1] = 0.0
    with pytest.raises(ValueError, match=r"learned step of q_w of layers\[2\] \(QConv2d\)"):
        qnet.freeze()
    assert not qnet.frozen
