"""W8A8 integer arithmetic against kernels nobody here wrote: ONNX Runtime's DynamicQuantizeLinear
and MatMulInteger, its quantizer's own weight rounding (``quantize_data``), ``torch._int_mm``, and
the whole TinyGPT through ``quantize_dynamic`` in ONNX Runtime."""

import platform
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.reference import x86_uses_vnni
from quantlab.w8a8 import (
    DynamicQuantLinear,
    Int8Linear,
    dynamic_quantize_linear,
    int8_linear,
    int8_linears,
    matmul_integer,
    ort_dynamic_gpt,
    quantize_embedding,
    quantize_per_token,
    quantize_weight,
)

ort = pytest.importorskip("onnxruntime")
od = pytest.importorskip("quantlab.ort_dynamic")

#: ONNX Runtime multiplies uint8 x int8 exactly where the CPU adds the products in int32 (VNNI on
#: x86, any ARM CPU); x86 without VNNI uses AVX2's vpmaddubsw, which saturates pairs of products
#: to int16 (notebook g_deploy), so full-range u8 x s8 comparisons are exact only here
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
U8S8_EXACT = not X86 or bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
needs_u8s8 = pytest.mark.skipif(not U8S8_EXACT, reason="x86 without VNNI: ONNX Runtime's u8 x s8 "
                                "kernel saturates int16 pairs (vpmaddubsw)")


def ort_dql(x: torch.Tensor):
    q, s, z = od.run_op("DynamicQuantizeLinear", x.numpy(), outputs=3)
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(np.asarray(s)), int(z)


def assert_same_as_ort(x):
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    q, scale, zero_point = dynamic_quantize_linear(x)
    q_o, s_o, z_o = ort_dql(x)
    assert torch.equal(q, q_o), (x, q, q_o)
    assert scale.view(torch.int32) == s_o.view(torch.int32)  # bit for bit
    assert int(zero_point) == z_o


@pytest.mark.parametrize("x", [
    [0.0], [0.0, 0.0, 0.0], [5.0], [-5.0], [1.0, 2.0, 3.0], [-1.0, -2.0], [2.5, -2.5],
    # ties of x / scale and of the zero point (scale 1 exactly): halves go to the even integer
    [-127.5, 127.5, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5],
    [0.0, 255.0, 0.5, 1.5, 2.5, 3.5, 254.5],
    [1e38, -1e38], [3e37, 1.0], [-1e-38, 2e-38], [1e-40, 0.0], [-1e-40],
    [1e-30, 2e-30, -3e-30], [7.0] * 9, [-3.0, 1e-7, 2.9999998],
])
def test_dynamic_quantize_linear_is_byte_identical_with_onnxruntime_on_edge_cases(x):
    assert_same_as_ort(x)


@settings(max_examples=200, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                elements=st.floats(-1e4, 1e4, width=32)),
       magnitude=st.sampled_from([1e-20, 1e-3, 1.0, 1e6, 1e30]))
def test_dynamic_quantize_linear_is_byte_identical_with_onnxruntime(x, magnitude):
    x = (x * np.float32(magnitude)).astype(np.float32)
    assume(np.isfinite(x).all())
    span = float(max(x.max(), 0)) - float(min(x.min(), 0))
    assume(span == 0 or span / 255 > 1e-37)  # the scale stays a normal float32
    assert_same_as_ort(x)


def test_dynamic_quantize_linear_refuses_what_has_no_uint8_scale():
    with pytest.raises(ValueError, match="no float32 uint8 scale"):
        dynamic_quantize_linear(torch.tensor([3e38, -3e38]))      # max - min overflows
    with pytest.raises(ValueError, match="no float32 uint8 scale"):
        dynamic_quantize_linear(torch.tensor([1e-45]))            # the scale underflows to 0
    with pytest.raises(ValueError, match="finite"):
        dynamic_quantize_linear(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="x must be a float32"):
        dynamic_quantize_linear(torch.zeros(3, dtype=torch.float64))


def codes(rng, shape, kind):
    lo, hi = {"u8": (0, 255), "s8": (-128, 127), "s8_reduced": (-64, 64)}[kind]
    return torch.from_numpy(rng.integers(lo, hi + 1, shape).astype(np.int32))


