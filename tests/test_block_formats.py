"""quantlab.block_formats against code nobody here wrote: gguf's MXFP4 quantizer and NVFP4 dequantizer
(llama.cpp's reference in NumPy), ml_dtypes' element casts, bitsandbytes' NF4 levels and decision
tree, QLoRA's construction of the levels (scipy's normal quantiles), scipy's k-means."""

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import quants
from scipy.cluster.vq import kmeans2, vq
from scipy.stats import norm

from quantlab import block_formats as bf
from quantlab import minifloat as mf

MXFP4 = gguf.GGMLQuantizationType.MXFP4
NVFP4 = gguf.GGMLQuantizationType.NVFP4
# bitsandbytes' dQuantizeNF4 (csrc/kernels.cu): code = the number of these thresholds below x
BNB_NF4_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=np.float32)


def _blocks(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, size)) * np.exp2(rng.uniform(-20, 20, (n, 1)))).astype(np.float32)


def _gguf_mxfp4(x):
    return np.frombuffer(quants.quantize(x, MXFP4).tobytes(), np.uint8).reshape(-1, 17)


def _ours_mxfp4(x, positive_zero=False):
    bq = bf.mx_quantize(torch.from_numpy(x))
    if positive_zero:
        bq = bq._replace(codes=torch.where(bq.codes == 8, 0, bq.codes))
    return np.frombuffer(bf.to_gguf_mxfp4(bq), np.uint8).reshape(-1, 17)


def test_mxfp4_random_blocks_are_byte_identical_with_gguf_but_for_the_sign_of_zero():
    x = _blocks(20000, 32)
    ref = _gguf_mxfp4(x)
    assert np.array_equal(_ours_mxfp4(x, positive_zero=True), ref)
    # the one systematic difference: a negative value that rounds to zero keeps its sign (code 8, -0,
    # as ml_dtypes' cast and the OCP element encoding do); gguf's argmin picks code 0 (+0)
    ours = _ours_mxfp4(x)
    differ = (ours != ref).any(1)
    assert differ.sum() > 1000
    lo, hi = ours[differ, 1:] & 15, ours[differ, 1:] >> 4
    rlo, rhi = ref[differ, 1:] & 15, ref[differ, 1:] >> 4
    assert (((lo == rlo) | ((lo == 8) & (rlo == 0))) & ((hi == rhi) | ((hi == 8) & (rhi == 0)))).all()
    deq = quants.dequantize(ours.reshape(-1), MXFP4).reshape(x.shape)
    assert np.array_equal(deq, bf.block_dequantize(bf.mx_quantize(torch.from_numpy(x))).numpy())


def test_mxfp4_where_gguf_departs_from_the_ocp_rounding():
    # ties between two E2M1 values: OCP rounds to the even code (1.75 -> 2, 3.5 -> 4), gguf's argmin
    # takes the first (smaller) value; at 5, 1.25 and 2.5 they agree (the even code is the smaller)
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [6.0, 1.75, 3.5, 5.0, 1.25, 2.5]  # amax 6: scale 2**0, elements as written
    ours, ref = _ours_mxfp4(x)[0], _gguf_mxfp4(x)[0]
    codes = lambda b: np.concatenate([b[1:] & 15, b[1:] >> 4])  # noqa: E731
    assert codes(ours)[:6].tolist() == [7, 4, 6, 6, 2, 4]   # 6, 2, 4, 4, 1, 2
    assert codes(ref)[:6].tolist() == [7, 3, 5, 6, 2, 4]    # 6, 1.5, 3, 4, 1, 2
    assert ml_dtypes.float4_e2m1fn(1.75) == 2.0 and ml_dtypes.float4_e2m1fn(3.5) == 4.0
    # an amax just below a power of two 2**k (k >= 3): log2 in float32 rounds up to k, so gguf's
    # shared exponent is one too large; frexp's is exact (floor(log2(256 - 2**-16)) = 7)
    x = np.full((1, 32), np.nextafter(np.float32(256.0), np.float32(0.0)), np.float32)
    assert _ours_mxfp4(x)[0, 0] == 127 + 7 - 2 and _gguf_mxfp4(x)[0, 0] == 127 + 8 - 2


