"""Small floating-point formats (fp16, bf16, FP8 E4M3/E5M2, FP4 E2M1, the E8M0 scale) as lists of values.

A format of ``n`` bits is its ``2**n`` codes: a sign bit (absent in E8M0), ``exponent_bits`` of
biased exponent and ``mantissa_bits`` of fraction. :func:`decode` turns codes into float32 values by
the IEEE-754 rules (subnormals where the exponent field is 0); what the top codes mean is what
distinguishes the families:

- ``"ieee"`` (fp16, bf16, E5M2): the all-ones exponent holds inf (fraction 0) and NaN;
- ``"fn"`` (E4M3FN, "finite, NaN"): no inf; only the all-ones code S.1111.111 is NaN, so the top
  binade holds values (E4M3's largest is 448, not 240);
- ``"none"`` (E2M1): every code is a number (no inf, no NaN); largest 6;
- E8M0 (the MX scale) is unsigned, a bare exponent ``2**(code - 127)``, no zero, code 255 is NaN.

:func:`encode` rounds float values to the nearest code, ties to the even code (IEEE's
roundTiesToEven; the two neighbours of a tie are consecutive codes, so exactly one is even). Above the
largest finite value a spec leaves a choice: ``saturate=True`` (the default, what a quantizer wants,
and what ``torch``'s ``.to(torch.float8_e4m3fn)`` does) clamps to +-max; ``saturate=False`` follows
IEEE rounding into the next (missing) binade: inf for ``"ieee"`` formats, NaN for ``"fn"`` ones and
E8M0 (``ml_dtypes``' casts), and E2M1, which has neither, saturates either way. NaN encodes as NaN where the
format has one and is refused where it has none (E2M1). ``tests/test_minifloat.py`` checks every
code and 10**6 random values per format against ``ml_dtypes`` and ``torch``.

Taught in notebook ``l_number_formats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ._validate import check_bool, check_float_tensor

FAMILIES = ("ieee", "fn", "none", "e8m0")
__all__ = ["BF16", "E2M1", "E4M3", "E5M2", "E8M0", "FAMILIES", "FORMATS", "FP16", "FP32", "FloatFormat",
           "decode", "encode", "get_format", "round_to", "scaled_round"]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: its name, field widths, exponent bias and family."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    family: str

    @property
    def bits(self) -> int:
        return self.exponent_bits + self.mantissa_bits + (0 if self.family == "e8m0" else 1)

    @property
    def signed(self) -> bool:
        return self.family != "e8m0"

    @cached_property
    def values(self) -> torch.Tensor:
        """The value of every code 0 .. 2**bits - 1 (float64; NaN where the code is NaN)."""
        return _decode_table(self)

    @cached_property
    def _positive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, codes) of the non-negative finite codes, increasing (sign bit off)."""
        half = 2 ** (self.bits - 1) if self.signed else 2**self.bits
        v = self.values[:half]
        keep = torch.isfinite(v)
        return v[keep], torch.arange(half)[keep]

    @property
    def max(self) -> float:
        """The largest finite value."""
        return float(self._positive[0][-1])

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias) if self.family != "e8m0" else 2.0**-127

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.mantissa_bits) if self.family != "e8m0" else 2.0**-127

    def __repr__(self) -> str:
        return (f"FloatFormat({self.name}: {self.bits} bits, E{self.exponent_bits}M{self.mantissa_bits}, "
                f"bias {self.bias}, max {self.max:g})")


FP32 = FloatFormat("fp32", 8, 23, 127, "ieee")  # described, never tabulated (2**32 codes)
FP16 = FloatFormat("fp16", 5, 10, 15, "ieee")
BF16 = FloatFormat("bf16", 8, 7, 127, "ieee")
E4M3 = FloatFormat("e4m3", 4, 3, 7, "fn")        # OCP FP8 E4M3 = float8_e4m3fn
E5M2 = FloatFormat("e5m2", 5, 2, 15, "ieee")     # OCP FP8 E5M2 = float8_e5m2
E2M1 = FloatFormat("e2m1", 2, 1, 1, "none")      # OCP FP4 (MXFP4's element) = float4_e2m1fn
E8M0 = FloatFormat("e8m0", 8, 0, 127, "e8m0")    # the MX scale = float8_e8m0fnu
FORMATS = {f.name: f for f in (FP16, BF16, E4M3, E5M2, E2M1, E8M0)}


def get_format(fmt) -> FloatFormat:
    """A :class:`FloatFormat`, or its name (``"e4m3"``, ...)."""
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    raise ValueError(f"format must be a FloatFormat or one of {sorted(FORMATS)}, got {fmt!r}")


def _decode_table(f: FloatFormat) -> torch.Tensor:
    if f.bits > 16:
        raise ValueError(f"{f.name} has {f.bits} bits: too many codes to tabulate (16 at most)")
    codes = torch.arange(2**f.bits, dtype=torch.int64)
    m_mask, e_mask = 2**f.mantissa_bits - 1, 2**f.exponent_bits - 1
    frac = (codes & m_mask).double()
    exp = (codes >> f.mantissa_bits) & e_mask
    if f.family == "e8m0":
        v = torch.pow(2.0, (exp - f.bias).double())
        return torch.where(exp == e_mask, torch.nan, v)
    sign = torch.where((codes >> (f.bits - 1)) & 1 == 1, -1.0, 1.0).double()
    normal = torch.ldexp(1.0 + frac / 2**f.mantissa_bits, (exp - f.bias).double())
    subnormal = torch.ldexp(frac / 2**f.mantissa_bits, torch.tensor(1.0 - f.bias).double())
    v = sign * torch.where(exp == 0, subnormal, normal)
    if f.family == "ieee":
        top = exp == e_mask
        v = torch.where(top & (frac == 0), sign * torch.inf, v)
        v = torch.where(top & (frac != 0), torch.nan, v)
    elif f.family == "fn":
        v = torch.where((exp == e_mask) & (frac == m_mask), torch.nan, v)
    return v