def ort_matmul_integer(a, za, b, zb, a_type, b_type):
    return od.run_op("MatMulInteger", a.numpy().astype(a_type), b.numpy().astype(b_type),
                     np.asarray(za, a_type), np.asarray(zb, b_type))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 12), seed=st.integers(0, 2**16),
       b_kind=st.sampled_from(["u8", "s8_reduced", "s8"]), per_column=st.booleans())
def test_matmul_integer_equals_onnxruntime_matmulinteger(m, k, n, seed, b_kind, per_column):
    if b_kind == "s8" and not U8S8_EXACT:
        pytest.skip("full-range u8 x s8 saturates on x86 without VNNI")
    rng = np.random.default_rng(seed)
    a, b = codes(rng, (2, m, k), "u8"), codes(rng, (k, n), b_kind)
    za = int(rng.integers(0, 256))
    b_type = np.uint8 if b_kind == "u8" else np.int8
    zb = codes(rng, (n,), "u8" if b_kind == "u8" else "s8") if per_column else \
        torch.tensor(int(codes(rng, (), "u8" if b_kind == "u8" else "s8")))
    acc = matmul_integer(a, za, b, zb)
    assert acc.dtype == torch.int32
    assert np.array_equal(acc.numpy(), ort_matmul_integer(a, za, b, zb.numpy(), np.uint8, b_type))


def int_mm(a, b):
    """torch._int_mm's int32 product, or None where it is not exact: on x86 it runs in oneDNN,
    whose kernels without VNNI (ONEDNN_MAX_CPU_ISA=AVX2 or lower, or an AVX2 CPU) shift int8 to
    uint8 and add products in int16 pairs with saturation: measured [[65, 115]] @ [[-120], [-92]]
    = -5632 instead of -18380 (torch 2.14.1)."""
    if X86 and not x86_uses_vnni("onednn"):
        return None
    # fresh row-major copies: torch 2.14.1's CPU _int_mm reads a (1, n) mat2 with strides (1, 1)
    # (a transposed (n, 1) weight, K = 1) with the wrong leading dimension and returns garbage
    a, b = (t.clone(memory_format=torch.contiguous_format) for t in (a, b))
    try:
        return torch._int_mm(a, b)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 80), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_matmul_integer_equals_torch_int_mm(m, k, n, seed):
    # torch._int_mm on the CPU: 2-D int8 (or uint8) x int8 -> int32, any m, k, n (CUDA asks for
    # m > 16 and k, n multiples of 8)
    rng = np.random.default_rng(seed)
    a, b = codes(rng, (m, k), "s8"), codes(rng, (k, n), "s8")
    expected = int_mm(a.to(torch.int8), b.to(torch.int8))
    if expected is None:
        pytest.skip("torch._int_mm is not exact here (no VNNI in oneDNN) or does not run")
    assert torch.equal(matmul_integer(a, 0, b, 0), expected)
    a_u8 = codes(rng, (m, k), "u8")
    assert torch.equal(matmul_integer(a_u8, 0, b, 0), int_mm(a_u8.to(torch.uint8), b.to(torch.int8)))


def test_matmul_integer_worst_case_accumulator_is_exact():
    k = 4096
    a, b = torch.full((1, k), -128), torch.full((k, 1), -128)
    assert matmul_integer(a, 127, b, 127).item() == k * 255 * 255  # 266,342,400 < 2**31


def test_matmul_integer_validates_its_arguments():
    a, b = torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="a must be an integer"):
        matmul_integer(a.float(), 0, b, 0)
    with pytest.raises(ValueError, match="b must hold 8-bit codes"):
        matmul_integer(a, 0, b + 300, 0)
    with pytest.raises(ValueError, match="same K"):
        matmul_integer(a, 0, b.T, 0)
    with pytest.raises(ValueError, match="b_zero_point must be a scalar or hold one value per"):
        matmul_integer(a, 0, b, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="a_zero_point must be an int"):
        matmul_integer(a, 0.5, b, 0)


weights = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                 elements=st.floats(-3.0, 3.0, width=32))


