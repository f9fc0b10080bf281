"""The checks of exercises/i_exercises.ipynb: symmetric per-group quantization, packing 4-bit integers two
to a byte and unpacking them, and the bytes a weight-only Linear stores (notebook i_low_bit_weights).
The oracle is ``quantlab.weight_only`` (``quantize_groups``, ``pack``, ``unpack``, ``WeightOnlyLinear``),
which lesson i checks byte for byte against gguf's Q8_0/Q4_0 quantizers."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from ..weight_only import WeightOnlyLinear, pack, quantize_groups, unpack
from .common import Case, Exercise, Mismatch, exact_ints, floats32, same_floats, show, t


def _ints(v):
    return t(v, torch.int32)


# -- i1 quantize_groups_symmetric -------------------------------------------------------------------

# w * f32(1 / S) and w / S round to different integers here (S = f32(0.54282457 / 7)); the float16
# scale gives the same integers as the float32 one
RECIPROCAL_W = [[0.5428245663642883, 0.19386592507362366, -0.10000000149011612, 0.30000001192092896]]
# here the float16 scale moves -0.6050050 (-5.49996 steps of the float32 scale) to -6; the reciprocal
# and the quotient agree
FLOAT16_W = [[0.7700115442276001, 0.281036376953125, -0.7687194347381592, -0.6050050258636475]]


def _i1_oracle(w, bits=4, group_size=32):
    gq = quantize_groups(w, bits, group_size, symmetric=True)
    return gq.codes - 2 ** (bits - 1), gq.scale


def _i1_compare(e, g):
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        return Mismatch("a tuple (q, scale)", show(g), "return the tuple (q, scale)")
    (q_e, s_e), (q_g, s_g) = e, g
    if isinstance(q_g, torch.Tensor) and q_g.shape == q_e.shape and q_g.numel() and \
            not q_g.is_floating_point() and q_g.dtype != torch.bool:
        offset = (q_g.to(torch.int64) - q_e.to(torch.int64)).unique()
        if len(offset) == 1 and int(offset) > 0 and int(offset) & (int(offset) - 1) == 0:
            return Mismatch(f"q: {show(q_e)}", f"q: {show(q_g)}",
                            "return the signed integers q in [-q_max, q_max], not the stored codes "
                            "q + 2**(bits-1)")
    m = exact_ints(q_e, q_g, "q")
    if m is not None:
        return m
    if isinstance(s_g, torch.Tensor) and s_g.is_floating_point() and s_g.dtype != torch.float16:
        return Mismatch(f"scale: {show(s_e)}", f"scale: {show(s_g)}",
                        "store the scale as float16 (2 bytes per group, as lesson i): compute q with "
                        "the float32 scale, then return scale.to(torch.float16)")
    return same_floats(s_e, s_g, "scale")


def _i1():
    cases = [
        Case(dict(w=t([[0.7, -0.23, 0.33, -0.42], [0.2, 0.9, -0.61, 0.05]]), bits=4, group_size=4),
             "S = max|w| / q_max with q_max = 2**(bits-1) - 1 (7 at 4 bits): the largest |w| lands "
             "exactly on q_max (not 2**(bits-1), nor lesson a's (quant_max - quant_min) / 2)"),
        Case(dict(w=t([[0.11, -0.21, 0.33, 0.4, 3.0, -1.1, 2.0, 0.6],
                       [-0.3, 0.23, 0.1, 0.37, 0.27, 0.53, -0.75, 1.4]]), bits=4, group_size=4),
             "a group is group_size consecutive inputs of one row, w[o, k*g:(k+1)*g]: reshape w to "
             "(out, in // group_size, group_size)"),
        Case(dict(w=t([[0.3, -1.4, 0.47, 1.1], [-0.23, 0.1, -0.9, 0.61]]), bits=3, group_size=2),
             "the scale comes from the largest magnitude max|w| (abs first): in a group here the "
             "weight of largest magnitude is negative"),
        Case(dict(w=t([[7.0, 2.5, -0.5, 1.5, -2.5, 0.5, 3.5, -7.0]]), bits=4, group_size=8),
             "ties: S = 1, so w * (1 / S) = 2.5, -0.5, ... exactly; round half to even "
             "(torch.round): 2.5 -> 2, -0.5 -> 0"),
        Case(dict(w=t(RECIPROCAL_W), bits=4, group_size=4),
             "multiply by the float32 reciprocal 1 / S (as quantlab and PyTorch); dividing by S "
             "rounds a weight here to the other integer"),
        Case(dict(w=t(FLOAT16_W), bits=4, group_size=4),
             "compute q with the float32 scale; round S to float16 only to store it (the float16 "
             "scale moves a weight here to the other integer)"),
        Case(dict(w=t([[0.0, 0.0, 0.5, -0.25], [0.0, 0.0, 0.0, 0.0]]), bits=4, group_size=2),
             "an all-zero group has scale 0 and q = 0 (no EPS floor as in lesson a, and no 0/0)"),
        Case(dict(w=t([[0.4, -0.1, 0.05, -0.6, 0.2, 0.35]]), bits=2, group_size=3),
             "2 bits: q_max = 1, the ternary grid {-S, 0, S}"),
        Case(dict(w=t([[0.013, -1.27, 0.6, 0.3], [1.0, 0.25, -0.125, 0.75]]), bits=8, group_size=4),
             "8 bits: q_max = 127"),
    ]

    value = st.one_of(st.just(0.0), floats32(1e-3, 10.0), floats32(-10.0, -1e-3))

    @st.composite
    def strat(draw):
        bits = draw(st.sampled_from([2, 3, 4, 8]))
        out, n_groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        g = draw(st.sampled_from([1, 2, 3, 4, 8]))
        vals = draw(st.lists(value, min_size=out * n_groups * g, max_size=out * n_groups * g))
        return Case(dict(w=t(vals).reshape(out, n_groups * g), bits=bits, group_size=g))

    return Exercise("i", 1, "quantize_groups_symmetric", _i1_oracle, _i1_compare, lambda: cases,
                    strat, "per group of group_size consecutive inputs: S = max|w| / (2**(bits-1) - 1) "
                    "in float32, q = clamp(round(w * (1 / S)), -q_max, q_max) half to even, as int32; "
                    "the scale returned as float16")


# -- i2 pack_int4, i3 unpack_int4 -----------------------------------------------------------------

def _i2_oracle(q):
    return pack(q + 8, 4)


def _i2():
    cases = [
        Case(dict(q=_ints([-3, -3, -3, -3])),
             "store the code q + 8 (0..15), not q itself or its two's-complement nibble (q & 15)"),
        Case(dict(q=_ints([-8, 7])),
             "code 2k goes in the low nibble, code 2k+1 in the high nibble: byte = c[2k] + 16 * c[2k+1]"),
        Case(dict(q=_ints([-8, -7, -6, -5, 4, 5, 6, 7])),
             "consecutive codes share a byte: codes 2k and 2k+1 go to byte k (gguf's Q4_0 pairs code j "
             "with code j + 16 of its block instead)"),
        Case(dict(q=_ints([1, -2, 3])),
             "an odd count: the last byte holds the last code in its low nibble and 0 in its high nibble"),
        Case(dict(q=_ints([7])), "a single value: one byte, high nibble 0"),
    ]

    @st.composite
    def strat(draw):
        q = draw(st.lists(st.integers(-8, 7), min_size=1, max_size=12))
        return Case(dict(q=_ints(q)))

    return Exercise("i", 2, "pack_int4", _i2_oracle, exact_ints, lambda: cases, strat,
                    "codes c = q + 8; byte k = c[2k] + 16 * c[2k+1] (low nibble first), the last high "
                    "nibble 0 for an odd count, as a uint8 tensor")


def _i3_oracle(packed, numel):
    return unpack(packed, 4, numel) - 8


def _i3_compare(e, g):
    if isinstance(g, torch.Tensor) and g.dtype == torch.uint8:
        return Mismatch(show(e), show(g), "compute in int32 (packed.to(torch.int32)) and return int32: "
                        "in uint8, code - 8 wraps around (3 - 8 is 251)")
    return exact_ints(e, g)


def _i3():
    u8 = lambda v: t(v, torch.uint8)  # noqa: E731
    cases = [
        Case(dict(packed=u8([0x00, 0x00]), numel=4),
             "q = code - 8: the codes 0..15 are offset by 8 (code 0 is q = -8), not two's-complement "
             "nibbles"),
        Case(dict(packed=u8([0x77, 0x33]), numel=4),
             "take the low nibble with a mask: code 2k = byte & 15, code 2k+1 = byte >> 4"),
        Case(dict(packed=u8([0xF0, 0x21]), numel=4),
             "code 2k is in the low nibble (byte & 15), code 2k+1 in the high nibble (byte >> 4)"),
        Case(dict(packed=u8([0x21, 0x03]), numel=3),
             "return exactly numel values: an odd count leaves a padding nibble in the last byte"),
        Case(dict(packed=u8([0x8F, 0x7E, 0x19]), numel=6)),
    ]

    @st.composite
    def strat(draw):
        n = draw(st.integers(1, 12))
        codes = draw(st.lists(st.integers(0, 15), min_size=n, max_size=n))
        return Case(dict(packed=pack(_ints(codes), 4), numel=n))

    return Exercise("i", 3, "unpack_int4", _i3_oracle, _i3_compare, lambda: cases, strat,
                    "codes: byte & 15 (first), byte >> 4 (second), computed in int32; the first numel "
                    "of them, minus 8")


# -- i4 weight_bytes -------------------------------------------------------------------------------

def _i4_oracle(out_features, in_features, bits, group_size, symmetric):
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    m = WeightOnlyLinear.from_linear(linear, bits, group_size, symmetric)
    zp = 0 if m.packed_zero_point is None else m.packed_zero_point.numel()
    assert m.weight_bytes() == m.packed.numel() + 2 * m.scale.numel() + zp
    return m.packed.numel(), 2 * m.scale.numel(), zp


PART_NAMES = ("code_bytes", "scale_bytes", "zero_point_bytes")


def _i4_compare(e, g):
    if not isinstance(g, (tuple, list)) or len(g) != 3:
        return Mismatch(f"a tuple {PART_NAMES}", show(g), f"return the tuple {PART_NAMES}")
    if not all(type(v) is int for v in g):
        return Mismatch(show(tuple(e)), f"{show(tuple(g))} ({', '.join(type(v).__name__ for v in g)})",
                        "return three Python ints (whole bytes: use // and ceil division, not /)")
    for name, want, got in zip(PART_NAMES, e, g):
        if want == got:
            continue
        hint = None  # the case's hint
        if name == "zero_point_bytes":
            hint = ("symmetric: no zero point is stored (0 bytes)" if want == 0 else
                    "asymmetric: the out * n_groups zero points are packed at `bits` bits like the "
                    "codes (not one byte each)")
        return Mismatch(f"{name} = {want}", f"{name} = {got}", hint)
    return None


def _i4():
    def case(out, n_in, bits, g, sym, hint=""):
        return Case(dict(out_features=out, in_features=n_in, bits=bits, group_size=g, symmetric=sym),
                    hint)

    cases = [
        case(2, 8, 4, 4, True, "one float16 scale per group: 2 bytes each"),
        case(3, 10, 4, 4, False, "in_features not a multiple of group_size: the last group of each "
             "row is shorter, so there are ceil(in / group_size) groups"),
        case(3, 5, 4, 5, True, "the codes of the whole weight are packed as one row-major sequence, "
             "padded once at its end (not row by row)"),
        case(1, 3, 3, None, True, "3 bits: 8 codes in a 3-byte word; a partial word still takes "
             "3 bytes"),
        case(4, 6, 2, None, False, "group_size None: one group (one scale, one zero point) per row"),
        case(2, 16, 8, 4, False, "8 bits: one byte per code"),
        case(5, 7, 3, 3, False),
    ]

    @st.composite
    def strat(draw):
        return case(draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.sampled_from([2, 3, 4, 8])),
                    draw(st.one_of(st.none(), st.integers(1, 48))), draw(st.booleans()))

    return Exercise("i", 4, "weight_bytes", _i4_oracle, _i4_compare, lambda: cases, strat,
                    "codes: ceil(out * in / per_word) words of word_bytes (3 bits: 8 codes in 3 bytes); "
                    "scales: 2 bytes per group; zero points (asymmetric only): out * n_groups codes "
                    "packed the same way")


def exercises() -> list[Exercise]:
    """The exercises of this lesson, in notebook order."""
    return [_i1(), _i2(), _i3(), _i4()]
