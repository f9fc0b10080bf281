"""quantlab.act_quant: activation quantization of a transformer's Linears, SmoothQuant, LLM.int8()'s
decomposition and the KV-cache quantizer. Oracles: PyTorch's own fake-quantize kernels; the float
model for every transform that must not change it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantlab import act_quant as aq
from quantlab.awq import layer_inputs, plant_outliers
from quantlab.models import TinyGPT


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=20, n_layers=2, d_model=32, n_heads=4, context=16).eval()
    with torch.no_grad():  # trained-looking LayerNorms: not all ones and zeros
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 20, (6, 16), generator=torch.Generator().manual_seed(1))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([2, 4, 8]))
def test_per_token_is_pytorchs_per_channel_fake_quantize_over_rows(seed, bits):
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(seed)) * 3
    x[2] = 0.0  # an all-zero row: scale 0 -> zeros
    qmax = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    ref = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(7, dtype=torch.int32), 0, -qmax, qmax)
    got = aq.fake_quantize_activations(x, bits, "token")
    assert torch.equal(got, ref)
    assert (got[2] == 0).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.1, 10.0))
def test_per_tensor_static_is_pytorchs_per_tensor_fake_quantize(seed, absmax):
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(seed)) * 4  # some beyond absmax
    scale = torch.tensor(absmax, dtype=torch.float32) / 127
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), 0, -127, 127)
    assert torch.equal(aq.fake_quantize_activations(x, 8, "tensor", absmax), ref)


def test_dynamic_per_tensor_uses_the_tensors_own_maximum_and_is_exact_on_the_grid():
    x = torch.tensor([[-2.0, 1.0, 0.5], [0.25, 0.0, 1.5]])
    got = aq.fake_quantize_activations(x, 3, "tensor")  # qmax 3, scale 2/3
    assert torch.allclose(got, torch.round(x * 1.5) / 1.5, atol=1e-6)
    assert got[0, 0] == -2.0  # the largest magnitude is on the grid


def test_activation_errors_name_the_argument():
    x = torch.ones(2, 4)
    with pytest.raises(ValueError, match="granularity must be one of token, tensor"):
        aq.fake_quantize_activations(x, 8, "row")
    with pytest.raises(ValueError, match="bits must be one of"):
        aq.fake_quantize_activations(x, 5)
    with pytest.raises(ValueError, match="absmax is for granularity='tensor'"):
        aq.fake_quantize_activations(x, 8, "token", 1.0)
    with pytest.raises(ValueError, match="absmax must be one finite number"):
        aq.fake_quantize_activations(x, 8, "tensor", float("inf"))
    with pytest.raises(TypeError):
        aq.fake_quantize_activations([1.0, 2.0], 8)


def test_calibrated_absmax_is_the_largest_input_seen(gpt, ids):
    absmax = aq.calibrate_absmax(gpt, ids)
    assert set(absmax) == {f"blocks.{i}.{k}" for i in range(2) for k in ("qkv", "proj", "fc", "fc2")}
    x = layer_inputs(gpt, "blocks.1.fc2", ids)
    assert absmax["blocks.1.fc2"] == x.abs().max().item()
    per_channel = aq.channel_absmax(gpt, ids, ["blocks.1.fc2"])["blocks.1.fc2"]
    assert torch.equal(per_channel, x.abs().flatten(0, 1).amax(0))


def test_quantize_activations_replaces_every_linear_and_changes_only_the_copy(gpt, ids):
    before = gpt(ids)
    q = aq.quantize_activations(gpt, 8, 8, "tensor", calib=ids)
    kinds = {type(m).__name__ for n, m in q.named_modules() if n.endswith(("qkv", "proj", "fc", "fc2"))}
    assert kinds == {"ActQuantLinear"}
    assert torch.equal(gpt(ids), before)
    err8 = (q(ids) - before).abs().max()
    err4 = (aq.quantize_activations(gpt, 4, 4)(ids) - before).abs().max()
    assert 0 < err8 < err4
    assert "static" in repr(q.blocks[0].qkv) and "dynamic" in repr(aq.quantize_activations(gpt).blocks[0].qkv)


def test_w_bits_none_keeps_the_weight_and_names_select_layers(gpt, ids):
    q = aq.quantize_activations(gpt, None, 8, names=["blocks.0.fc"])
    assert torch.equal(q.blocks[0].fc.weight, gpt.blocks[0].fc.weight)
    assert isinstance(q.blocks[0].qkv, nn.Linear)
    with pytest.raises(ValueError, match="pass granularity='tensor'"):
        aq.quantize_activations(gpt, 8, 8, "token", calib=ids)
    with pytest.raises(ValueError, match="not a torch.nn.Linear"):
        aq.quantize_activations(gpt, names=["blocks.0.ln1"])
    with pytest.raises(ValueError, match="calib must be an int64 tensor"):
        aq.calibrate_absmax(gpt, ids.float())


def test_llm_int8_decomposition_bounds():
    torch.manual_seed(3)
    linear = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    x[:, 5] *= 40  # an outlier column
    high = aq.ActQuantLinear(linear, 8, 8, outlier_threshold=1e6)  # nothing goes to float
    plain = aq.ActQuantLinear(linear, 8, 8)
    assert torch.equal(high(x), plain(x)) and high.last_outlier_columns == 0
    tiny = aq.ActQuantLinear(linear, 8, 8, outlier_threshold=1e-9)  # everything goes to float
    assert torch.allclose(tiny(x), linear(x), atol=1e-5, rtol=0) and tiny.last_outlier_columns == 16
    mixed = aq.ActQuantLinear(linear, 8, 8, outlier_threshold=6.0)
    y = mixed(x)
    assert mixed.last_outlier_columns == 1 and mixed.last_outliers.tolist() == [5]
    assert (y - linear(x)).abs().max() < (plain(x) - linear(x)).abs().max()
    with pytest.raises(ValueError, match="outlier_threshold must be > 0"):
        aq.ActQuantLinear(linear, outlier_threshold=0)


def test_smoothquant_scales_formula_and_guards():
    x_absmax = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, -0.25, 2.0, 0.0], [0.5, 0.5, -1.0, 0.0]])
    s = aq.smoothquant_scales(x_absmax, w, 0.5)
    # column maxima of |w|: 1, 0.5, 2, 0; s = sqrt(max|x|) / sqrt(max|w|); a zero maximum -> 1
    assert torch.allclose(s, torch.tensor([2.0, 2 ** 0.5, 1.0, 1.0]))
    assert torch.allclose(aq.smoothquant_scales(x_absmax, w, 1.0), torch.tensor([4.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="alpha must be in"):
        aq.smoothquant_scales(x_absmax, w, 1.5)
    with pytest.raises(ValueError, match="input columns"):
        aq.smoothquant_scales(x_absmax[:3], w)


def test_smooth_quant_keeps_the_float_model_and_flattens_planted_outliers(gpt, ids):
    planted = plant_outliers(gpt, channels=(1, 7), factor=16.0)
    smoothed, scales = aq.smooth_quant(planted, ids, 0.5)
    assert set(scales) == {f"blocks.{i}.{k}" for i in range(2) for k in ("qkv", "fc")}
    assert torch.allclose(smoothed(ids), planted(ids), atol=1e-4, rtol=1e-4)

    def spread(model):
        v = aq.channel_absmax(model, ids, ["blocks.0.qkv"])["blocks.0.qkv"]
        return (v.max() / v.median()).item()
    assert spread(planted) > 8 and spread(smoothed) < spread(planted) / 2
    with pytest.raises(ValueError, match="kinds must be among"):
        aq.smooth_quant(planted, ids, kinds=("fc2",))


def _kv_bound(step):
    # half a step, and the float16 scale: it may round the step down by 2**-11 relative, which can
    # clip the range's top by up to 255 such shares of a step (8-bit codes)
    return step / 2 * (1 + 2 ** -10) + 255 * step * 2 ** -11 + 1e-6


@pytest.mark.parametrize("key_axis,value_axis", [("channel", "token"), ("token", "channel")])
def test_kv_quantizer_grids(key_axis, value_axis):
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    kq, vq = aq.KVQuantizer(8, key_axis, value_axis, group=4)(k, v)
    assert kq.shape == k.shape and vq.shape == v.shape
    for z, zq, axis in ((k, kq, key_axis), (v, vq, value_axis)):
        # the step of each (head, token) row or (head, channel, group of 4 tokens) bounds the error
        # the asymmetric range always includes 0
        if axis == "token":
            span = z.amax(-1).clamp(min=0) - z.amin(-1).clamp(max=0)
            assert ((zq - z).abs() <= _kv_bound(span[..., None] / 255)).all()
        else:
            groups = torch.nn.functional.pad(z, (0, 0, 0, 2)).unflatten(2, (3, 4))
            step = (groups.amax(3).clamp(min=0) - groups.amin(3).clamp(max=0)) / 255
            bound = step[:, :, :, None, :].expand(-1, -1, -1, 4, -1).flatten(2, 3)[:, :, :10]
            assert ((zq - z).abs() <= _kv_bound(bound)).all()
    k4, _ = aq.KVQuantizer(4, key_axis, value_axis, group=4)(k, v)
    assert (k4 - k).abs().mean() > (kq - k).abs().mean()
    with pytest.raises(ValueError, match="key_axis must be one of token, channel"):
        aq.KVQuantizer(8, "head")


def test_quantized_kv_cache_changes_attention_only_through_k_and_v(gpt, ids):
    q8 = aq.quantize_kv_cache(gpt, 8)
    assert gpt.blocks[0].kv_quantizer is None and isinstance(q8.blocks[0].kv_quantizer, aq.KVQuantizer)
    err8 = (q8(ids) - gpt(ids)).abs().max()
    err4 = (aq.quantize_kv_cache(gpt, 4)(ids) - gpt(ids)).abs().max()
    assert 0 < err8 < err4


def test_kv_cache_bytes_per_token():
    assert aq.kv_cache_bytes_per_token(4, 128, 4, None) == 2048  # K and V, 4 layers, 128 fp16 values
    # 8 bits: 128 codes per K and per V; keys: 4 scales+zero points per 32-token group of 128
    # channels = 128/32 * 3 bytes; values: 4 heads * 3 bytes per token
    assert aq.kv_cache_bytes_per_token(4, 128, 4, 8) == 4 * (128 + 12 + 128 + 12)
    assert aq.kv_cache_bytes_per_token(4, 128, 4, 4) == 4 * (64 + 4 * 2.5 + 64 + 4 * 2.5)


def test_w8a8_fake_quantization_multiplies_the_integers_of_the_int8_linear():
    # the same codes as quantlab.w8a8 (ONNX Runtime's weights, per-token activations): the fake-quant
    # product differs from the integer one only by float rounding
    from quantlab.w8a8 import Int8Linear, quantize_per_token, quantize_weight
    torch.manual_seed(5)
    linear = nn.Linear(64, 24)
    x = torch.randn(9, 64) * torch.linspace(0.1, 3, 9)[:, None]
    q_w, s_w = quantize_weight(linear.weight.detach(), per_channel=True)
    assert torch.equal(aq.fake_quantize_weight(linear.weight.detach(), 8), q_w * s_w.reshape(-1, 1))
    q_x, s_x = quantize_per_token(x)
    assert torch.equal(aq.fake_quantize_activations(x, 8, "token"), q_x * s_x)
    y_fake = aq.ActQuantLinear(linear, 8, 8)(x)
    y_int = Int8Linear(linear)(x)
    assert torch.allclose(y_fake, y_int, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="w must be 2-D"):
        aq.fake_quantize_weight(torch.ones(3), 8)
