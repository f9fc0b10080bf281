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
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize_model([torch.nn.Linear(2, 2)])
    qnet.calibrate(train, num_batches=1).freeze()
    with pytest.raises(TypeError, match="integer tensor"):
        qnet.integer_inference(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="outside"):
        qnet.integer_inference(torch.full((1, 1, 28, 28), -1, dtype=torch.int32))
    # calibrate accepts a plain iterable of image batches
    images = next(iter(train))[0]
    quantize_model(Net(), 8).calibrate([images[:10], images[10:20]]).freeze()


# ---- TinyGPT (lessons i and j) ----

def test_tinygpt_has_the_prototype_size_and_a_tied_head():
    from quantlab.models import TinyGPT
    model = TinyGPT()
    assert sum(p.numel() for p in model.parameters()) == 822_912
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 16 and sum(m.weight.numel() for m in linears) == 786_432
    logits = model(torch.zeros(2, 5, dtype=torch.int64))
    assert logits.shape == (2, 5, 103)


def test_tinygpt_is_causal():
    from quantlab.models import TinyGPT
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=11, n_layers=1, d_model=16, n_heads=2, context=8).eval()
    a = torch.randint(0, 11, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 11
    assert torch.equal(model(a)[0, :5], model(b)[0, :5])  # later characters change no earlier logit
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, dtype=torch.int64))


def test_shipped_tinygpt_loads_and_scores_its_recorded_perplexity():
    from quantlab.text import load_corpus
    from quantlab.training import perplexity, pretrained_tinygpt, tinygpt_info
    model, info = pretrained_tinygpt(), tinygpt_info()
    score = perplexity(model, load_corpus().val)
    assert score.n_predicted == 363 * 128 and len(score.chunk_nll) == 8
    assert abs(score.ppl - info["val_perplexity"]) < 0.005  # float kernels differ between CPUs
    assert info["val_perplexity"] <= 3.70


def test_train_gpt_is_deterministic_and_lowers_the_loss():
    from quantlab.models import TinyGPT
    from quantlab.training import train_gpt
    ids = torch.arange(2000) % 7
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = TinyGPT(vocab_size=7, n_layers=1, d_model=16, n_heads=2, context=16)
        runs.append((model, train_gpt(model, ids, {"steps": 30, "context": 16, "warmup": 5},
                                      progress=False)))
    (m1, h1), (m2, h2) = runs
    assert h1["loss"] == h2["loss"] and h1["loss"][-1] < h1["loss"][0]
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    with pytest.raises(ValueError, match="unknown keys"):
        train_gpt(m1, ids, {"epochs": 3})
