"""What every lesson's checks share: the Exercise and Case records, how values are shown and
compared (exact integers, floats with a tolerance), and hypothesis strategies."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from .. import qparams

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EPS = qparams.EPS


@dataclass
class Mismatch:
    """What the oracle expected and what the learner's function returned (as short texts)."""
    expected: str
    got: str
    hint: str | None = None


@dataclass(frozen=True)
class Case:
    """One input: keyword arguments, an optional description and a hint for when it fails."""
    kwargs: dict
    hint: str = ""
    desc: str = ""


@dataclass(frozen=True)
class Exercise:
    lesson: str
    number: int
    name: str
    oracle: Callable[..., Any]
    compare: Callable[[Any, Any], Mismatch | None]
    cases: Callable[[], list[Case]]
    strategy: Callable[[], st.SearchStrategy]
    hint: str
    max_examples: int = 30
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.lesson}{self.number}"


# -- showing values ---------------------------------------------------------------------------

def show(v, limit: int = 16) -> str:
    """A short text for a value: small tensors in full, large ones by shape and range."""
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "")
        if v.numel() <= limit:
            vals = v.tolist()
            return f"{vals} ({dt})" if v.dim() else f"{vals!r} ({dt})"
        lo, hi = (v.min().item(), v.max().item()) if v.numel() else (None, None)
        return f"<{dt} tensor of shape {tuple(v.shape)}, values in [{lo}, {hi}]>"
    if isinstance(v, (tuple, list)):
        inner = ", ".join(show(x, limit) for x in v)
        return f"({inner})" if isinstance(v, tuple) else f"[{inner}]"
    if isinstance(v, float):
        return repr(v)
    return repr(v) if v is None or isinstance(v, (int, bool, str)) else type(v).__name__


def describe(case: Case) -> str:
    if case.desc:
        return case.desc
    return ", ".join(f"{k}={show(v)}" for k, v in case.kwargs.items())


# -- comparing ---------------------------------------------------------------------------------

def _tensorish(got):
    if isinstance(got, bool):
        return got
    if isinstance(got, int):
        return torch.tensor(got, dtype=torch.int64)
    if isinstance(got, float):
        return torch.tensor(got, dtype=torch.float32)
    return got


def _diff_texts(expected: torch.Tensor, got: torch.Tensor, bad: torch.Tensor) -> tuple[str, str]:
    if expected.numel() <= 16:
        return show(expected), show(got)
    idx = tuple(int(i) for i in bad.nonzero()[0])
    n = int(bad.sum())
    where = f" at index {list(idx)}"
    more = f" ({n} of {bad.numel()} values differ)"
    return (f"{expected[idx].item()!r}{where}{more}", f"{got[idx].item()!r}{where}")


def _dtype_mismatch(expected, got, pre: str) -> Mismatch | None:
    """A tensor of the right values but another dtype than the statement's (``expected``'s)."""
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor) and \
            got.dtype != expected.dtype:
        want = str(expected.dtype).replace("torch.", "")
        return Mismatch(pre + f"a {want} tensor", pre + f"the right values as "
                        f"{str(got.dtype).replace('torch.', '')}",
                        f"the statement asks for {want}: compute in {want} (or convert with "
                        f".to(torch.{want})); another dtype rounds differently or costs memory")
    return None


def same_integers(expected: torch.Tensor, got, what: str = "") -> Mismatch | None:
    """``got`` must be an integer tensor (or Python int) with exactly ``expected``'s values; a
    tensor must have ``expected``'s dtype too (the statements name it: int32 for integers)."""
    pre = f"{what}: " if what else ""
    dtype_mismatch = _dtype_mismatch(expected, got, pre)
    got = _tensorish(got)
    if not isinstance(got, torch.Tensor):
        return Mismatch(pre + show(expected), pre + f"a {type(got).__name__}: {show(got)}",
                        "return a torch.Tensor of integers")
    if got.is_floating_point() or got.is_complex() or got.dtype == torch.bool:
        want = str(expected.dtype).replace("torch.", "")  # the statement's dtype (int32, or int64)
        return Mismatch(pre + f"an integer tensor {show(expected)}", pre + f"a {got.dtype} tensor "
                        f"{show(got)}", "integers belong in an integer tensor: round, then "
                        f".to(torch.{want})")
    if tuple(got.shape) != tuple(expected.shape):
        return Mismatch(pre + f"shape {tuple(expected.shape)}", pre + f"shape {tuple(got.shape)}")
    bad = got.to(torch.int64) != expected.to(torch.int64)
    if bool(bad.any()):
        e, g = _diff_texts(expected, got, bad)
        return Mismatch(pre + e, pre + g)
    return dtype_mismatch


