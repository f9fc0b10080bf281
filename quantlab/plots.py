"""The figures the notebooks show (matplotlib). Each function returns the Figure.

Titles, axis labels and legends are in English or in Chinese, from one setting:
``set_language("zh_CN")`` (or the environment variable ``QUANTLAB_LANGUAGE=zh_CN`` when quantlab is
imported); the default is English. In Chinese, a CJK font installed on the machine (WenQuanYi Zen Hei,
Noto Sans CJK, Source Han Sans, ...) is added after matplotlib's own font as a fallback, so Latin text,
digits and math look as in the English figures and Chinese characters are not drawn as empty boxes.
Labels passed by the caller are translated when they are one of this module's defaults.
"""

from __future__ import annotations

import os
import re

import matplotlib
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator

from ._validate import check_bool, check_float_tensor, check_int, check_int_tensor, check_real
from .qparams import quant_range

# --- language ----------------------------------------------------------------------------------------

ENV_VAR = "QUANTLAB_LANGUAGE"
LANGUAGES = ("en", "zh_CN")
CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC",
             "Source Han Sans CN", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")

# every fixed text of the figures, English -> Chinese (a {field} is filled in after translation)
ZH_CN = {
    "real value": "实数值",
    "count": "计数",
    "values": "数值",
    "not clamped: within \u00bd step of the {levels} levels": "不被截断：距 {levels} 个级别半步以内",
    " (every {step}th shown)": "（每 {step} 个画一条）",
    "real 0 = integer {zero_point}": "实数 0 = 整数 {zero_point}",
    "{num_bits}-bit grid: scale={scale:.4g}, zero_point={zero_point}":
        "{num_bits} 位量化网格：缩放因子 scale={scale:.4g}，零点 zero_point={zero_point}",
    "RMS error": "RMS 误差",
    "num_bits": "位宽 num_bits",
    "float {accuracy:.2f}%": "浮点 {accuracy:.2f}%",
    "num_bits (weights and activations)": "位宽 num_bits（权重与激活）",
    "num_bits (weights and activations; the measured widths only)":
        "位宽 num_bits（权重与激活；仅测量过的位宽）",
    "test accuracy (%)": "测试准确率 (%)",
    "outputs per bin": "每个区间的输出数",
    "\u00b10.5 LSB: the output rounding alone": "\u00b10.5 LSB：仅输出舍入造成",
    "error (LSB of the output scale)": "误差（以输出缩放因子的 LSB 为单位）",
    "count (log scale)": "计数（对数坐标）",
    "training loss": "训练损失",
    "epoch": "轮次（epoch）",
    "cross-entropy": "交叉熵",
    "training (augmented)": "训练集（数据增强）",
    "test": "测试集",
    "accuracy (%)": "准确率 (%)",
    "misclassified digits (off-diagonal)": "误分类的数字（非对角线）",
    "predicted": "预测",
    "true": "真实",
    "confusion matrix (errors shaded)": "混淆矩阵（阴影为错误）",
}
_TABLES = {"en": {}, "zh_CN": ZH_CN}
_language = "en"


def set_language(language: str = "en") -> str | None:
    """Draw the figures' texts in ``language`` ("en" or "zh_CN"); returns the CJK font used for
    Chinese (None for English, or when no CJK font is installed: the characters then show as boxes)."""
    global _language
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}; got {language!r}")
    _language = language
    return _use_cjk_font() if language == "zh_CN" else None


def get_language() -> str:
    return _language


def cjk_font() -> str | None:
    """The first installed font of ``CJK_FONTS`` (None when there is none). matplotlib's font cache
    may predate the font's installation: the system's font files are then looked at once."""
    from matplotlib import font_manager

    def first():
        installed = {f.name for f in font_manager.fontManager.ttflist}
        return next((name for name in CJK_FONTS if name in installed), None)

    global _scanned
    if first() is None and not _scanned:
        _scanned = True
        for path in font_manager.findSystemFonts():
            if re.search(r"wqy|cjk|sourcehan|simhei|msyh|pingfang|heiti", os.path.basename(path).lower()):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # a file FreeType cannot read
                    continue
    return first()


_scanned = False


def _use_cjk_font() -> str | None:
    font = cjk_font()
    if font is not None:
        # matplotlib falls back glyph by glyph only along the families named in font.family (a
        # generic "sans-serif" stands for one font): its default sans-serif first, then the CJK font
        first = matplotlib.rcParams["font.sans-serif"][0]
        matplotlib.rcParams["font.family"] = [first, font, "sans-serif"]
    return font


