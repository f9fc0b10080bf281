"""Exercises of lesson i (i_low_bit_weights): statements, stubs, worked solutions, and the mistakes the
checker must catch (each planted in a copy of the solutions by tests/test_check.py)."""

from ._common import Mistake, ex  # noqa: F401

LESSON = dict(
    notebook="i_low_bit_weights",
    title="i · Exercises: groups, packing and bytes per weight (练习: 低比特权重)",
    goal="Write the pieces of weight-only quantization that lesson i builds the tiny GPT's 4-bit weights from: "
         "symmetric quantization in groups along the input, two 4-bit integers packed into one byte and unpacked "
         "again, and the bytes a quantized Linear really stores. The checker compares them with "
         "`quantlab.weight_only`, whose blocks lesson i checks byte for byte against gguf's quantizers.",
    oracle='`quantlab.weight_only`',
    setup='''\
# setup: torch and the checker
import torch

from quantlab import check''',
    exercises=[
        ex(1, "quantize_groups_symmetric", "symmetric quantization in groups along the input",
           r"""
           Cut each row of the weight `w` (out, in), float32, into groups of $g$ = `group_size` consecutive inputs
           (`group_size` divides `in`): group $k$ of row $o$ is `w[o, k*g:(k+1)*g]`. Each group gets the symmetric grid of
           lesson i, section 2.2, with $q_{max} = 2^{b-1} - 1$ for $b$ = `bits` (7 at 4 bits, 1 at 2 bits):
           $$ S = \frac{\max_i |w_i|}{q_{max}}, \qquad q_i = \mathrm{clamp}\big(\mathrm{round}(w_i \cdot \tfrac{1}{S}),\ -q_{max},\ q_{max}\big) $$
           with $S$ and $w_i \cdot \tfrac{1}{S}$ computed in float32 (the float32 reciprocal, as quantlab), rounded half to even
           (`torch.round`). An all-zero group has $S = 0$ and $q_i = 0$. Return `(q, scale)`: `q` the signed integers, an
           int32 tensor of `w`'s shape, and `scale` of shape (out, in // group_size) **stored as float16**, as
           `quantize_groups` stores it (the integers are computed with the float32 $S$ before it is rounded to float16).""",
           '''
           def quantize_groups_symmetric(w, bits=4, group_size=32):
               """(q, scale): int32 q (out, in) in [-q_max, q_max] and float16 scale (out, in // group_size)."""''',
           '''
           out_features, in_features = w.shape
           groups = w.reshape(out_features, in_features // group_size, group_size)   # consecutive inputs of a row
           q_max = 2 ** (bits - 1) - 1
           scale = groups.abs().amax(dim=2) / q_max                            # float32, one per group
           inv = torch.where(scale == 0, 0.0, 1.0 / scale)                     # an all-zero group: q = 0
           q = torch.clamp(torch.round(groups * inv[:, :, None]), -q_max, q_max)
           return q.reshape(out_features, in_features).to(torch.int32), scale.to(torch.float16)'''),
        ex(2, "pack_int4", "two 4-bit integers per byte",
           r"""
           Lesson i, section 3.1: the signed integers $q \in [-8, 7]$ of a 4-bit grid are stored as unsigned **codes**
           $c = q + 8 \in [0, 15]$, two to a byte, the first in the low nibble:
           $$ \text{byte}_k = c_{2k} + 16\, c_{2k+1} $$
           `q` is a 1-d int32 tensor of any length $n$; for an odd $n$ the last byte holds $c_{n-1}$ in its low nibble and 0
           in its high nibble. Return the $\lceil n/2 \rceil$ bytes as a uint8 tensor (what `quantlab.weight_only.pack(q + 8, 4)`
           stores).""",
           '''
           def pack_int4(q):
               """uint8 bytes (ceil(n / 2),) of the signed 4-bit integers q (n,): codes q + 8, low nibble first."""''',
           '''
           codes = (q + 8).to(torch.int32)                       # unsigned codes 0..15
           if codes.numel() % 2:
               codes = torch.cat([codes, codes.new_zeros(1)])    # an odd count: high nibble 0
           return (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)'''),
        ex(3, "unpack_int4", "unpack them again",
           r"""
           The inverse of i2: from the bytes, code $2k$ is the low nibble $\text{byte}_k \,\&\, 15$ and code $2k+1$ the high
           nibble $\text{byte}_k \gg 4$; $q = c - 8$. `packed` is a uint8 tensor; return the first `numel` integers $q$ (an odd
           `numel` leaves a padding nibble) as a 1-d int32 tensor. Convert the bytes to int32 before any arithmetic: in
           uint8, $c - 8$ wraps around.""",
           '''
           def unpack_int4(packed, numel):
               """int32 q (numel,) of bytes written by pack_int4."""''',
           '''
           b = packed.to(torch.int32)                                  # never compute in uint8
           codes = torch.stack([b & 15, b >> 4], dim=1).reshape(-1)    # low nibble first
           return codes[:numel] - 8'''),
        ex(4, "weight_bytes", "the bytes a weight-only Linear stores",
           r"""
           Count, as `WeightOnlyLinear.weight_bytes()` does (lesson i, sections 2.3 and 3.4), the bytes of a Linear's weight
           (out, in) quantized at $b$ = `bits` $\in \{2, 3, 4, 8\}$ in groups of $g$ = `group_size` inputs (`None`: one group per
           row, $g$ = in):
           - **codes**: the out $\cdot$ in codes of the whole weight, packed as one row-major sequence: $8/b$ codes per byte
             for 2, 4 and 8 bits, and for 3 bits 8 codes in a 3-byte word; the last byte (word) is padded, once, at the end;
           - **scales**: one float16 scale per group, 2 bytes each; a row has $n_{groups} = \lceil \mathrm{in} / g \rceil$ groups
             (the last one shorter when $g$ does not divide in);
           - **zero points**: only when not `symmetric`: one $b$-bit code per group, the out $\cdot\ n_{groups}$ of them
             packed the same way as the codes.

           Return `(code_bytes, scale_bytes, zero_point_bytes)` as three Python ints.""",
           '''
           def weight_bytes(out_features, in_features, bits, group_size, symmetric):
               """(code_bytes, scale_bytes, zero_point_bytes) stored for a (out, in) weight."""''',
           '''
           per_word, word_bytes = (8, 3) if bits == 3 else (8 // bits, 1)

           def packed(n):                          # n codes packed in whole words, padded once
               return -(-n // per_word) * word_bytes

           n_groups = 1 if group_size is None else -(-in_features // group_size)
           code_bytes = packed(out_features * in_features)
           scale_bytes = 2 * out_features * n_groups       # float16
           zero_point_bytes = 0 if symmetric else packed(out_features * n_groups)
           return code_bytes, scale_bytes, zero_point_bytes'''),
    ])

