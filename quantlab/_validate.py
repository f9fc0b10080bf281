"""Argument checks shared by every layer of quantlab (the lowest layer: imports only torch).

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
with a message that names the caller's argument and says what is accepted, and returns the value
normalised (a python ``bool``/``int``/``float``), so callers write ``x = check_int(x, "x", 1)``.
"""

from __future__ import annotations

import math
import numbers

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _got(value) -> str:
    return f"{value!r}" if not isinstance(value, torch.Tensor) else f"a tensor {value.dtype}"


def check_bool(value, name: str) -> bool:
    """``value`` must be True or False (not 0/1, not a string: ``relu='no'`` is an error)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {_got(value)}")
    return value


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be an integer (python/numpy int, not bool, not float) in ``[low, high]``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool and not value.is_meta:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{_range_text(low, high)}; got {_got(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{_range_text(low, high)}; got {value}")
    return value


def check_real(value, name: str, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` must be a finite real number (not bool, not complex, not a string) in the range."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool and not value.is_meta:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {_got(value)}")
    value = float(value)
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{name} must be a finite number in {interval}; got {value!r}")
    return value


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f" in {low}..{high}"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def check_tensor(x, name: str) -> torch.Tensor:
    """``x`` must be a real tensor with data (not a meta tensor, not a quantized tensor)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (shape only, no data): materialize it first, "
                         f"e.g. {name}.to_empty(device='cpu') and fill it")
    if x.is_quantized:
        raise TypeError(f"{name} must be a plain tensor, not a torch quantized tensor ({x.dtype}); "
                        f"use {name}.int_repr() for its integers")
    if x.is_complex():
        raise TypeError(f"{name} must be a real tensor; got dtype {x.dtype}")
    return x


def check_float_tensor(x, name: str = "x", finite: bool = True) -> torch.Tensor:
    """``x`` must be a non-empty floating-point tensor of finite values.

    ``finite=False`` skips the pass over the values, for callers that check the finiteness of a
    reduction of ``x`` instead (a min or a max is NaN or inf when any value is): see
    :func:`check_finite_reduction`.
    """
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must hold only finite values (no NaN or inf)")
    return x


def check_finite_reduction(*reductions: torch.Tensor, name: str = "x"):
    """Raise the error of :func:`check_float_tensor` when a min/max of ``name`` is NaN or inf
    (torch's min and max propagate NaN, and an inf value is its own min or max)."""
    if not all(bool(torch.isfinite(r).all()) for r in reductions):
        raise ValueError(f"{name} must hold only finite values (no NaN or inf)")


def check_int_tensor(x, name: str) -> torch.Tensor:
    """``x`` must be a non-empty tensor of an integer dtype (not bool)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {type(x).__name__}")
    check_tensor(x, name)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int8, uint8, int32, int64); got "
                        f"{x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    return x


def as_real_tensor(value, name: str) -> torch.Tensor:
    """A python number, numpy number/array or real tensor as a tensor (a copy is not forced).

    None, strings, bools and complex numbers raise ``TypeError`` naming ``name``.
    """
    if isinstance(value, torch.Tensor):
        check_tensor(value, name)
        if value.dtype == torch.bool:
            raise TypeError(f"{name} must hold numbers, not bools")
        return value
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number or a tensor of numbers; got {value!r}")
    if isinstance(value, numbers.Number) and not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a number or a tensor of numbers; got "
                        f"{type(value).__name__}") from e
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers; got dtype {t.dtype}")
    return t


def check_iterable_of_batches(data, name: str):
    """``data`` must be a loader-like iterable (a DataLoader, a list of batches), not a tensor."""
    if isinstance(data, torch.Tensor):
        raise TypeError(f"{name} must be a DataLoader or an iterable of batches, not a tensor "
                        f"(iterating a tensor yields single images): pass [images] or "
                        f"DataLoader(TensorDataset(images, labels))")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a DataLoader or an iterable of batches; got "
                        f"{type(data).__name__}")
    return data


def images_and_labels(batch, name: str):
    """Unpack one ``(images, labels)`` batch of ``name`` or raise naming what it yielded."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = type(batch).__name__ if not isinstance(batch, (tuple, list)) else \
            f"a {type(batch).__name__} of {len(batch)} items"
        raise TypeError(f"{name} must yield (images, labels) pairs; got {what}")
    images, labels = batch
    check_tensor(images, f"the images of {name}")
    check_tensor(labels, f"the labels of {name}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"the labels of {name} must be an integer tensor; got {labels.dtype}")
    if images.dim() == 0 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} must yield labels of shape (N,) for images of shape (N, ...); "
                         f"got images {tuple(images.shape)} and labels {tuple(labels.shape)}")
    return images, labels


#: the smallest normal float32: a smaller scale has an infinite float32 reciprocal
FLOAT32_TINY = 1.1754943508222875e-38


def check_scale(value, name: str) -> torch.Tensor:
    """A quantization scale or step (a number or a tensor of any shape): every value finite and
    at least the smallest normal float32 (so that ``1 / scale`` is finite in float32)."""
    t = as_real_tensor(value, name)
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    f = t.detach().to(torch.float32)
    if not bool(torch.isfinite(f).all()) or not bool((f >= FLOAT32_TINY).all()):
        bad = f[~(torch.isfinite(f) & (f >= FLOAT32_TINY))].flatten()[0].item()
        raise ValueError(f"{name} must be finite and >= {FLOAT32_TINY:.4g} (a positive, normal "
                         f"float32); got {bad!r}")
    return t


def check_int_range(quant_min, quant_max, low_name: str = "quant_min",
                    high_name: str = "quant_max") -> tuple[int, int]:
    """Two ints with ``quant_min < quant_max`` (an integer range of at least two values)."""
    lo, hi = check_int(quant_min, low_name), check_int(quant_max, high_name)
    if lo >= hi:
        raise ValueError(f"{low_name} must be below {high_name}; got {lo} and {hi}")
    return lo, hi