def same_floats(expected: torch.Tensor, got, what: str = "", rtol: float = 0.0,
                atol: float = 0.0) -> Mismatch | None:
    """``got`` must be a float tensor (or float) equal to ``expected`` within rtol/atol."""
    pre = f"{what}: " if what else ""
    dtype_mismatch = _dtype_mismatch(expected, got, pre)
    got = _tensorish(got)
    if not isinstance(got, torch.Tensor) or not got.is_floating_point():
        return Mismatch(pre + show(expected), pre + show(got), "return a float32 tensor")
    if tuple(got.shape) != tuple(expected.shape):
        return Mismatch(pre + f"shape {tuple(expected.shape)}", pre + f"shape {tuple(got.shape)}")
    e, g = expected.to(torch.float64), got.detach().to(torch.float64)
    bad = ~((e - g).abs() <= atol + rtol * e.abs()) | (torch.isnan(g) & ~torch.isnan(e))
    if bool(bad.any()):
        et, gt = _diff_texts(expected, got.detach(), bad)
        return Mismatch(pre + et, pre + gt)
    return dtype_mismatch


def same_tuple(*parts: tuple[str, Callable]) -> Callable[[Any, Any], Mismatch | None]:
    """Compare a tuple result element by element: ``parts`` are (name, comparator) pairs."""
    def compare(expected, got):
        if not isinstance(got, (tuple, list)) or len(got) != len(parts):
            names = ", ".join(n for n, _ in parts)
            return Mismatch(f"a tuple ({names})", show(got) if not isinstance(got, torch.Tensor)
                            else f"one tensor {show(got)}", f"return the tuple ({names})")
        for (name, cmp), e, g in zip(parts, expected, got):
            m = cmp(e, g, name)
            if m is not None:
                return m
        return None
    return compare


def exact_ints(e, g, what=""):
    return same_integers(e, g, what)


def close(rtol, atol=0.0):
    return lambda e, g, what="": same_floats(e, g, what, rtol, atol)


# -- naming a known mistake by its result -----------------------------------------------------------

class Given(tuple):
    """A tuple result that also carries the inputs it was computed from (for ``diagnose``)."""

    def __new__(cls, value, inputs):
        obj = super().__new__(cls, value)
        obj.inputs = inputs
        return obj


def with_inputs(value, inputs):
    """``value`` (a tuple or a tensor, an oracle's result) carrying ``inputs`` for ``diagnose``."""
    if isinstance(value, tuple):
        return Given(value, inputs)
    value.inputs = inputs  # a tensor: a plain attribute, kept in the checker's process only
    return value


def matches(a, b, rtol, atol=0.0) -> bool:
    """Whether ``b`` equals ``a`` (tensors or tuples of them): integers exactly, floats within
    rtol/atol (NaN equal to NaN)."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(
            matches(x, y, rtol, atol) for x, y in zip(a, b))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    if not (a.is_floating_point() and b.is_floating_point()):
        return torch.equal(a.to(torch.int64), b.to(torch.int64))
    return bool(torch.isclose(a.double(), b.detach().double(), rtol, atol, equal_nan=True).all())


def diagnose(inputs: dict, got, variants, rtol=0.0, atol=0.0, same=None) -> str | None:
    """The hint of the first known mistake whose result on ``inputs`` equals ``got``: ``variants``
    are (compute, hint) pairs, ``compute(**inputs)`` the mistake's result; "equals" is
    :func:`matches` within rtol/atol, or ``same(wrong, got)`` when given."""
    same = same or (lambda a, b: matches(a, b, rtol, atol))
    for compute, hint in variants:
        try:
            wrong = compute(**inputs)
        except (RuntimeError, ValueError, IndexError):  # the mistake cannot run on these inputs
            continue
        if same(wrong, got):
            return hint
    return None


# -- strategies ----------------------------------------------------------------------------------

def floats32(lo: float, hi: float) -> st.SearchStrategy:
    lo, hi = (torch.tensor(v, dtype=torch.float32).item() for v in (lo, hi))
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


def vector(elements, min_size=1, max_size=8):
    return st.lists(elements, min_size=min_size, max_size=max_size).map(
        lambda v: torch.tensor(v, dtype=torch.float32))


def t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


@st.composite
def _bits(draw):
    return draw(st.integers(2, 16)), draw(st.booleans())


@st.composite
def _range_pair(draw, per_channel):
    n = draw(st.integers(1, 4)) if per_channel else None
    size = n or 1
    a = draw(st.lists(floats32(-1e4, 1e4), min_size=size, max_size=size))
    b = draw(st.lists(floats32(-1e4, 1e4), min_size=size, max_size=size))
    lo = [min(x, y) for x, y in zip(a, b)]
    hi = [max(x, y) for x, y in zip(a, b)]
    if n is None:
        return t(lo[0]), t(hi[0])
    return t(lo), t(hi)


@st.composite
def _shaped(draw, max_ndim=3, lo=-1e3, hi=1e3):
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=max_ndim))
    n = math.prod(shape)
    vals = draw(st.lists(floats32(lo, hi), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


