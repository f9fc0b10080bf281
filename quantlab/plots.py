"""The figures the notebooks show (matplotlib). Each function returns the Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .qparams import quant_range


def hist_with_grid(x: torch.Tensor, scale: float, zero_point: int, num_bits: int = 8,
                   signed: bool = False, bins: int = 120, title: str = "", ax=None):
    """Histogram of ``x`` with the reals the integers represent (the quantization grid).

    Grid lines are drawn at every representable value when there are at most 64 levels, otherwise
    at every 16th; the clamp range is shaded.
    """
    quant_min, quant_max = quant_range(num_bits, signed)
    scale, zero_point = float(scale), int(zero_point)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3.2))
    values = x.detach().flatten().float().numpy()
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.7, label="values")
    levels = quant_max - quant_min + 1
    step = 1 if levels <= 64 else 16
    for q in range(quant_min, quant_max + 1, step):
        ax.axvline(scale * (q - zero_point), color="tab:orange", lw=0.6, alpha=0.8)
    lo, hi = scale * (quant_min - zero_point), scale * (quant_max - zero_point)
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.06,
               label=f"representable range, {levels} levels"
                     + ("" if step == 1 else f" (every {step}th shown)"))
    ax.axvline(0.0, color="black", lw=1.2, label=f"real 0 = integer {zero_point}")
    ax.set_xlabel("real value")
    ax.set_ylabel("count")
    ax.set_title(title or f"{num_bits}-bit grid: scale={scale:.4g}, zero_point={zero_point}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def error_vs_bits(bits, series: dict, ylabel: str = "RMS error", title: str = "", ax=None):
    """Line plot of an error (log scale) against the bit width for several named series."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.semilogy(list(bits), list(values), marker="o", label=name)
    ax.set_xlabel("num_bits")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def accuracy_vs_bits(bits, series: dict, title: str = "", ax=None):
    """Accuracy (percent) against the bit width for several named series."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.plot(list(bits), [100 * v for v in values], marker="o", label=name)
    ax.set_xlabel("num_bits (weights and activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def lsb_error_hist(err_lsb: torch.Tensor, title: str = "", ax=None):
    """Histogram of an error measured in LSBs (units of the output scale)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.2))
    ax.hist(err_lsb.flatten().numpy(), bins=81, color="tab:green")
    ax.set_xlabel("error (LSB of the output scale)")
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def digit_grid(images: torch.Tensor, labels=None, predictions=None, ncols: int = 10,
               title: str = ""):
    """A grid of 28x28 digits, with labels (and predictions, red when wrong) above each."""
    n = images.shape[0]
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.9, nrows * 1.05), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].reshape(28, 28).numpy(), cmap="gray_r")
        if labels is not None:
            text = str(int(labels[i]))
            color = "black"
            if predictions is not None:
                text += f"->{int(predictions[i])}"
                color = "black" if int(predictions[i]) == int(labels[i]) else "red"
            ax.set_title(text, fontsize=8, color=color)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
