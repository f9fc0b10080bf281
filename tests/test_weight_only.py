"""Weight-only group quantization: the grid, packing, the weight-only Linear, files, and the
gguf oracle (llama.cpp's reference quantizers in NumPy, written outside this project)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.weight_only import (
    WeightOnlyLinear,
    dequantize_groups,
    load_quantized,
    model_bytes,
    pack,
    quantize_groups,
    quantize_linears,
    save_quantized,
    unpack,
)

finite = st.floats(-4.0, 4.0, allow_nan=False, width=32)
weights = arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([32, 64, 96])),
                 elements=finite)


@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(0, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_and_size(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (-(-n // 8) * 3 if bits == 3 else -(-n * bits // 8))
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.int32))


def test_pack_layout_is_least_significant_first():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 7]), 3).tolist() == [1, 0, 0b11100000]


@settings(max_examples=150, deadline=None)
@given(w=weights, bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([None, 32, 64]),
       symmetric=st.booleans())
def test_rtn_error_is_at_most_half_a_step_and_zero_is_exact(w, bits, group, symmetric):
    w = torch.from_numpy(w)
    w[:, 0] = 0.0
    gq = quantize_groups(w, bits, group, symmetric)
    w_q = dequantize_groups(gq)
    assert w_q[:, 0].abs().max() == 0  # real zero is exactly representable
    step = gq.scale.float().repeat_interleave(gq.group_size, 1)[:, :w.shape[1]].abs()
    # half a step, plus the float16 rounding of the scale (relative 2**-11, or absolute 2**-25 when
    # the scale is below float16's smallest normal 2**-14) times up to 2**bits steps
    slack = step * (0.5 + 2 ** bits * 2.0 ** -11) + 2 ** bits * 2.0 ** -25 + 1e-6
    assert bool(((w - w_q).abs() <= slack).all())
    assert int(gq.codes.min()) >= 0 and int(gq.codes.max()) < 2**bits


def test_symmetric_two_bit_is_ternary_and_asymmetric_uses_four_levels():
    w = torch.linspace(-1, 1, 64).reshape(1, 64)
    sym = dequantize_groups(quantize_groups(w, 2, None, True))
    asym = dequantize_groups(quantize_groups(w, 2, None, False))
    assert len(sym.unique()) == 3 and len(asym.unique()) == 4


def test_all_zero_group_dequantizes_to_zero():
    w = torch.zeros(2, 64)
    w[1, 40] = 0.5
    for symmetric in (True, False):
        w_q = dequantize_groups(quantize_groups(w, 4, 32, symmetric))
        assert torch.equal(w_q[0], torch.zeros(64)) and abs(w_q[1, 40] - 0.5) < 1e-3


def test_ragged_last_group_is_padded_with_zeros():
    w = torch.randn(3, 70)
    gq = quantize_groups(w, 4, 32)
    assert gq.scale.shape == (3, 3) and gq.codes.shape == (3, 70)
    ref = quantize_groups(torch.nn.functional.pad(w, (0, 26)), 4, 32)
    assert torch.equal(gq.codes, ref.codes[:, :70]) and torch.equal(gq.scale, ref.scale)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, "bits must be one of 2, 3, 4, 8"),
    ({"bits": True}, "bits must be one of"),
    ({"group_size": 0}, "group_size must be an int >= 1"),
    ({"group_size": 3.0}, "group_size must be an int"),
    ({"symmetric": "yes"}, "symmetric must be True or False"),
    ({"rounding": "nearest"}, "rounding must be one of half_even, half_away, half_up"),
    ({"signed_max": True, "symmetric": False}, "signed_max=True needs symmetric=True"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_groups(torch.randn(4, 32), **kwargs)


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="w must be a weight"):
        quantize_groups(torch.randn(32))
    with pytest.raises(ValueError, match="finite"):
        quantize_groups(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_groups(torch.ones(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 64, True), (2, None, False),
                                                  (8, None, True), (3, 32, False)])
def test_weight_only_linear_equals_the_unpacked_computation(bits, group, symmetric):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = WeightOnlyLinear.from_linear(linear, bits, group, symmetric)
    x = torch.randn(5, 7, 96)
    gq = quantize_groups(linear.weight, bits, group, symmetric)
    assert torch.equal(q.group_quant().codes, gq.codes)
    assert torch.equal(q(x), torch.nn.functional.linear(x, dequantize_groups(gq), linear.bias))
    n_groups = 1 if group is None else -(-96 // group)
    packed = lambda n: -(-n // 8) * 3 if bits == 3 else -(-n * bits // 8)  # noqa: E731
    expected = packed(96 * 40) + 2 * 40 * n_groups + (0 if symmetric else packed(40 * n_groups))
    assert q.weight_bytes() == expected


def test_quantize_linears_copies_the_model_and_counts_bytes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    qmodel = quantize_linears(model, bits=4, group_size=32)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(qmodel[0], WeightOnlyLinear)
    # packed 4-bit codes + fp16 scales + packed zero points + float32 biases
    assert model_bytes(qmodel) == (1024 + 64 * 2 + 32) + (160 + 10 * 2 + 5) + 4 * 42
    assert model_bytes(model) == 4 * (64 * 32 + 32 + 32 * 10 + 10)
    path = tmp_path / "q.pt"
    save_quantized(qmodel, path)
    back = load_quantized(model, path)
    x = torch.randn(3, 64)
    assert torch.equal(back(x), qmodel(x))
    with pytest.raises(ValueError, match="skip names no Linear"):
        quantize_linears(model, skip=["nope"])
    with pytest.raises(ValueError, match="no WeightOnlyLinear"):
        save_quantized(model, path)


def test_tied_weights_are_counted_once():
    from quantlab.models import TinyGPT
    assert model_bytes(TinyGPT()) == 4 * 822_912


# ---- the gguf oracle: llama.cpp's block quantizers in NumPy (gguf.quants) ----

gguf = pytest.importorskip("gguf")


def _blocks(gq, scale_dtype=np.float16):
    """quantlab's GroupQuant in gguf's block layout: the fp16 scale's 2 bytes, then the codes."""
    scale = gq.scale.numpy().astype(scale_dtype).reshape(-1, 1).view(np.uint8)
    codes = gq.codes.numpy().reshape(-1, 32)
    if gq.bits == 8:  # Q8_0: the signed integers q = code - 128 as int8
        qs = (codes - 128).astype(np.int8).view(np.uint8)
    else:  # Q4_0: value j in the low nibble of byte j, value j + 16 in its high nibble
        qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([scale, qs], axis=1).reshape(-1)