@settings(max_examples=150, deadline=None)
@given(w=weights, per_channel=st.booleans(), zero_row=st.booleans())
def test_quantize_weight_equals_onnxruntime_quantizer(w, per_channel, zero_row):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data
    if zero_row:
        w[0] = 0.0
    q, scale = quantize_weight(torch.from_numpy(w), per_channel)
    rows = list(w) if per_channel else [w.reshape(-1)]
    for i, row in enumerate(rows):    # ONNX Runtime's own Python quantizer, row by row
        zp, s, q_ort = quantize_data(row.reshape(-1), TensorProto.INT8, True)
        assert int(zp) == 0
        assert float(s) == float(scale[i] if per_channel else scale)
        assert np.array_equal(q_ort.astype(np.int32), (q[i] if per_channel else q).reshape(-1).numpy())
    assert int(q.abs().max()) <= 127


@settings(max_examples=100, deadline=None)
@given(w=weights)
def test_quantize_embedding_equals_onnxruntime_quantizer(w):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data
    q, scale, zero_point = quantize_embedding(torch.from_numpy(w))
    zp, s, q_ort = quantize_data(w.reshape(-1), TensorProto.UINT8, False)
    assert (int(zp), float(s)) == (int(zero_point), float(scale))
    assert np.array_equal(q_ort.astype(np.int32), q.reshape(-1).numpy())


@settings(max_examples=100, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 48)),
                elements=st.floats(-50.0, 50.0, width=32)),
       seed=st.integers(0, 2**16), n=st.integers(1, 9))
def test_int8_linear_integer_part_exact_float_part_within_its_bound(x, seed, n):
    x = torch.from_numpy(x)
    x[0] = 0.0                                    # an all-zero token: scale 1, codes 0
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, x.shape[1], generator=g), torch.randn(n, generator=g)
    q_x, s_x = quantize_per_token(x)
    assert bool(((x.double() - q_x * s_x.double()).abs() <= s_x / 2 * (1 + 2**-20)).all())  # half a step
    assert s_x[0].item() == 1.0 and int(q_x[0].abs().max()) == 0
    q_w, s_w = quantize_weight(w, per_channel=True)
    acc = matmul_integer(q_x, 0, q_w.T)
    oracle = int_mm(q_x.to(torch.int8), q_w.T.to(torch.int8))
    assert oracle is None or torch.equal(acc, oracle)
    y = int8_linear(x, q_w, s_w, b)
    core = acc.double() * s_x.double() * s_w.double()
    bound = 2.0**-22 * core.abs() + 2.0**-23 * y.double().abs() + 2.0**-149 * acc.double().abs()
    assert bool(((y.double() - (core + b.double())).abs() <= bound).all())


def test_int8_linears_swaps_every_linear_and_stays_close_to_float(tiny_gpt, val_idx):
    q = int8_linears(tiny_gpt)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 16
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    with torch.no_grad():
        y, y_q = tiny_gpt(val_idx), q(val_idx)
    assert (y.argmax(-1) == y_q.argmax(-1)).double().mean() > 0.97


@pytest.fixture(scope="module")
def tiny_gpt():
    from quantlab.training import pretrained_tinygpt
    return pretrained_tinygpt()


@pytest.fixture(scope="module")
def val_idx():
    from quantlab.text import load_corpus, windows
    return windows(load_corpus().val, 64)[:3, :-1]


