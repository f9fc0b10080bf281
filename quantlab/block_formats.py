"""Block formats: values in small blocks that share one scale (MXFP8/MXFP4, NVFP4, NF4), and a codebook.

Each block of ``block`` consecutive values (along the last axis) stores one scale and ``block``
small codes:

- **MX** (OCP Microscaling Formats v1.0): blocks of 32, the scale a power of two stored as E8M0,
  ``X = floor(log2(amax)) - emax_elem`` (``emax_elem`` = the exponent of the element format's largest
  value: 2 for E2M1, 8 for E4M3, 15 for E5M2), clamped to E8M0's [-127, 127]; each element is
  ``x / 2**X`` rounded to the element format (ties to even) with saturation. MXFP4 = E2M1
  elements, MXFP8 = E4M3 (or E5M2) elements.
- **NVFP4**: blocks of 16, E2M1 elements, the scale ``amax / 6`` rounded to (unsigned) E4M3, and one
  float32 scale per tensor, ``amax_tensor / (6 * 448)``, so the block scales fit E4M3's range.
- **NF4** (QLoRA, Dettmers et al. 2023): blocks of 64, the scale ``absmax`` (float32), each value
  ``x * (1 / absmax)`` mapped to the nearest of 16 "normal float" levels (:data:`NF4_LEVELS`,
  quantiles of N(0, 1) scaled to [-1, 1] with an exact zero), by bitsandbytes' rule: code = the
  number of midpoints strictly below the value (a tie goes to the lower level).
- **Codebook** (k-means, Deep Compression): ``2**bits`` centroids per tensor found by Lloyd's
  algorithm from a linear initialisation, each weight stored as the index of its nearest centroid;
  :func:`codebook_finetune_step` moves each centroid by the summed gradient of its weights.

Conventions and oracles are in tests/test_block_formats.py: MXFP4 blocks are byte-identical with the
``gguf`` package's quantizer except where that quantizer differs from the OCP rounding (listed there),
NVFP4 blocks decode identically with ``gguf``'s dequantizer, NF4's levels are bitsandbytes' constants,
and the codebook equals ``scipy.cluster.vq.kmeans2`` from the same initial centroids.

Taught in notebook ``l_number_formats``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._validate import check_bool, check_float_tensor, check_int
from .minifloat import E2M1, E4M3, E8M0, decode, encode, get_format

#: QLoRA's NF4 levels as bitsandbytes stores them (float32), code 0 .. 15
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


class BlockQuant(NamedTuple):
    """A tensor in a block format: ``codes`` (int32, the input's shape), ``scale`` (one per block:
    E8M0/E4M3 codes as int32 for MX/NVFP4, float32 for NF4), ``tensor_scale`` (NVFP4's float32
    scale; 1.0 otherwise), the format's name, its element format and block size."""

    codes: torch.Tensor
    scale: torch.Tensor
    tensor_scale: float
    kind: str
    element: str
    block: int


def _blocks(x: torch.Tensor, block: int, name: str = "x") -> torch.Tensor:
    check_float_tensor(x, name)
    check_int(block, "block", low=1)
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"{name}'s last dimension ({tuple(x.shape)[-1:] or 'none'}) must be a "
                         f"multiple of block={block}")
    return x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def emax(fmt) -> int:
    """The exponent of the largest finite value of an element format (E2M1: 2, E4M3: 8, E5M2: 15)."""
    return math.frexp(get_format(fmt).max)[1] - 1


def mx_scale_exponent(amax: torch.Tensor, element) -> torch.Tensor:
    """MX's shared exponent ``floor(log2(amax)) - emax(element)`` (int32), clamped to [-127, 127];
    an all-zero block gets -127. ``frexp`` gives the exact exponent (no float log2)."""
    _, e = torch.frexp(amax.double())
    x = (e.long() - 1) - emax(element)
    x = torch.where(amax > 0, x, torch.full_like(x, -127))
    return x.clamp(-127, 127).to(torch.int32)


def mx_quantize(x: torch.Tensor, element="e2m1", block: int = 32) -> BlockQuant:
    """``x`` (float, last dimension a multiple of ``block``) in an MX format: E8M0 scale codes
    (``X + 127``) per block and element codes (saturated, ties to even)."""
    f = get_format(element)
    if f.name not in ("e2m1", "e4m3", "e5m2"):
        raise ValueError(f"element must be 'e2m1', 'e4m3' or 'e5m2', got {f.name!r}")
    b = _blocks(x, block)
    X = mx_scale_exponent(b.abs().amax(-1), f)
    scaled = torch.ldexp(b.double(), -X.unsqueeze(-1).double())  # exact: a power of two
    codes = encode(scaled, f, saturate=True)
    return BlockQuant(codes.reshape(x.shape), (X + 127).to(torch.int32), 1.0, "mx", f.name, block)