@pytest.mark.parametrize("element", ["e2m1", "e4m3", "e5m2"])
def test_mx_elements_are_ml_dtypes_casts_of_the_scaled_block(element):
    x = _blocks(3000, 32, seed=1)
    bq = bf.mx_quantize(torch.from_numpy(x), element)
    X = bq.scale.numpy().astype(np.int64).reshape(-1) - 127
    amax = np.abs(x).max(1)
    assert (2.0 ** (X + bf.emax(element)) <= amax).all() and (amax < 2.0 ** (X + bf.emax(element) + 1)).all()
    scaled = np.ldexp(x.astype(np.float64), -X[:, None])
    top = mf.get_format(element).max
    dt = {"e2m1": ml_dtypes.float4_e2m1fn, "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
    ref = np.clip(scaled, -top, top).astype(np.float32).astype(dt[element]).view(np.uint8)
    assert np.array_equal(bq.codes.numpy(), ref.astype(np.int32))
    assert bf.bits_per_value(bq) == mf.get_format(element).bits + 8 / 32


def test_nvfp4_blocks_decode_as_gguf_does():
    x = _blocks(512, 64, seed=2) / 1e3
    bq = bf.nvfp4_quantize(torch.from_numpy(x))
    # gguf's layout: per 64 values, 4 unsigned-E4M3 scale bytes then 4 x 8 bytes (element j low
    # nibble, j + 8 high) of E2M1 codes; it has no tensor scale, so multiply it back
    codes = bq.codes.numpy().reshape(-1, 4, 16).astype(np.uint8)
    qs = (codes[:, :, :8] | (codes[:, :, 8:] << 4)).reshape(-1, 32)
    raw = np.concatenate([bq.scale.numpy().reshape(-1, 4).astype(np.uint8), qs], axis=1)
    ref = quants.dequantize(raw.reshape(-1), NVFP4).reshape(x.shape) * np.float32(bq.tensor_scale)
    ours = bf.block_dequantize(bq).numpy()
    assert np.allclose(ours, ref, rtol=1e-6, atol=0)
    assert (np.abs(ours - x) <= np.abs(x).max(1, keepdims=True)).all()
    assert bq.scale.max() <= 0x7E  # every block scale fits E4M3 (the tensor scale's purpose)


def test_nf4_levels_are_qloras_normal_quantiles():
    # bitsandbytes' create_normal_map(offset=0.9677083): 8 positive quantiles, 7 negative, and 0
    # (float32 linspace, float64 quantiles, float32 division: bit for bit the constants it ships)
    pos = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].numpy())
    v = torch.tensor(np.concatenate([pos, [0.0], neg]), dtype=torch.float32).sort().values
    assert torch.equal(v / v.max(), bf.NF4_LEVELS)


def test_nf4_codes_follow_bitsandbytes_decision_tree():
    x = _blocks(4000, 64, seed=3)
    bq = bf.nf4_quantize(torch.from_numpy(x))
    y = x * (np.float32(1.0) / np.abs(x).max(1, keepdims=True))
    ref = (y[..., None] > BNB_NF4_THRESHOLDS).sum(-1)
    assert np.array_equal(bq.codes.numpy(), ref)
    ties = torch.tensor(BNB_NF4_THRESHOLDS).reshape(1, 15)
    t = torch.cat([ties, torch.ones(1, 49)], dim=1)  # absmax 1: values are the thresholds themselves
    assert bf.nf4_quantize(t).codes[0, :15].tolist() == list(range(15))  # a tie goes down
    assert bf.bits_per_value(bq) == 4.5


def test_kmeans_codebook_is_scipys_lloyd_from_the_same_start():
    w = torch.from_numpy(_blocks(1, 3000, seed=4)[0] / 1e4)
    cb = bf.kmeans_codebook(w, bits=3, iterations=20)
    init = np.linspace(float(w.min()), float(w.max()), 8)
    data = w.double().numpy()[:, None]
    centroids, _ = kmeans2(data, init[:, None], iter=20, minit="matrix", missing="warn")
    assert np.allclose(cb.centroids.numpy(), centroids[:, 0].astype(np.float32), rtol=1e-6)
    # scipy's labels are those of its last assignment, before the last update; the index is the
    # nearest final centroid (scipy's vq)
    assert np.array_equal(cb.index.numpy(), vq(data, centroids)[0])


def test_codebook_finetune_step_is_the_gradient_of_the_shared_centroids():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    cb = bf.kmeans_codebook(w, bits=2)
    c = cb.centroids.clone().requires_grad_(True)
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    (c[cb.index] @ x).square().sum().backward()
    g = 2 * (bf.codebook_values(cb) @ x) @ x.T  # d loss / d w
    step = bf.codebook_finetune_step(cb, g, lr=0.1)
    assert torch.allclose(step.centroids, cb.centroids - 0.1 * c.grad, rtol=1e-5, atol=1e-5)
    counts = torch.bincount(cb.index.reshape(-1), minlength=4)
    mean = bf.codebook_finetune_step(cb, g, lr=0.1, reduce="mean")
    assert torch.allclose(mean.centroids, cb.centroids - 0.1 * c.grad / counts, rtol=1e-5, atol=1e-5)