def tr(text: str, **fields) -> str:
    """``text`` in the current language, its ``{fields}`` filled in."""
    text = _TABLES[_language].get(text, text)
    return text.format(**fields) if fields else text


if os.environ.get(ENV_VAR, "").strip():
    set_language(os.environ[ENV_VAR].strip())


def _check_series(bits, series, name="series") -> list:
    """``bits`` a non-empty sequence of ints; ``series`` a dict name -> one value per bit width."""
    if isinstance(bits, (str, bytes)) or not hasattr(bits, "__iter__"):
        raise TypeError(f"bits must be a sequence of bit widths; got {type(bits).__name__}")
    bits = [check_int(b, "bits", 1) for b in bits]
    if not bits:
        raise ValueError("bits must not be empty")
    if not isinstance(series, dict) or not series:
        raise TypeError(f"{name} must be a non-empty dict of name -> values; got "
                        f"{type(series).__name__}")
    for key, values in series.items():
        values = list(values) if hasattr(values, "__iter__") else None
        if values is None or len(values) != len(bits):
            raise ValueError(f"{name}[{key!r}] must hold one value per bit width ({len(bits)})")
        for v in values:
            check_real(v, f"{name}[{key!r}]")
    return bits


def _check_ax(ax):
    if ax is not None and not hasattr(ax, "figure"):
        raise TypeError(f"ax must be None or a matplotlib Axes; got {type(ax).__name__}")


def hist_with_grid(x: torch.Tensor, scale: float, zero_point: int, num_bits: int = 8,
                   signed: bool = False, bins: int = 120, title: str = "",
                   xlabel: str = "real value", ax=None):
    """Histogram of ``x`` with the reals the integers represent (the quantization grid).

    Grid lines are drawn at every representable value when there are at most 64 levels, otherwise
    at every 16th. Shaded: the values the clamp leaves alone, those within half a step of the levels,
    ``[S (q_min - Z - 1/2), S (q_max - Z + 1/2)]``; a value beyond it saturates at an end level with
    an error of more than half a step.
    """
    check_float_tensor(x, "x")
    quant_min, quant_max = quant_range(num_bits, signed)
    scale = check_real(scale, "scale", 0.0, low_open=True)
    zero_point = check_int(zero_point, "zero_point", quant_min, quant_max)
    bins = check_int(bins, "bins", 1)
    _check_ax(ax)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3.2))
    values = x.detach().flatten().float().numpy()
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.7, label=tr("values"))
    levels = quant_max - quant_min + 1
    step = 1 if levels <= 64 else 16
    for q in range(quant_min, quant_max + 1, step):
        ax.axvline(scale * (q - zero_point), color="tab:orange", lw=0.6, alpha=0.8)
    lo, hi = scale * (quant_min - zero_point - 0.5), scale * (quant_max - zero_point + 0.5)
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.06,
               label=tr("not clamped: within \u00bd step of the {levels} levels", levels=levels)
                     + ("" if step == 1 else tr(" (every {step}th shown)", step=step)))
    ax.axvline(0.0, color="black", lw=1.2, label=tr("real 0 = integer {zero_point}", zero_point=zero_point))
    ax.set_xlabel(tr(xlabel))
    ax.set_ylabel(tr("count"))
    ax.set_title(title or tr("{num_bits}-bit grid: scale={scale:.4g}, zero_point={zero_point}",
                             num_bits=num_bits, scale=scale, zero_point=zero_point))
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def error_vs_bits(bits, series: dict, ylabel: str = "RMS error", title: str = "", ax=None):
    """Line plot of an error (log scale) against the bit width for several named series."""
    bits = _check_series(bits, series)
    _check_ax(ax)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.semilogy(list(bits), list(values), marker="o", label=name)
    ax.set_xlabel(tr("num_bits"))
    ax.set_ylabel(tr(ylabel))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def accuracy_vs_bits(bits, series: dict, title: str = "", reference: float | None = None,
                     ax=None, connect: bool = True):
    """Accuracy (percent) against the bit width for several named series; ``reference`` (e.g.
    the float model's accuracy) is drawn as a dashed line. ``connect=False`` draws markers only.
    Consecutive bit widths (8, 7, ..., 2) get a numeric axis; otherwise (e.g. 8, 4, 3, 2) each
    measured width gets one evenly spaced tick and there are no empty slots for widths that were
    not measured."""
    bits = _check_series(bits, series)
    if reference is not None:
        reference = check_real(reference, "reference", 0.0, 1.0)
    _check_ax(ax)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    consecutive = all(abs(a - b) == 1 for a, b in zip(bits, bits[1:]))
    # a numeric axis for consecutive widths, else one evenly spaced slot per measured width
    xs = list(bits) if consecutive else [sorted(bits, reverse=True).index(b) for b in bits]
    for name, values in series.items():
        ax.plot(xs, [100 * v for v in values], marker="o", label=name, ls="-" if connect else "none")
    if reference is not None:
        ax.axhline(100 * reference, color="gray", ls="--",
                   label=tr("float {accuracy:.2f}%", accuracy=100 * reference))
    ax.set_xticks(xs, [str(b) for b in bits])
    ax.set_xlabel(tr("num_bits (weights and activations)") if consecutive
                  else tr("num_bits (weights and activations; the measured widths only)"))
    ax.set_ylabel(tr("test accuracy (%)"))
    ax.set_title(title)
    if consecutive:
        ax.invert_xaxis()   # many bits on the left, as the slots are
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def lsb_error_hist(err_lsb: torch.Tensor, title: str = "", half_lsb: bool = True, ax=None,
                   label: str = "outputs per bin"):
    """Histogram of an error measured in LSBs (units of the output scale), log counts; dashed
    lines at +-0.5 LSB, the output rounding alone (explained in a legend above the axes)."""
    check_float_tensor(err_lsb, "err_lsb")
    half_lsb = check_bool(half_lsb, "half_lsb")
    _check_ax(ax)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.6))
    counts, _, _ = ax.hist(err_lsb.flatten().numpy(), bins=81, color="tab:green", log=True,
                           label=tr(label))
    if half_lsb:
        for i, v in enumerate((-0.5, 0.5)):
            ax.axvline(v, color="black", ls="--", lw=1,
                       label=tr("\u00b10.5 LSB: the output rounding alone") if i == 0 else None)
    ax.set_ylim(0.5, counts.max() * 2)  # the y axis ends just above the tallest bar
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=2, framealpha=1)
    ax.set_xlabel(tr("error (LSB of the output scale)"))
    ax.set_ylabel(tr("count (log scale)"))
    ax.set_title(title, pad=26)  # above the legend, which sits above the axes
    fig.tight_layout()
    return fig


