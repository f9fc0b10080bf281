"""GPTQ: round to nearest with an identity Hessian, lazy batches equal the plain loop, each
layer's output error below round to nearest's, the whole-model pass."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.gptq import gptq_model, gptq_quantize, input_stats, output_error
from quantlab.weight_only import WeightOnlyLinear, dequantize_groups, quantize_groups


def _layer(seed, out=24, n_in=128, n=600):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.05
    x = torch.randn(n, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) * 0.2
    return w, 2 * x.double().T @ x.double() / n, x


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([None, 32, 64, 128]), symmetric=st.booleans())
def test_identity_hessian_gives_round_to_nearest(seed, bits, group, symmetric):
    w, _, _ = _layer(seed)
    gq = gptq_quantize(w, torch.eye(128, dtype=torch.float64), bits, group, symmetric)
    rtn = quantize_groups(w, bits, group, symmetric)
    assert torch.equal(gq.codes, rtn.codes) and torch.equal(gq.scale, rtn.scale)
    assert torch.equal(gq.zero_point, rtn.zero_point)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([None, 32]),
       block=st.sampled_from([32, 64, 128]))
def test_lazy_batches_equal_the_plain_loop(seed, bits, group, block):
    w, h, _ = _layer(seed)
    lazy = gptq_quantize(w, h, bits, group, block_size=block)
    plain = gptq_quantize(w, h, bits, group, lazy=False)
    # the same equations in another order of float64 sums: the same integers
    assert torch.equal(lazy.codes, plain.codes) and torch.equal(lazy.scale, plain.scale)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, None), (3, 128)])
def test_gptq_output_error_is_below_round_to_nearest(bits, group):
    w, h, _ = _layer(bits)
    err_gptq = output_error(w, dequantize_groups(gptq_quantize(w, h, bits, group)), h)
    err_rtn = output_error(w, dequantize_groups(quantize_groups(w, bits, group)), h)
    assert err_gptq < 0.8 * err_rtn


def test_output_error_from_xtx_equals_the_direct_computation():
    w, h, x = _layer(0)
    w_q = dequantize_groups(quantize_groups(w, 3, 32))
    direct = ((x @ (w - w_q).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert abs(output_error(w, w_q, h / 2) - direct.item()) < 1e-4 * direct.item()


def test_dead_input_channels_get_zero_weight_and_errors_are_named():
    w, h, _ = _layer(1)
    h[5, :] = 0
    h[:, 5] = 0
    gq = gptq_quantize(w, h, 4, 32)
    assert dequantize_groups(gq)[:, 5].abs().max() == 0
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, h[:10, :10])
    with pytest.raises(ValueError, match="multiples of group_size"):
        gptq_quantize(w, h, 4, 48)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_quantize(w, h, 5)


def test_gptq_model_beats_round_to_nearest_layer_by_layer():
    from quantlab.models import TinyGPT
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=20, n_layers=2, d_model=32, n_heads=2, context=16).eval()
    calib = torch.randint(0, 20, (16, 16))
    qmodel, report = gptq_model(model, calib, bits=3, group_size=32)
    assert sum(isinstance(m, WeightOnlyLinear) for m in qmodel.modules()) == 8
    for name, r in report["layers"].items():
        assert r["gptq_error"] < r["rtn_error"], name
    stats = input_stats(model, "blocks.0.qkv", calib)
    assert stats["n"] == 16 * 16 and stats["xtx"].shape == (32, 32)


def test_bad_calibration_and_names_are_named():
    from quantlab.models import TinyGPT
    model = TinyGPT(vocab_size=20, n_layers=1, d_model=32, n_heads=2, context=16)
    calib = torch.randint(0, 20, (4, 16))
    with pytest.raises(TypeError, match="calib must be"):
        input_stats(model, "blocks.0.qkv", [[1, 2]])
    with pytest.raises(ValueError, match="has no module"):
        input_stats(model, "blocks.9.qkv", calib)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        input_stats(model, "blocks.0.ln1", calib)