def decode(codes: torch.Tensor, fmt) -> torch.Tensor:
    """The float32 values of integer ``codes`` of format ``fmt``."""
    f = get_format(fmt)
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**f.bits):
        raise ValueError(f"codes of {f.name} are in [0, {2**f.bits - 1}], got "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    return f.values[codes.long()].float()


def _nan_code(f: FloatFormat) -> int | None:
    nan = torch.isnan(f.values).nonzero().flatten()
    return int(nan[0]) if len(nan) else None


def encode(x: torch.Tensor, fmt, saturate: bool = True) -> torch.Tensor:
    """The code (int32) of the value of ``fmt`` nearest to each element of ``x``, ties to even.

    ``saturate`` decides what happens above the largest finite value (see the module's docstring).
    """
    f = get_format(fmt)
    check_float_tensor(x, "x", finite=False)  # inf and NaN have codes (see above)
    check_bool(saturate, "saturate")
    x = x.detach().double()
    nan = torch.isnan(x)
    if nan.any() and _nan_code(f) is None:
        raise ValueError(f"x has NaN, which {f.name} cannot represent")
    vals, codes = f._positive
    a = x.abs() if f.signed else x
    if not f.signed and bool((x[~nan] <= 0).any()):
        raise ValueError(f"{f.name} is unsigned and has no zero: x must be > 0")
    # the neighbours below and above each |x|, and the value one step past the largest (overflow)
    top = vals[-1]
    step = torch.tensor(2.0 ** (math.frexp(float(top))[1] - 1 - f.mantissa_bits), dtype=torch.float64)
    ext_vals = torch.cat([vals, (top + step).reshape(1)])
    ext_codes = torch.cat([codes, (codes[-1] + 1).reshape(1)])
    a_in = a.clamp(max=float(top + step)).nan_to_num(0.0)  # inf: one step past the top; NaN: later
    i = torch.searchsorted(ext_vals, a_in).clamp(1, len(ext_vals) - 1)
    lo, hi = ext_vals[i - 1], ext_vals[i]
    c_lo, c_hi = ext_codes[i - 1], ext_codes[i]
    mid = (lo + hi) / 2  # exact in float64 for every format here
    # a tie goes to the even code; E8M0 has no fraction bits, and its ties round up (ml_dtypes'
    # rule: 1.5 * 2**k -> 2**(k+1)). MX computes its scales with floor(log2), never by rounding.
    even = torch.ones_like(c_hi, dtype=torch.bool) if f.family == "e8m0" else c_hi % 2 == 0
    pick_hi = (a > mid) | ((a == mid) & even)
    code = torch.where(pick_hi, c_hi, c_lo)
    exact_low = a <= ext_vals[0]
    code = torch.where(exact_low, ext_codes[0], code)
    over = code > codes[-1]  # rounded past the largest finite value
    if saturate or f.family == "none":
        code = torch.where(over, codes[-1], code)
    elif f.family == "ieee":
        inf = int((f.values == torch.inf).nonzero()[0])
        code = torch.where(over, torch.tensor(inf), code)
    else:  # "fn" and E8M0: NaN
        code = torch.where(over, torch.tensor(_nan_code(f)), code)
    if f.signed:
        negative = torch.signbit(x) & ~nan
        code = torch.where(negative, code + 2 ** (f.bits - 1), code)
    if nan.any():
        code = torch.where(nan, torch.tensor(_nan_code(f)), code)
    return code.to(torch.int32)


def round_to(x: torch.Tensor, fmt, saturate: bool = True) -> torch.Tensor:
    """``x`` rounded to the nearest value of ``fmt`` (ties to even), as float32."""
    return decode(encode(x, fmt, saturate), fmt)


def scaled_round(x: torch.Tensor, fmt, axis: int | None = None, saturate: bool = True):
    """``x`` rounded to ``fmt`` after a float32 scale maps its largest magnitude onto the format's
    largest value: ``scale = amax / fmt.max`` per tensor (``axis=None``) or per index of ``axis``
    (per channel), ``x_hat = round_to(x / scale) * scale``. Returns ``(x_hat, scale)``; an all-zero
    slice gets scale 1. This is how FP8 weights are stored with a per-tensor or per-channel scale."""
    f = get_format(fmt)
    check_float_tensor(x, "x")
    if axis is None:
        amax = x.detach().abs().amax().float()
    else:
        if not isinstance(axis, int) or isinstance(axis, bool) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis must be None or an int in [{-x.dim()}, {x.dim() - 1}], got {axis!r}")
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        amax = x.detach().abs().amax(dim=dims, keepdim=True).float()
    scale = torch.where(amax > 0, amax / f.max, torch.ones_like(amax))
    return round_to(x.detach().float() / scale, f, saturate) * scale, scale