# zero or |w| >= 2**-100: gguf computes 1 / scale, which overflows to inf for a subnormal scale
# (its codes are then undefined); quantlab maps such a group to zeros
magnitudes = st.floats(2.0 ** -100, 8.0, width=32)
weights32 = arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 128])),
                   elements=st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x)))


@settings(max_examples=300, deadline=None)
@given(w=weights32)
def test_q8_0_blocks_are_byte_identical_with_gguf(w):
    # Q8_0 = symmetric 8 bits, groups of 32, scale absmax / 127, q = round half away from zero
    # of w * (1 / scale) in float32, scale stored as float16 after the integers are computed
    gq = quantize_groups(torch.from_numpy(w), 8, 32, symmetric=True, rounding="half_away")
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert np.array_equal(_blocks(gq), ref)


@settings(max_examples=300, deadline=None)
@given(w=weights32)
def test_q4_0_blocks_are_byte_identical_with_gguf(w):
    # Q4_0 = symmetric 4 bits over the full range [-8, 7], groups of 32, scale = m / -8 with m the
    # value of largest magnitude (sign included), code = floor(w * (1 / scale) + 8.5) in float32
    gq = quantize_groups(torch.from_numpy(w), 4, 32, symmetric=True, signed_max=True,
                         rounding="half_up")
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0).reshape(-1)
    assert np.array_equal(_blocks(gq), ref)


def test_gguf_dequantizes_quantlab_blocks_to_quantlab_weights():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    for qtype, kwargs in ((gguf.GGMLQuantizationType.Q8_0, {"bits": 8, "rounding": "half_away"}),
                          (gguf.GGMLQuantizationType.Q4_0,
                           {"bits": 4, "signed_max": True, "rounding": "half_up"})):
        gq = quantize_groups(w, group_size=32, symmetric=True, **kwargs)
        theirs = gguf.quants.dequantize(_blocks(gq).reshape(16, -1), qtype)
        assert np.array_equal(theirs, dequantize_groups(gq).numpy())


def test_default_rounding_differs_from_q8_0_only_at_ties():
    # quantlab's default (round half to even, as torch.round) and Q8_0 (half away from zero)
    w = torch.tensor([[2.5, -2.5, 3.5, 1.0] + [0.0] * 27 + [127.0]])  # scale 1: y = w exactly
    even = quantize_groups(w, 8, 32, True).codes[0, :4] - 128
    away = quantize_groups(w, 8, 32, True, rounding="half_away").codes[0, :4] - 128
    assert even.tolist() == [2, -2, 4, 1] and away.tolist() == [3, -3, 4, 1]