def nvfp4_quantize(x: torch.Tensor, block: int = 16) -> BlockQuant:
    """``x`` in NVFP4: a float32 tensor scale ``amax / (6 * 448)``, E4M3 block scales ``amax_block /
    6 / tensor_scale`` (ties to even), E2M1 elements of ``x / (tensor_scale * block_scale)``."""
    b = _blocks(x, block)
    amax = float(b.abs().max())
    tensor_scale = torch.tensor(amax / (E2M1.max * E4M3.max) if amax > 0 else 1.0, dtype=torch.float32)
    block_scale = b.abs().amax(-1) / E2M1.max / tensor_scale
    s_codes = encode(block_scale, E4M3, saturate=True)
    s = decode(s_codes, E4M3) * tensor_scale
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # an all-zero block: codes 0
    codes = encode(b * inv.unsqueeze(-1), E2M1, saturate=True)
    return BlockQuant(codes.reshape(x.shape), s_codes, float(tensor_scale), "nvfp4", "e2m1", block)


def nf4_quantize(x: torch.Tensor, block: int = 64) -> BlockQuant:
    """``x`` in NF4: a float32 absmax per block and a 4-bit level index per value (bitsandbytes' rule)."""
    b = _blocks(x, block)
    absmax = b.abs().amax(-1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    y = b * inv.unsqueeze(-1)
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # float32, as bitsandbytes' decision tree
    codes = torch.searchsorted(mids, y.contiguous(), right=False).to(torch.int32)  # #mids < y
    return BlockQuant(codes.reshape(x.shape), absmax, 1.0, "nf4", "nf4", block)


def block_dequantize(bq: BlockQuant) -> torch.Tensor:
    """The float32 values of a :class:`BlockQuant`."""
    shape = bq.codes.shape
    codes = bq.codes.reshape(*shape[:-1], shape[-1] // bq.block, bq.block)
    if bq.kind == "nf4":
        v = NF4_LEVELS[codes.long()] * bq.scale.unsqueeze(-1)
    elif bq.kind == "mx":
        v = torch.ldexp(decode(codes, bq.element).double(), (bq.scale.double() - 127).unsqueeze(-1))
    elif bq.kind == "nvfp4":
        s = decode(bq.scale, E4M3) * torch.tensor(bq.tensor_scale, dtype=torch.float32)
        v = decode(codes, E2M1) * s.unsqueeze(-1)
    else:
        raise ValueError(f"kind must be 'mx', 'nvfp4' or 'nf4', got {bq.kind!r}")
    return v.float().reshape(shape)


def bits_per_value(bq: BlockQuant) -> float:
    """Stored bits per value: the element's bits plus the block scale's bits spread over the block
    (and NVFP4's tensor scale over the tensor)."""
    element_bits = 4 if bq.kind in ("nf4", "nvfp4") else get_format(bq.element).bits
    scale_bits = {"mx": E8M0.bits, "nvfp4": E4M3.bits, "nf4": 32}[bq.kind]
    extra = 32 / bq.codes.numel() if bq.kind == "nvfp4" else 0.0
    return element_bits + scale_bits / bq.block + extra


#: the block formats by name: (quantizer, default block size)
BLOCK_KINDS = {"mxfp4": (lambda x, b: mx_quantize(x, "e2m1", b), 32),
               "mxfp8": (lambda x, b: mx_quantize(x, "e4m3", b), 32),
               "nvfp4": (nvfp4_quantize, 16),
               "nf4": (nf4_quantize, 64)}


def _kind(kind: str):
    if kind not in BLOCK_KINDS:
        raise ValueError(f"kind must be one of {sorted(BLOCK_KINDS)}, got {kind!r}")
    return BLOCK_KINDS[kind]


def block_fake_quantize(x: torch.Tensor, kind: str, block: int | None = None) -> torch.Tensor:
    """``x`` rounded through a block format and back (float32, same shape), blocks along the last
    dimension, which is padded with zeros to a whole number of blocks (zeros change no block's
    amax) and cropped again: ``kind`` is ``"mxfp4"``, ``"mxfp8"`` (E4M3 elements), ``"nvfp4"`` or
    ``"nf4"``; ``block`` defaults to the format's (32, 32, 16, 64)."""
    quantize, default = _kind(kind)
    block = default if block is None else block
    check_float_tensor(x, "x")
    check_int(block, "block", low=1)
    n = x.shape[-1] if x.dim() else 1
    padded = torch.nn.functional.pad(x.detach().float().reshape(*x.shape[:-1], n), (0, (-n) % block))
    return block_dequantize(quantize(padded, block))[..., :n].reshape(x.shape)


def stored_bits(kind: str, shape, block: int | None = None, padded: bool = False) -> int:
    """Bits a weight of ``shape`` (blocks along its last dimension) takes in a block format: 4 or 8
    per element, plus every block's scale (8 bits for E8M0 and E4M3, 32 for NF4's absmax; the last,
    partial block of a row has one too) and NVFP4's float32 tensor scale.

    With ``padded=False`` only the ``rows * n`` real values are counted as elements; with
    ``padded=True`` also the zeros that pad each row to whole blocks, as a file that stores whole
    blocks holds them (a gguf MXFP4 block is always 17 bytes): ``rows * blocks_per_row * block``
    elements.
    """
    _, default = _kind(kind)
    block = default if block is None else check_int(block, "block", low=1)
    padded = check_bool(padded, "padded")
    shape = tuple(shape)
    n = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    blocks = rows * -(-n // block)
    element = 8 if kind == "mxfp8" else 4
    scale = 32 if kind == "nf4" else 8
    values = blocks * block if padded else rows * n
    return values * element + blocks * scale + (32 if kind == "nvfp4" else 0)


def to_gguf_mxfp4(bq: BlockQuant) -> bytes:
    """An MXFP4 :class:`BlockQuant` (blocks of 32) in llama.cpp's MXFP4 layout: per block the E8M0
    byte, then 16 bytes, byte ``j`` holding element ``j`` (low nibble) and ``j + 16`` (high)."""
    if bq.kind != "mx" or bq.element != "e2m1" or bq.block != 32:
        raise ValueError("to_gguf_mxfp4 needs an MXFP4 BlockQuant (mx, e2m1, block 32)")
    c = bq.codes.reshape(-1, 32).to(torch.uint8)
    qs = c[:, :16] | (c[:, 16:] << 4)
    return torch.cat([bq.scale.reshape(-1, 1).to(torch.uint8), qs], dim=1).numpy().tobytes()


# -- a k-means codebook (Deep Compression, Han et al. 2016) ----------------------------------------


class Codebook(NamedTuple):
    """A tensor as ``2**bits`` float32 ``centroids`` and an int64 ``index`` per value (its shape)."""

    centroids: torch.Tensor
    index: torch.Tensor


def _assign(flat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (flat[:, None] - centroids[None, :]).abs().argmin(dim=1)  # ties: the first centroid


def kmeans_codebook(w: torch.Tensor, bits: int, iterations: int = 30) -> Codebook:
    """Lloyd's k-means on the values of ``w`` with ``2**bits`` centroids, initialised evenly between
    min and max (Deep Compression's linear initialisation); an empty cluster keeps its centroid."""
    check_float_tensor(w, "w")
    check_int(bits, "bits", low=1, high=8)
    check_int(iterations, "iterations", low=0)
    flat = w.detach().double().reshape(-1)
    centroids = torch.linspace(float(flat.min()), float(flat.max()), 2**bits, dtype=torch.float64)
    for _ in range(iterations):
        idx = _assign(flat, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, flat)
        counts = torch.bincount(idx, minlength=len(centroids)).double()
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return Codebook(centroids.float(), _assign(flat, centroids).reshape(w.shape))


def codebook_values(cb: Codebook) -> torch.Tensor:
    """The tensor the codebook stands for: ``centroids[index]``."""
    return cb.centroids[cb.index]


def codebook_finetune_step(cb: Codebook, grad: torch.Tensor, lr: float, reduce: str = "sum") -> Codebook:
    """One step of centroid fine-tuning: each centroid moves by ``-lr`` times the gradient of the loss
    with respect to it, the sum of the gradients of the weights that share it (Deep Compression;
    ``reduce="mean"`` divides by their number, so large and small clusters move alike). The indices
    stay."""
    if not isinstance(grad, torch.Tensor) or grad.shape != cb.index.shape:
        raise ValueError(f"grad's shape {tuple(getattr(grad, 'shape', ()))} must be the codebook's "
                         f"{tuple(cb.index.shape)}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    idx = cb.index.reshape(-1)
    g = torch.zeros_like(cb.centroids).index_add_(0, idx, grad.detach().float().reshape(-1))
    if reduce == "mean":
        g = g / torch.bincount(idx, minlength=len(cb.centroids)).clamp(min=1)
    return Codebook(cb.centroids - lr * g, cb.index)


__all__ = ["BLOCK_KINDS", "NF4_LEVELS", "BlockQuant", "Codebook", "bits_per_value",
           "block_dequantize", "block_fake_quantize", "codebook_finetune_step", "codebook_values", "emax",
           "kmeans_codebook", "mx_quantize", "mx_scale_exponent", "nf4_quantize", "nvfp4_quantize",
           "stored_bits", "to_gguf_mxfp4"]