def flow_diagram(boxes: dict, arrows, title: str = "", figsize=(13, 4.2), legend=None,
                 fontsize: float = 8):
    """Boxes with text joined by arrows: a data-flow picture (e.g. the dtypes of a quantized conv).

    Args:
        boxes: ``{name: (x, y, text)}`` or ``{name: (x, y, text, color)}``; ``x, y`` are the box
            centre in data units (the axes span the boxes), ``text`` may hold several lines.
        arrows: ``(source, target)`` or ``(source, target, label)`` tuples of box names; an arrow
            leaves the side of the source's box that faces the target.
        legend: optional ``{color: meaning}``, drawn as coloured patches below the boxes.
        fontsize: of the box texts.
    Returns:
        the Figure. Raises ValueError for an arrow naming an unknown box, TypeError for a box
        that is not a tuple of 3 or 4 items.
    """
    for name, spec in boxes.items():
        if not isinstance(spec, tuple) or len(spec) not in (3, 4):
            raise TypeError(f"boxes[{name!r}] must be (x, y, text) or (x, y, text, color); "
                            f"got {spec!r}")
    arrows = [tuple(a) for a in arrows]
    for a in arrows:
        if len(a) not in (2, 3) or a[0] not in boxes or a[1] not in boxes:
            raise ValueError(f"arrows must be (source, target[, label]) with names of boxes "
                             f"{sorted(boxes)}; got {a!r}")
    fig, ax = plt.subplots(figsize=figsize)
    xs = [s[0] for s in boxes.values()]
    ys = [s[1] for s in boxes.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.3, max(ys) + 0.3)
    ax.axis("off")
    artists = {}
    for name, spec in boxes.items():
        x, y, text = spec[:3]
        color = spec[3] if len(spec) == 4 else "whitesmoke"
        artists[name] = ax.text(x, y, text, ha="center", va="center", fontsize=fontsize,
                                zorder=3, bbox=dict(boxstyle="round,pad=0.55", fc=color, ec="gray"))
    for a in arrows:
        (x0, y0), (x1, y1) = boxes[a[0]][:2], boxes[a[1]][:2]
        if abs(x1 - x0) >= abs(y1 - y0):  # mostly horizontal: right side -> left side
            start, end = ((1, 0.5), (0, 0.5)) if x1 > x0 else ((0, 0.5), (1, 0.5))
        else:
            start, end = ((0.5, 0), (0.5, 1)) if y1 < y0 else ((0.5, 1), (0.5, 0))
        # anchored on the boxes (the bbox patches), not the text inside them; drawn after them
        ax.annotate("", xy=end, xycoords=artists[a[1]].get_bbox_patch(), xytext=start,
                    textcoords=artists[a[0]].get_bbox_patch(), zorder=5,
                    arrowprops=dict(arrowstyle="-|>", color="dimgray", lw=1.2,
                                    shrinkA=0, shrinkB=0))
        if len(a) == 3:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.06, a[2], ha="center", va="bottom",
                    fontsize=7, color="dimgray", zorder=4)
    if legend:
        handles = [plt.Rectangle((0, 0), 1, 1, fc=c, ec="gray") for c in legend]
        ax.legend(handles, list(legend.values()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=len(legend), fontsize=fontsize, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def digit_grid(images: torch.Tensor, labels=None, predictions=None, ncols: int = 10,
               title: str = ""):
    """A grid of 28x28 digits, with labels (and predictions, red when wrong) above each."""
    check_float_tensor(images, "images")
    if images.dim() < 2 or images[0].numel() != 784:
        raise ValueError(f"images must be (N, 1, 28, 28) or (N, 784); got {tuple(images.shape)}")
    n = images.shape[0]
    for name, v in (("labels", labels), ("predictions", predictions)):
        if v is not None and (check_int_tensor(v, name).shape != (n,)):
            raise ValueError(f"{name} must have shape ({n},), one per image; got {tuple(v.shape)}")
    if predictions is not None and labels is None:
        raise ValueError("predictions need labels to compare with")
    ncols = check_int(ncols, "ncols", 1)
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


def training_curves(history: dict, title: str = ""):
    """Loss and accuracy per epoch from :func:`quantlab.training.train`'s history."""
    if not isinstance(history, dict) or "loss" not in history or "accuracy" not in history:
        raise TypeError("history must be the dict train() returns, with 'loss' and 'accuracy'")
    n = len(history["loss"])
    if n == 0 or any(len(history[k]) != n for k in ("accuracy", "eval_accuracy") if k in history):
        raise ValueError("history must hold one loss and one accuracy per epoch (at least one)")
    epochs = range(1, len(history["loss"]) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(epochs, history["loss"], marker=".", label=tr("training loss"))
    ax1.set_xlabel(tr("epoch"))
    ax1.set_ylabel(tr("cross-entropy"))
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(epochs, [100 * a for a in history["accuracy"]], marker=".",
             label=tr("training (augmented)"))
    if "eval_accuracy" in history:
        ax2.plot(epochs, [100 * a for a in history["eval_accuracy"]], marker=".", label=tr("test"))
    ax2.set_xlabel(tr("epoch"))
    ax2.set_ylabel(tr("accuracy (%)"))
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # whole epochs only
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10,
                     title: str = ""):
    """The confusion matrix (rows: true digit, columns: predicted), counts written in the cells."""
    num_classes = check_int(num_classes, "num_classes", 1)
    for name, v in (("pred", pred), ("labels", labels)):
        check_int_tensor(v, name)
        if v.dim() != 1 or int(v.min()) < 0 or int(v.max()) >= num_classes:
            raise ValueError(f"{name} must be a 1-d tensor of classes in 0..{num_classes - 1}")
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels must have the same shape; got {tuple(pred.shape)} and "
                         f"{tuple(labels.shape)}")
    cm = torch.bincount(labels * num_classes + pred, minlength=num_classes**2)
    cm = cm.reshape(num_classes, num_classes)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    off = cm.clone().float()
    off.fill_diagonal_(float("nan"))
    im = ax.imshow(off.numpy(), cmap="Reds")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=tr("misclassified digits (off-diagonal)"))
    bar.locator = MaxNLocator(integer=True)   # counts: whole-number ticks only
    bar.update_ticks()
    worst = max(1, int(torch.nan_to_num(off, nan=0.0).max()))
    for i in range(num_classes):
        for j in range(num_classes):
            if cm[i, j]:
                dark = i != j and int(cm[i, j]) > worst / 2
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="tab:blue" if i == j else ("white" if dark else "black"))
    ax.set_xticks(range(num_classes))
    ax.set_yticks(range(num_classes))
    ax.set_xlabel(tr("predicted"))
    ax.set_ylabel(tr("true"))
    ax.set_title(title or tr("confusion matrix (errors shaded)"))
    fig.tight_layout()
    return fig
