"""Rotations for low-bit activations (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

An orthogonal matrix ``Q`` (``Q^T Q = I``) changes no product: ``x W^T = (x Q) (W Q)^T``. Rotating
an input spreads each token's few large values over all its channels, so the largest ``|x|`` of
a row comes closer to its root mean square and a per-token 4-bit grid wastes fewer levels.

:func:`rotate_model` turns a :class:`~quantlab.models.TinyGPT` into a :class:`RotatedGPT` that
computes the same function (SliceGPT/QuaRot's construction, all in float64, then cast back):

1. each LayerNorm's affine ``(gamma, beta)`` is folded into the Linears it feeds
   (``W diag(gamma)``, bias ``b + W beta``; ``ln_f`` into an untied head ``E diag(gamma)``, bias
   ``E beta``);
2. every writer to the residual stream is centred (token and position embeddings, the output rows
   and bias of ``proj`` and ``fc2``: ``C W`` with ``C = I - 11^T / d``), so the stream has zero
   mean and each LayerNorm is an RMSNorm without affine (same ``eps``) of its input;
3. the stream is rotated by ``Q``: embeddings ``E Q``, writers ``Q^T W``, readers ``W Q`` (qkv,
   fc, the head). RMSNorm commutes with ``Q`` (it keeps the norm), so the inputs of ``qkv`` and
   ``fc`` arrive rotated at no run-time cost;
4. the inputs of ``proj`` (the attention's output) and ``fc2`` (GELU's output) are not on the
   stream: for the kinds in ``online`` the Linear becomes ``nn.Sequential(Rotation(R),
   nn.Linear(W R))``, an online rotation (a Hadamard transform costs ``n log n`` per token).
   QuaRot folds a per-head Hadamard for ``proj`` into the value rows; here ``proj``'s rotation is
   online too (one ``d x d`` matrix across heads).

:func:`quantlab.act_quant.quantize_activations` then quantizes the rotated inputs (the inner
Linear of an online rotation is named ``blocks.0.fc2.1``). :func:`online_rotate` puts online
rotations before any Linears of any model and folds nothing (the LayerNorms stay);
:func:`token_outliers` measures, per Linear input, what a per-token grid sees (largest value over
the row's root mean square, kurtosis, the relative error of the 4-bit fake quantization).
Taught in notebook ``k_activations``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_bool, check_int
from .act_quant import fake_quantize_activations
from .models import TinyGPT
from .weight_only import _set_module, linear_names

__all__ = ["ROTATIONS", "ONLINE_KINDS", "hadamard", "random_hadamard", "random_orthogonal",
           "check_orthogonal", "Rotation", "RotatedGPT", "rotate_model", "online_rotate",
           "token_outliers"]

#: the Linears whose input is not on the residual stream (rotated online when asked)
ONLINE_KINDS = ("proj", "fc2")


def _check_power_of_two(n, name: str = "n") -> int:
    n = check_int(n, name, 1)
    if n & (n - 1):
        raise ValueError(f"{name} must be a power of two for a Hadamard matrix (1, 2, 4, ..., "
                         f"128, ...); got {n}")
    return n


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    return generator


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix ``H_n / sqrt(n)`` (float64, n x n).

    ``H_1 = [1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]]``: entries ``+-1/sqrt(n)``, ``H H^T = I``.
    ``n`` must be a power of two (the same matrix as ``scipy.linalg.hadamard(n) / sqrt(n)``)."""
    n = _check_power_of_two(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def random_hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """QuaRot's random Hadamard matrix ``diag(s) H`` (float64, orthogonal): :func:`hadamard` with
    each row's sign flipped at random (``s_i = +-1``, equally likely, drawn from ``generator``).

    A row ``x`` becomes ``x @ Q = (s * x) @ H``: the signs act on the input channels before they are
    mixed (QuaRot's ``H diag(s)`` acting on a column). Flipping the columns' signs instead
    (``H diag(s)``) would only flip the signs of ``x @ H``, which a symmetric grid rounds the same way."""
    h = hadamard(n)
    signs = torch.randint(0, 2, (n,), generator=_check_generator(generator)) * 2 - 1
    return signs.to(h.dtype)[:, None] * h


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal matrix from the uniform (Haar) distribution (float64, n x n): ``Q`` of
    the QR factorization of a standard Gaussian matrix, each column's sign fixed so that ``R`` has a
    positive diagonal (Mezzadri 2007). ``n`` may be any size >= 1."""
    n = check_int(n, "n", 1)
    g = torch.randn(n, n, dtype=torch.float64, generator=_check_generator(generator))
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))


#: rotation names accepted by :func:`rotate_model`: ``n, generator -> (n, n)`` orthogonal
ROTATIONS = {"hadamard": lambda n, _g: hadamard(n), "random_hadamard": random_hadamard,
             "random_orthogonal": random_orthogonal}


def check_orthogonal(matrix, name: str = "rotation", n: int | None = None,
                     tol: float = 1e-6) -> torch.Tensor:
    """``matrix`` must be a square floating-point tensor (``n x n`` if given) with
    ``max |M^T M - I| <= tol`` (computed in float64); returns it."""
    if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor; got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or \
            (n is not None and matrix.shape[0] != n):
        want = f"({n}, {n})" if n is not None else "square"
        raise ValueError(f"{name} must be {want}; got shape {tuple(matrix.shape)}")
    m = matrix.detach().double()
    err = (m.T @ m - torch.eye(m.shape[0], dtype=torch.float64)).abs().max().item()
    if not err <= tol:
        raise ValueError(f"{name} must be orthogonal (max |M^T M - I| <= {tol:g}); got {err:.3g}")
    return matrix


class Rotation(nn.Module):
    """``x -> x @ matrix`` over the last dimension: an online rotation (``matrix`` orthogonal,
    n x n, stored as a buffer in the model's dtype)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", check_orthogonal(matrix, "matrix").detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix

    def extra_repr(self) -> str:
        return f"n={self.matrix.shape[0]}"


class RotatedGPT(nn.Module):
    """A TinyGPT after :func:`rotate_model`: rotated embeddings ``tok``/``pos``, the blocks (their
    LayerNorms replaced by RMSNorms without affine), ``ln_f`` an RMSNorm, and an untied head
    ``logits = ln_f(x) @ head_weight^T + head_bias`` (plain parameters, not an ``nn.Linear``: like
    TinyGPT's tied head it stays float when the Linears are quantized)."""

    def __init__(self, tok: nn.Embedding, pos: nn.Embedding, blocks: nn.ModuleList, ln_f: nn.Module,
                 head_weight: torch.Tensor, head_bias: torch.Tensor, context: int):
        super().__init__()
        self.context = context
        self.tok, self.pos, self.blocks, self.ln_f = tok, pos, blocks, ln_f
        self.head_weight = nn.Parameter(head_weight.detach().clone())
        self.head_bias = nn.Parameter(head_bias.detach().clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"idx holds {t} positions; the context is {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.head_weight, self.head_bias)


def _fold_affine(ln: nn.LayerNorm, linear: nn.Linear):
    """``linear(gamma * n + beta) = (W diag(gamma)) n + (b + W beta)``: fold ln's affine into linear."""
    linear.bias.add_(linear.weight @ ln.bias)
    linear.weight.mul_(ln.weight)


def _center(linear: nn.Linear):
    """``C W`` and ``C b`` (``C = I - 11^T/d``): the Linear's outputs get zero mean over features."""
    linear.weight.sub_(linear.weight.mean(0, keepdim=True))
    linear.bias.sub_(linear.bias.mean())


def _rotate_block(block, q: torch.Tensor, center: bool):
    """Fold, centre and rotate one block in place (float64): readers ``W Q``, writers ``Q^T W``."""
    _fold_affine(block.ln1, block.qkv)
    _fold_affine(block.ln2, block.fc)
    for writer in (block.proj, block.fc2):
        if center:
            _center(writer)
        writer.weight.copy_(q.T @ writer.weight)
        writer.bias.copy_(writer.bias @ q)
    for reader in (block.qkv, block.fc):
        reader.weight.copy_(reader.weight @ q)
    for name in ("ln1", "ln2"):
        ln = getattr(block, name)
        setattr(block, name, nn.RMSNorm(ln.normalized_shape, eps=ln.eps,
                                        elementwise_affine=False))


def _add_online(model: nn.Module, name: str, matrix: torch.Tensor):
    """Replace the Linear ``name`` by ``Sequential(Rotation(R), Linear(W R))`` in place: for rows
    ``x``, ``(x R)(W R)^T = x R R^T W^T = x W^T``, so the model computes the same function."""
    linear = model.get_submodule(name)
    linear.weight.copy_(linear.weight @ matrix.to(linear.weight.dtype))
    _set_module(model, name, nn.Sequential(Rotation(matrix.to(linear.weight.dtype)), linear))


def _check_model(model):
    if not isinstance(model, TinyGPT):
        raise TypeError(f"model must be a quantlab.models.TinyGPT; got {type(model).__name__}")
    norms = [model.ln_f] + [ln for b in model.blocks for ln in (b.ln1, b.ln2)]
    if not all(isinstance(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None
               for ln in norms):
        raise ValueError("model's LayerNorms must be nn.LayerNorm with weight and bias (an "
                         "unmodified TinyGPT)")
    for name, m in model.named_modules():
        if "." in name and name.rpartition(".")[2] in ("qkv", "proj", "fc", "fc2") \
                and not isinstance(m, nn.Linear):
            raise ValueError(f"{name} is a {type(m).__name__}, not an nn.Linear: rotate the float "
                             f"model, then quantize it")


def _check_online(online) -> tuple:
    if isinstance(online, str) or not all(isinstance(k, str) for k in online):
        raise TypeError(f"online must be a tuple of kinds among {ONLINE_KINDS} (e.g. ('fc2',) or "
                        f"()); got {online!r}")
    bad = [k for k in online if k not in ONLINE_KINDS]
    if bad:
        raise ValueError(f"online must hold kinds among {ONLINE_KINDS}; got {bad}")
    return tuple(dict.fromkeys(online))


def _matrices(rotation, seed: int):
    """``n -> orthogonal (n, n) float64``, drawing every random matrix from one generator."""
    if callable(rotation):
        make = rotation
    elif rotation in ROTATIONS:
        gen = torch.Generator().manual_seed(check_int(seed, "seed", 0))
        make = lambda n: ROTATIONS[rotation](n, gen)  # noqa: E731
    else:
        raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)} or a callable n -> "
                         f"(n, n) orthogonal tensor; got {rotation!r}")

    def matrix(n, what):
        if rotation in ("hadamard", "random_hadamard") and n & (n - 1):
            raise ValueError(f"rotation={rotation!r} needs a power-of-two size: {what} has {n} "
                             f"channels (use 'random_orthogonal' for any size)")
        return check_orthogonal(make(n), f"the rotation of {what}", n).detach().double()
    return matrix


@torch.no_grad()
def rotate_model(model: TinyGPT, rotation="random_hadamard", online=ONLINE_KINDS, seed: int = 0,
                 center: bool = True) -> RotatedGPT:
    """A :class:`RotatedGPT` computing the same function as the TinyGPT ``model`` (unchanged):
    LayerNorm affines folded, writers centred, the residual stream rotated by ``Q`` (d x d), an
    online rotation before the Linears of the kinds in ``online`` (``"proj"``: d x d, ``"fc2"``:
    4d x 4d, one matrix per Linear). See the module's docstring for the algebra.

    ``rotation``: ``"hadamard"``, ``"random_hadamard"`` (QuaRot's; d a power of two),
    ``"random_orthogonal"`` (any d), drawn in order (Q, then block by block) from
    ``torch.Generator().manual_seed(seed)``, or a callable ``n -> (n, n)`` orthogonal tensor.
    Folding runs in float64 and the copy gets ``model``'s dtype: float32 logits match to float32
    rounding. ``center=False`` skips step 2, only to show that it is needed: the copy then differs."""
    _check_model(model)
    online = _check_online(online)
    center = check_bool(center, "center")
    matrix = _matrices(rotation, seed)
    dtype = model.tok.weight.dtype
    work = copy.deepcopy(model).double()
    d = work.tok.weight.shape[1]
    q = matrix(d, "the residual stream (d_model)")
    gamma, beta = work.ln_f.weight, work.ln_f.bias
    head_weight, head_bias = work.tok.weight * gamma, work.tok.weight @ beta
    for emb in (work.tok, work.pos):
        if center:
            emb.weight.sub_(emb.weight.mean(1, keepdim=True))
        emb.weight.copy_(emb.weight @ q)
    for i, block in enumerate(work.blocks):
        _rotate_block(block, q, center)
        for kind in online:
            name = f"blocks.{i}.{kind}"
            _add_online(work, name, matrix(work.get_submodule(name).in_features, name + "'s input"))
    ln_f = nn.RMSNorm(d, eps=work.ln_f.eps, elementwise_affine=False)
    rotated = RotatedGPT(work.tok, work.pos, work.blocks, ln_f, head_weight @ q, head_bias,
                         work.context)
    return rotated.to(dtype).train(model.training)


@torch.no_grad()
def online_rotate(model: nn.Module, names=None, rotation="random_hadamard",
                  seed: int = 0) -> nn.Module:
    """A copy of any ``model`` in which each Linear of ``names`` (default: every ``nn.Linear``)
    reads its input through an online rotation, ``Sequential(Rotation(R), Linear(W R))``, with
    its own ``R`` (``rotation`` and ``seed`` as in :func:`rotate_model`, drawn in the order of
    ``names``). Nothing is folded: LayerNorms stay as they are. The function is unchanged up to
    float rounding (the rotated weights are computed in float64)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    names = linear_names(model) if names is None else list(names)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"names must name nn.Linear modules of model; {name!r} is not one "
                             f"(Linears: {linear_names(model)[:6]}...)")
    if not names:
        raise ValueError("names is empty: nothing to rotate")
    matrix = _matrices(rotation, seed)
    work = copy.deepcopy(model)
    for name in names:
        linear = work.get_submodule(name)
        dtype = linear.weight.dtype
        linear.double()
        _add_online(work, name, matrix(linear.in_features, name + "'s input"))
        work.get_submodule(name).to(dtype)
    return work


@torch.no_grad()
def token_outliers(model: nn.Module, calib: torch.Tensor, names=None, bits: int = 4,
                   batch_size: int = 32) -> dict:
    """What per-token quantization sees at the input of each Linear of ``names`` (default: all)
    over ``calib`` (token ids, (sequences, positions)): ``{name: {"max_to_rms", "kurtosis",
    "error"}}``, each a mean over tokens of: ``max_j |x_j| / sqrt(mean_j x_j^2)`` (the grid's top
    over the row's typical size; about 3 for 128 Gaussian values), the row's kurtosis
    ``mean((x - mean)^4) / var^2`` (3 for a Gaussian), and the relative error of the ``bits``
    per-token fake quantization, ``||Q(x) - x|| / ||x||`` (:mod:`quantlab.act_quant`'s grid)."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.int64:
        raise ValueError("calib must be an int64 tensor of token ids (sequences, positions)")
    names = linear_names(model) if names is None else list(names)
    sums, handles = {n: torch.zeros(4, dtype=torch.float64) for n in names}, []

    def see(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        ms = x.pow(2).mean(1)
        c = x - x.mean(1, keepdim=True)
        err = ((fake_quantize_activations(x, bits) - x).pow(2).sum(1)
               / x.pow(2).sum(1).clamp(min=1e-300)).sqrt()
        sums[name] += torch.stack([x.abs().amax(1).div(ms.sqrt()).sum(),
                                   c.pow(4).mean(1).div(c.pow(2).mean(1).pow(2).clamp(min=1e-300)).sum(),
                                   err.sum(), torch.tensor(float(len(x)), dtype=torch.float64)])
    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: see(name, args[0])))
    try:
        for batch in calib.split(check_int(batch_size, "batch_size", 1)):
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: {"max_to_rms": (v[0] / v[3]).item(), "kurtosis": (v[1] / v[3]).item(),
                "error": (v[2] / v[3]).item()} for n, v in sums.items()}