#: (exercise, text in its solution, the mistake, words its hint must contain)
MISTAKES: list[Mistake] = [
    Mistake('quantize_groups_symmetric', 'q_max = 2 ** (bits - 1) - 1',
            'q_max = 2 ** (bits - 1)',
            'max|w| / q_max', 'S = max|w| / 2**(bits-1)'),
    Mistake('quantize_groups_symmetric', 'scale = groups.abs().amax(dim=2) / q_max',
            'scale = groups.abs().amax(dim=2) / (q_max + 0.5)',
            'max|w| / q_max', "lesson a's (qmax - qmin) / 2"),
    Mistake('quantize_groups_symmetric',
            'groups = w.reshape(out_features, in_features // group_size, group_size)',
            'groups = w.reshape(out_features, group_size, in_features // group_size).transpose(1, 2)',
            'consecutive inputs of one row', 'strided groups'),
    Mistake('quantize_groups_symmetric', 'groups.abs().amax(dim=2)',
            'groups.amax(dim=2)',
            'largest magnitude', 'max instead of max|w|'),
    Mistake('quantize_groups_symmetric', 'torch.round(groups * inv[:, :, None])',
            'torch.sign(groups) * torch.floor(groups.abs() * inv[:, :, None] + 0.5)',
            'round half to even', 'ties away from zero'),
    Mistake('quantize_groups_symmetric', 'torch.round(groups * inv[:, :, None])',
            'torch.floor(groups * inv[:, :, None] + 0.5)',
            'round half to even', 'ties up (floor(y + 0.5))'),
    Mistake('quantize_groups_symmetric', 'torch.round(groups * inv[:, :, None])',
            'torch.round(torch.nan_to_num(groups / scale[:, :, None]))',
            'float32 reciprocal', 'divides by S'),
    Mistake('quantize_groups_symmetric', 'inv = torch.where(scale == 0, 0.0, 1.0 / scale)',
            'inv = torch.where(scale == 0, 0.0, 1.0 / scale.half().float())',
            'with the float32 scale', 'q from the float16 scale'),
    Mistake('quantize_groups_symmetric', 'scale = groups.abs().amax(dim=2) / q_max',
            'scale = torch.clamp(groups.abs().amax(dim=2) / q_max, min=torch.finfo(torch.float32).eps)',
            'all-zero group', "lesson a's EPS floor"),
    Mistake('quantize_groups_symmetric', 'scale.to(torch.float16)',
            'scale',
            'as float16', 'float32 scale returned'),
    Mistake('quantize_groups_symmetric', 'q.reshape(out_features, in_features).to(torch.int32)',
            'q.reshape(out_features, in_features).to(torch.int32) + 2 ** (bits - 1)',
            'not the stored codes', 'codes, not q'),
    Mistake('pack_int4', 'codes = (q + 8).to(torch.int32)',
            'codes = (q & 15).to(torch.int32)',
            'q + 8', "two's-complement nibbles"),
    Mistake('pack_int4', 'codes = (q + 8).to(torch.int32)',
            'codes = q.to(torch.int32)',
            'q + 8', 'no offset'),
    Mistake('pack_int4', '(codes[0::2] | (codes[1::2] << 4))',
            '((codes[0::2] << 4) | codes[1::2])',
            'low nibble', 'nibbles swapped'),
    Mistake('pack_int4', '(codes[0::2] | (codes[1::2] << 4))',
            '(codes[:len(codes) // 2] | (codes[len(codes) // 2:] << 4))',
            'consecutive codes share a byte', "gguf's half-block pairing"),
    Mistake('pack_int4', 'codes = torch.cat([codes, codes.new_zeros(1)])',
            'codes = torch.cat([codes, codes.new_full((1,), 8)])',
            'odd count', 'padded with q = 0'),
    Mistake('pack_int4', '.to(torch.uint8)',
            '.to(torch.int32)',
            'asks for uint8', 'int32 bytes'),
    Mistake('unpack_int4', 'b = packed.to(torch.int32)',
            'b = packed',
            'wraps around', 'uint8 arithmetic'),
    Mistake('unpack_int4', 'return codes[:numel] - 8',
            'return codes[:numel]',
            'code - 8', 'offset not removed'),
    Mistake('unpack_int4', 'return codes[:numel] - 8',
            'return ((codes[:numel] << 28) >> 28)',
            'code - 8', "two's-complement nibbles"),
    Mistake('unpack_int4', 'torch.stack([b & 15, b >> 4], dim=1)',
            'torch.stack([b, b >> 4], dim=1)',
            'byte & 15', 'low nibble not masked'),
    Mistake('unpack_int4', 'torch.stack([b & 15, b >> 4], dim=1)',
            'torch.stack([b >> 4, b & 15], dim=1)',
            'low nibble', 'nibbles swapped'),
    Mistake('unpack_int4', 'return codes[:numel] - 8',
            'return codes - 8',
            'exactly numel values', 'padding kept'),
    Mistake('weight_bytes', 'scale_bytes = 2 * out_features * n_groups',
            'scale_bytes = 4 * out_features * n_groups',
            '2 bytes each', 'float32 scales'),
    Mistake('weight_bytes', 'n_groups = 1 if group_size is None else -(-in_features // group_size)',
            'n_groups = 1 if group_size is None else in_features // group_size',
            'ceil(in / group_size)', 'groups floored'),
    Mistake('weight_bytes', 'zero_point_bytes = 0 if symmetric else packed(out_features * n_groups)',
            'zero_point_bytes = packed(out_features * n_groups)',
            'no zero point is stored', 'zero points when symmetric'),
    Mistake('weight_bytes', 'zero_point_bytes = 0 if symmetric else packed(out_features * n_groups)',
            'zero_point_bytes = 0 if symmetric else out_features * n_groups',
            'packed at `bits` bits', 'zero points one byte each'),
    Mistake('weight_bytes', 'code_bytes = packed(out_features * in_features)',
            'code_bytes = out_features * packed(in_features)',
            'padded once at its end', 'rows padded separately'),
    Mistake('weight_bytes', 'return -(-n // per_word) * word_bytes',
            'return -(-n * bits // 8)',
            '3-byte word', '3 bits: ceil(3n / 8) bytes'),
    Mistake('weight_bytes', 'return code_bytes, scale_bytes, zero_point_bytes',
            'return code_bytes / 1, scale_bytes, zero_point_bytes',
            'three Python ints', 'a float'),
]
