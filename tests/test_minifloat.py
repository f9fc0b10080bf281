"""quantlab.minifloat against casts nobody here wrote: ml_dtypes (every format) and torch (FP8, fp16, bf16).

Edge cases per format: every code decoded; every value, every midpoint between neighbours (a tie)
and the float32 numbers just either side of it; zeros of both signs, the smallest subnormal, the
largest finite value, the overflow threshold, inf and NaN. Then 10**6 random float32 values spread
over 40 binades per format."""

import ml_dtypes
import numpy as np
import pytest
import torch

from quantlab import minifloat as mf

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e2m1": ml_dtypes.float4_e2m1fn,
      "e8m0": ml_dtypes.float8_e8m0fnu, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
TORCH = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "fp16": torch.float16,
         "bf16": torch.bfloat16}


def _uint(f):
    return np.uint16 if f.bits == 16 else np.uint8


def _ml_codes(x: np.ndarray, f) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(ML[f.name]).view(_uint(f)).astype(np.int64)


def _edge_values(f) -> np.ndarray:
    v = f.values.numpy()
    v = v[np.isfinite(v)]
    v = np.unique(v)
    mids = (v[1:] + v[:-1]) / 2
    mids32 = mids.astype(np.float32)
    keep = mids32.astype(np.float64) == mids  # ties representable in float32 (all here)
    ties = mids32[keep]
    near = np.concatenate([np.nextafter(ties, np.float32(-np.inf)), np.nextafter(ties, np.float32(np.inf))])
    top = np.float32(f.max)
    with np.errstate(over="ignore"):
        over = np.array([top * 1.0625, top * 1.125, top * 1.25, top * 1.5, top * 2, np.inf], np.float32)
    specials = np.array([0.0, -0.0, f.min_subnormal / 2, f.min_subnormal / 4, f.min_subnormal],
                        np.float32)
    x = np.concatenate([v.astype(np.float32), ties, near, over, specials])
    x = x[np.isfinite(x) | np.isinf(x)]
    if not f.signed:
        x = x[x > 0]
    return np.concatenate([x, -x]) if f.signed else x


@pytest.mark.parametrize("name", list(ML))
def test_every_code_decodes_as_ml_dtypes(name):
    f = mf.get_format(name)
    codes = np.arange(2**f.bits).astype(_uint(f))
    with np.errstate(invalid="ignore"):
        ref = codes.view(ML[name]).astype(np.float64)
    assert np.array_equal(ref, f.values.numpy(), equal_nan=True)
    ours = mf.decode(torch.from_numpy(codes.astype(np.int64)), f).numpy()
    with np.errstate(invalid="ignore"):
        assert np.array_equal(ref.astype(np.float32), ours, equal_nan=True)
    assert f.max == float(ml_dtypes.finfo(ML[name]).max)


@pytest.mark.parametrize("name", list(ML))
def test_edge_cases_encode_as_ml_dtypes_without_saturation(name):
    f = mf.get_format(name)
    x = _edge_values(f)
    ours = mf.encode(torch.from_numpy(x), f, saturate=False).numpy()
    ref = _ml_codes(x, f)
    bad = ours != ref
    assert not bad.any(), list(zip(x[bad][:8], ref[bad][:8], ours[bad][:8]))


@pytest.mark.parametrize("name", list(ML))
def test_a_million_random_values_encode_as_ml_dtypes(name):
    f = mf.get_format(name)
    rng = np.random.default_rng(list(ML).index(name))
    x = (rng.standard_normal(10**6) * np.exp2(rng.uniform(-20, 20, 10**6))).astype(np.float32)
    if not f.signed:
        x = np.abs(x) + np.float32(1e-30)
    ours = mf.encode(torch.from_numpy(x), f, saturate=False).numpy()
    assert np.array_equal(ours, _ml_codes(x, f))


@pytest.mark.parametrize("name", list(TORCH))
def test_torch_casts(name):
    # torch's float8_e4m3fn cast saturates (finite and inf -> +-448), its e5m2, fp16 and bf16 casts
    # overflow to inf: quantlab's saturate=True and saturate=False respectively
    f = mf.get_format(name)
    x = _edge_values(f)
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(10**5) * np.exp2(rng.uniform(-20, 20, 10**5))
    x = np.concatenate([x, noise.astype(np.float32)])
    t = torch.from_numpy(x)
    ref = t.to(TORCH[name]).view(torch.uint16 if f.bits == 16 else torch.uint8).to(torch.int64).numpy()
    ours = mf.encode(t, f, saturate=(name == "e4m3")).numpy()
    if name in ("fp16", "bf16"):  # torch's NaN payload differs from the first NaN code: compare as NaN
        nan = np.isnan(x)
        assert np.array_equal(ours[~nan], ref[~nan])
        assert np.isnan(f.values[ours[nan]].numpy()).all()
    else:
        assert np.array_equal(ours, ref)


def test_saturation_and_overflow_by_family():
    big = torch.tensor([500.0, 1e6, float("inf"), -float("inf")])
    assert mf.round_to(big, "e4m3").tolist() == [448.0, 448.0, 448.0, -448.0]
    assert torch.isnan(mf.round_to(big, "e4m3", saturate=False)).all()  # E4M3 has no inf
    assert mf.round_to(big, "e5m2", saturate=False).tolist() == [512.0, float("inf"), float("inf"),
                                                                 -float("inf")]
    assert mf.round_to(big, "e2m1", saturate=False).tolist() == [6.0, 6.0, 6.0, -6.0]  # neither


def test_ties_go_to_the_even_code():
    # E2M1's positive values: 0, .5, 1, 1.5, 2, 3, 4, 6 (codes 0..7)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert mf.round_to(ties, "e2m1").tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert mf.encode(torch.tensor([-0.0, 0.0, -0.1]), "e2m1").tolist() == [8, 0, 8]  # signed zeros


def test_format_facts():
    assert (mf.E4M3.max, mf.E5M2.max, mf.E2M1.max, mf.FP16.max) == (448.0, 57344.0, 6.0, 65504.0)
    assert (mf.E4M3.min_subnormal, mf.E5M2.min_subnormal, mf.E2M1.min_subnormal) == (2**-9, 2**-16, 0.5)
    assert (mf.E4M3.min_normal, mf.E2M1.min_normal) == (2**-6, 1.0)
    assert [f.bits for f in (mf.E4M3, mf.E5M2, mf.E2M1, mf.E8M0, mf.FP16, mf.BF16)] == [8, 8, 4, 8, 16, 16]
    assert int(torch.isfinite(mf.E4M3.values).sum()) == 254  # 256 codes minus two NaNs


@pytest.mark.parametrize("call,err,words", [
    (lambda: mf.get_format("fp8"), ValueError, "format must be"),
    (lambda: mf.encode([1.0], "e4m3"), TypeError, "x must be"),
    (lambda: mf.encode(torch.tensor([1, 2]), "e4m3"), TypeError, "floating-point"),
    (lambda: mf.encode(torch.tensor([float("nan")]), "e2m1"), ValueError, "NaN"),
    (lambda: mf.encode(torch.tensor([0.0]), "e8m0"), ValueError, "no zero"),
    (lambda: mf.encode(torch.tensor([1.0]), "e4m3", saturate=1), TypeError, "saturate"),
    (lambda: mf.decode(torch.tensor([1.0]), "e4m3"), TypeError, "integer tensor"),
    (lambda: mf.decode(torch.tensor([16]), "e2m1"), ValueError, "[0, 15]"),
])
def test_bad_input_is_named(call, err, words):
    with pytest.raises(err, match=None) as e:
        call()
    assert words in str(e.value)
