"""Rotations: Hadamard matrices against SciPy's, orthogonality, the rotated TinyGPT computing the
same function as the original (float32 and float64), LayerNorm = RMSNorm on centred inputs, the
centring step needed (skipping it changes the function), what a rotation does to an outlier, and
the argument errors."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantlab.act_quant import ActQuantLinear, fake_quantize_activations, quantize_activations
from quantlab.models import TinyGPT
from quantlab.rotation import (
    RotatedGPT,
    Rotation,
    check_orthogonal,
    hadamard,
    online_rotate,
    random_hadamard,
    random_orthogonal,
    rotate_model,
    token_outliers,
)

POWERS = st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256])


def _model(seed=0, d_model=32, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinyGPT(vocab_size=20, n_layers=2, d_model=d_model, n_heads=2, context=16).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0, embeddings with a mean
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
        model.tok.weight.add_(0.5)
    ids = torch.randint(0, 20, (4, 16), generator=torch.Generator().manual_seed(seed))
    return model.to(dtype), ids


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 128, 512])
def test_hadamard_is_scipys_divided_by_sqrt_n(n):
    expected = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64) / np.sqrt(n))
    assert torch.equal(hadamard(n), expected)


@settings(max_examples=30, deadline=None)
@given(POWERS, st.integers(0, 2**31 - 1))
def test_random_hadamard_flips_rows_of_h_and_is_orthogonal(n, seed):
    q = random_hadamard(n, torch.Generator().manual_seed(seed))
    h = hadamard(n)
    row_signs = q[:, :1] / h[:, :1]  # +1 where the row is H's, -1 where it is flipped
    assert torch.equal(row_signs.abs(), torch.ones(n, 1, dtype=torch.float64))
    assert torch.equal(q, row_signs * h)
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_random_orthogonal_is_orthogonal_with_r_positive(n, seed):
    q = random_orthogonal(n, torch.Generator().manual_seed(seed))
    assert q.shape == (n, n) and (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    if n > 1:  # a different seed, a different matrix
        assert not torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(seed + 1)))


def test_column_signs_do_not_change_a_symmetric_grid_but_row_signs_do():
    # why random_hadamard flips rows: x @ (H diag s) only flips the signs of x @ H
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = hadamard(128)
    s = torch.randint(0, 2, (128,), generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    q_h = fake_quantize_activations(x @ h, 4)
    assert torch.equal(fake_quantize_activations(x @ (h * s), 4), q_h * s)
    back_rows = fake_quantize_activations(x @ (s[:, None] * h), 4) @ (s[:, None] * h).T
    assert not torch.allclose(back_rows, q_h @ h.T)


def test_rotation_spreads_one_outlier_over_every_channel():
    x = torch.zeros(1, 64, dtype=torch.float64)
    x[0, 5] = 8.0   # one channel: max/rms = sqrt(64) = 8; 4 bits round the rest to 0 (exact here)
    y = x @ hadamard(64)
    assert torch.equal(y.abs(), torch.full_like(y, 1.0))  # 8 / sqrt(64) in every channel
    assert torch.equal(y @ hadamard(64).T, x)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 64), st.integers(0, 2**31 - 1), st.floats(-5, 5))
def test_layernorm_is_rmsnorm_on_centred_inputs_only(d, seed, offset):
    x = torch.randn(8, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xc = x - x.mean(-1, keepdim=True)
    ln = F.layer_norm(xc, (d,), eps=1e-5)
    assert torch.allclose(ln, F.rms_norm(xc, (d,), eps=1e-5), atol=1e-12, rtol=0)
    if abs(offset) > 0.5:  # a mean: LayerNorm removes it, RMSNorm does not
        assert not torch.allclose(F.layer_norm(xc + offset, (d,), eps=1e-5),
                                  F.rms_norm(xc + offset, (d,), eps=1e-5), atol=1e-3)


@pytest.mark.parametrize("rotation", ["hadamard", "random_hadamard", "random_orthogonal"])
@pytest.mark.parametrize("online", [("proj", "fc2"), (), ("fc2",)])
def test_rotated_model_computes_the_same_logits(rotation, online):
    model, ids = _model()
    rotated = rotate_model(model, rotation, online)
    # float32: the same function up to float32 rounding of differently ordered sums
    assert torch.allclose(rotated(ids), model(ids), atol=2e-5, rtol=2e-5)
    # float64: to float64 rounding
    model64 = model.double()
    assert torch.allclose(rotate_model(model64, rotation, online)(ids), model64(ids), atol=1e-11,
                          rtol=0)


def test_rotated_model_is_rotated_rmsnormed_and_the_original_is_untouched():
    model, ids = _model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotated = rotate_model(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(rotated, RotatedGPT) and isinstance(rotated.blocks[0].ln1, nn.RMSNorm)
    online = rotated.blocks[1].fc2[0]
    assert isinstance(online, Rotation) and online.matrix.shape == (128, 128)
    assert not torch.allclose(rotated.tok.weight, model.tok.weight, atol=1e-2)


def test_skipping_the_centring_changes_the_function():
    model, ids = _model(2)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731  (no rotation: only the fold)
    model64 = model.double()
    assert torch.allclose(rotate_model(model64, eye, ())(ids), model64(ids), atol=1e-11, rtol=0)
    wrong = rotate_model(model64, eye, (), center=False)(ids)
    assert (wrong - model64(ids)).abs().max() > 1e-2  # RMSNorm sees the mean LayerNorm removed
    # with the centring the residual stream has zero mean before every norm
    seen = []
    rotated = rotate_model(model64, eye, ())
    rotated.blocks[1].ln2.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    rotated(ids)
    assert seen[0].mean(-1).abs().max() < 1e-12 and seen[0].abs().max() > 0.1


def test_pretrained_model_rotated_keeps_its_perplexity():
    from quantlab.text import load_corpus
    from quantlab.training import perplexity, pretrained_tinygpt
    model, val = pretrained_tinygpt(), load_corpus().val
    ppl = perplexity(model, val, max_windows=8, chunks=1).ppl
    for online in (("proj", "fc2"), ()):
        rotated = rotate_model(model, "random_hadamard", online, seed=0)
        assert abs(perplexity(rotated, val, max_windows=8, chunks=1).ppl / ppl - 1) < 1e-5


def test_quantize_activations_quantizes_the_rotated_input():
    model, ids = _model(3)
    rotated = rotate_model(model)
    assert "blocks.0.fc2.1" in [n for n, m in rotated.named_modules() if isinstance(m, nn.Linear)]
    q = quantize_activations(rotated, 4, 4, names=["blocks.0.fc2.1"])  # the rest stays float
    assert isinstance(q.blocks[0].fc2[1], ActQuantLinear) and isinstance(q.blocks[0].fc2[0], Rotation)
    inputs = {}
    model.blocks[0].fc2.register_forward_pre_hook(lambda _m, a: inputs.setdefault("x", a[0]))
    q.blocks[0].fc2[1].register_forward_pre_hook(lambda _m, a: inputs.setdefault("xr", a[0]))
    model(ids)
    q(ids)  # fc2's input, GELU(fc(.)), is the same in both models (up to float rounding)
    r = q.blocks[0].fc2[0].matrix
    assert torch.allclose(inputs["xr"], inputs["x"] @ r, atol=1e-4)


def test_online_rotate_any_model_keeps_its_function():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(5, 100)
    rotated = online_rotate(mlp, rotation="random_orthogonal", seed=3)
    assert isinstance(rotated[0], nn.Sequential) and rotated[0][1].weight.dtype == torch.float32
    assert torch.allclose(rotated(x), mlp(x), atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two size: 0's input has 100"):
        online_rotate(mlp, rotation="hadamard")
    assert torch.allclose(online_rotate(mlp, ["2"], "hadamard")(x), mlp(x), atol=1e-5)


def test_token_outliers_matches_a_hand_computation():
    model, ids = _model(4)
    got = token_outliers(model, ids, ["blocks.1.fc2"], bits=4)["blocks.1.fc2"]
    xs = []
    model.blocks[1].fc2.register_forward_pre_hook(lambda _m, a: xs.append(a[0]))
    model(ids)
    x = xs[0].detach().reshape(-1, 128).double().numpy()
    rms = np.sqrt((x ** 2).mean(1))
    c = x - x.mean(1, keepdims=True)
    scale = np.abs(x).max(1, keepdims=True) / 7
    q = np.clip(np.round(x / scale), -7, 7) * scale
    assert got["max_to_rms"] == pytest.approx((np.abs(x).max(1) / rms).mean(), rel=1e-9)
    assert got["kurtosis"] == pytest.approx(((c ** 4).mean(1) / (c ** 2).mean(1) ** 2).mean(), rel=1e-9)
    assert got["error"] == pytest.approx(np.sqrt(((q - x) ** 2).sum(1) / (x ** 2).sum(1)).mean(), rel=1e-6)


def test_errors_name_the_argument():
    model, ids = _model()
    with pytest.raises(ValueError, match="n must be a power of two"):
        hadamard(12)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        hadamard(0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_hadamard(4, 0)
    with pytest.raises(ValueError, match="rotation must be one of hadamard, random_hadamard"):
        rotate_model(model, "givens")
    with pytest.raises(TypeError, match="online must be a tuple of kinds"):
        rotate_model(model, online="fc2")
    with pytest.raises(ValueError, match=r"online must hold kinds among \('proj', 'fc2'\)"):
        rotate_model(model, online=("qkv",))
    with pytest.raises(TypeError, match="model must be a quantlab.models.TinyGPT"):
        rotate_model(rotate_model(model))
    with pytest.raises(ValueError, match="blocks.0.qkv is a ActQuantLinear, not an nn.Linear"):
        rotate_model(quantize_activations(model, 8, 8))
    with pytest.raises(ValueError, match=r"d_model\) has 48 channels"):
        rotate_model(_model(d_model=48)[0], "hadamard")
    with pytest.raises(ValueError, match="must be orthogonal"):
        rotate_model(model, lambda n: 2 * torch.eye(n, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must be \(32, 32\)"):
        rotate_model(model, lambda n: torch.eye(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="center must be True or False"):
        rotate_model(model, center=1)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        rotate_model(model, seed=-1)
    with pytest.raises(ValueError, match="matrix must be orthogonal"):
        Rotation(torch.ones(3, 3))
    with pytest.raises(TypeError, match="rotation must be a floating-point torch.Tensor"):
        check_orthogonal(np.eye(3))
    with pytest.raises(ValueError, match="names must name nn.Linear modules"):
        online_rotate(model, ["blocks.0.ln1"])
    with pytest.raises(ValueError, match="calib must be an int64 tensor"):
        token_outliers(model, ids.float())
    with pytest.raises(ValueError, match="bits must be one of"):
        token_outliers(model, ids, bits=5)