@pytest.fixture(scope="module")
def onnx_paths(tiny_gpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    f = od.export_gpt(tiny_gpt, folder / "tinygpt.onnx")
    return f, {pc: od.quantize_onnx(f, folder / f"q{int(pc)}.onnx", pc) for pc in (False, True)}


def test_exported_float_model_matches_torch(tiny_gpt, onnx_paths, val_idx):
    with torch.no_grad():
        diff = (od.run(od.session(onnx_paths[0]), val_idx) - tiny_gpt(val_idx)).abs().max().item()
    assert diff < 1e-3   # measured 5e-5 to 8e-5: LayerNorm, attention and erf kernels differ


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dynamic_stores_quantlabs_weights(tiny_gpt, onnx_paths, per_channel):
    stored = od.onnx_weights(onnx_paths[1][per_channel])
    linears = {n: m.weight for n, m in tiny_gpt.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(stored) == set(linears) | {"head"}
    for name, (q_w, scale) in stored.items():
        w = tiny_gpt.tok.weight if name == "head" else linears[name]
        q, s = quantize_weight(w.detach(), per_channel)
        assert torch.equal(q, q_w) and torch.equal(s, scale), name


@needs_u8s8
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_quantized_matmul_is_bit_exact_with_onnxruntime_given_its_input(
        tiny_gpt, onnx_paths, val_idx, per_channel):
    result = od.linear_check(tiny_gpt, onnx_paths[1][per_channel], val_idx, per_channel)
    assert len(result) == 19   # 16 Linears, the head, the two embedding tables
    assert {name: d for name, (d, _) in result.items() if d} == {}


@needs_u8s8
def test_one_linear_alone_is_bit_exact_fused_and_unfused(tmp_path):
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    with warnings.catch_warnings():    # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(lin, (x,), tmp_path / "lin.onnx", dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    for pc in (False, True):
        path = od.quantize_onnx(tmp_path / "lin.onnx", tmp_path / f"q{pc}.onnx", pc)
        expected = DynamicQuantLinear(lin, pc)(x)
        for optimize in (False, True):
            y = od.session(path, optimize).run(None, {"x": x.numpy()})[0]
            assert torch.equal(torch.from_numpy(y), expected), (pc, optimize)


def test_whole_model_onnxruntime_against_quantlab(tiny_gpt, onnx_paths, val_idx):
    sim = ort_dynamic_gpt(tiny_gpt, per_channel=False)
    with torch.no_grad():
        y_sim, y_float = sim(val_idx), tiny_gpt(val_idx)
    y_ort = od.run(od.session(onnx_paths[1][False], optimize=False), val_idx)
    # the MatMuls agree bit for bit; LayerNorm, attention and GELU kernels differ in the last
    # bits, which flips a few activation codes downstream: small, far below quantization's effect
    diff = (y_ort - y_sim).abs().max().item()
    assert diff < 0.3 * (y_sim - y_float).abs().max().item()   # measured 0.03 to 0.09
    assert (y_ort.argmax(-1) != y_sim.argmax(-1)).double().mean() < 0.02
    flips = od.code_flips(tiny_gpt, onnx_paths[1][False], val_idx, False)
    assert len(flips) == 17 and all(f.total > 0 for f in flips.values())
    assert sum(f.flips for f in flips.values()) < 0.1 * sum(f.total for f in flips.values())


@needs_u8s8
def test_matmuls_only_leaves_the_tables_float_in_both(tiny_gpt, onnx_paths, val_idx, tmp_path):
    path = od.quantize_onnx(onnx_paths[0], tmp_path / "q.onnx", False, quantize_tables=False)
    result = od.linear_check(tiny_gpt, path, val_idx, False)
    assert len(result) == 17 and not any(d for d, _ in result.values())
    sim = ort_dynamic_gpt(tiny_gpt, quantize_tables=False)
    assert torch.equal(sim.tok.weight, tiny_gpt.tok.weight)
    flips = od.code_flips(tiny_gpt, path, val_idx, False)
    assert flips["blocks.0.qkv"].max_abs_input_diff < 1e-5   # the same embeddings in both


def test_fusing_dynamicquantizematmul_changes_nothing(onnx_paths, val_idx):
    effects = od.fusion_effects(onnx_paths[1][True], val_idx)
    assert effects["all but GeluFusionL2, SkipLayerNormFusion"] == 0.0


def test_ort_dynamic_gpt_validates_its_arguments(tiny_gpt):
    with pytest.raises(TypeError, match="model must be a quantlab.models.TinyGPT"):
        ort_dynamic_gpt(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="per_channel must be True or False"):
        ort_dynamic_gpt(tiny_gpt, per_channel="yes")
    with pytest.raises(TypeError, match="w must be a float32"):
        quantize_weight(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="q_w must be"):
        int8_linear(torch.zeros(2, 3), torch.zeros(4, 5, dtype=torch.int32), torch.ones(4))