def test_padding_to_whole_blocks_changes_no_block_and_bits_are_counted_honestly():
    w = torch.from_numpy(_blocks(6, 100, seed=5))
    for kind, block in (("mxfp4", 32), ("mxfp8", 32), ("nvfp4", 16), ("nf4", 64)):
        y = bf.block_fake_quantize(w, kind)
        padded = torch.nn.functional.pad(w, (0, (-100) % block))
        assert y.shape == w.shape and torch.equal(y, bf.block_fake_quantize(padded, kind)[:, :100])
    # 6 rows x 100 values: 4 blocks of 32 per row (the last padded), 2 of 64, 7 of 16
    assert bf.stored_bits("mxfp4", (6, 100)) == 600 * 4 + 6 * 4 * 8
    assert bf.stored_bits("mxfp8", (6, 100)) == 600 * 8 + 6 * 4 * 8
    assert bf.stored_bits("nf4", (6, 100)) == 600 * 4 + 6 * 2 * 32
    assert bf.stored_bits("nvfp4", (6, 100)) == 600 * 4 + 6 * 7 * 8 + 32
    # counted as stored in whole blocks: the padding zeros too (a gguf MXFP4 block is 17 bytes)
    assert bf.stored_bits("mxfp4", (6, 100), padded=True) == 6 * 4 * 32 * 4 + 6 * 4 * 8
    assert bf.stored_bits("mxfp4", (6, 100), padded=True) == 8 * len(bf.to_gguf_mxfp4(
        bf.mx_quantize(torch.nn.functional.pad(w, (0, 28)))))
    assert bf.stored_bits("nvfp4", (6, 96), padded=True) == bf.stored_bits("nvfp4", (6, 96))
    with pytest.raises(TypeError, match="padded"):
        bf.stored_bits("mxfp4", (6, 100), padded="yes")


def test_scaled_round_per_tensor_and_per_channel():
    w = torch.from_numpy(_blocks(8, 50, seed=6))
    y, s = mf.scaled_round(w, "e4m3", axis=0)
    assert s.shape == (8, 1) and torch.equal(s, w.abs().amax(1, keepdim=True) / 448)
    assert torch.equal(y, mf.round_to(w / s, "e4m3") * s)
    # the largest magnitude lands on 448 * scale, which is amax up to float32's rounding of amax / 448
    assert torch.allclose(y.abs().amax(1, keepdim=True), w.abs().amax(1, keepdim=True), rtol=2e-7, atol=0)
    y1, s1 = mf.scaled_round(w, "e4m3")
    assert s1.shape == () and (y1 - w).abs().max() >= (y - w).abs().max()
    assert torch.equal(mf.scaled_round(torch.zeros(3), "e5m2")[0], torch.zeros(3))


def test_map_weights_changes_a_copy():
    from torch import nn

    from quantlab.weight_only import map_weights
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4, 3))
    before = [p.clone() for p in net.parameters()]
    q = map_weights(net, torch.zeros_like, kinds=(nn.Linear,))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert torch.equal(q[2].weight, torch.zeros(3, 16)) and torch.equal(q[0].weight, net[0].weight)
    q = map_weights(net, lambda w: w.round(), kinds=(nn.Linear, nn.Conv2d))
    assert q[0].weight.shape == (4, 1, 3, 3) and torch.equal(q[0].weight, net[0].weight.round())
    with pytest.raises(ValueError, match="fn must return"):
        map_weights(net, lambda w: w[:1])
    with pytest.raises(TypeError, match="fn must be callable"):
        map_weights(net, 3)


@pytest.mark.parametrize("call,err,words", [
    (lambda: bf.mx_quantize(torch.ones(30)), ValueError, "multiple of block=32"),
    (lambda: bf.mx_quantize(torch.ones(32), "fp16"), ValueError, "element must be"),
    (lambda: bf.mx_quantize(torch.ones(32), block=0), ValueError, "block"),
    (lambda: bf.nf4_quantize(torch.tensor([float("nan")] * 64)), ValueError, "finite"),
    (lambda: bf.block_fake_quantize(torch.ones(64), "int4"), ValueError, "kind must be"),
    (lambda: bf.kmeans_codebook(torch.ones(8), bits=9), ValueError, "bits"),
    (lambda: bf.codebook_finetune_step(bf.kmeans_codebook(torch.ones(8), 1), torch.ones(9), 0.1),
     ValueError, "grad's shape"),
    (lambda: bf.to_gguf_mxfp4(bf.nf4_quantize(torch.ones(64))), ValueError, "MXFP4"),
    (lambda: bf.codebook_finetune_step(bf.kmeans_codebook(torch.ones(8), 1), torch.ones(8), 0.1, "max"),
     ValueError, "reduce must be"),
    (lambda: bf.stored_bits("int4", (4, 64)), ValueError, "kind must be"),
    (lambda: bf.block_fake_quantize(torch.ones(64), "nf4", block=0), ValueError, "block"),
])
def test_bad_input_is_named(call, err, words):
    with pytest.raises(err) as e:
        call()
    assert words in str(e.value)
