"""An interactive quantization explorer for lesson ``a_basic_quant`` (ipywidgets).

Sliders for the number of bits (2-8) and the clipping range, toggles for affine/symmetric and
per-tensor/per-channel, over a few named tensors; every change redraws the histogram with the
quantization grid (:func:`quantlab.plots.hist_with_grid`) and prints the scale, the zero point and
the round-trip error (mean and max, in real units and in LSB, i.e. in units of the scale).

Every number comes from quantlab's own functions: :func:`quantlab.calc_min_max` (the range),
:func:`quantlab.calc_scale_zero_point`, :func:`quantlab.quantize` and :func:`quantlab.dequantize`.
Clipping keeps a fraction ``clip`` of the observed range: ``[clip * min, clip * max]``; values outside
it saturate at ``quant_min``/``quant_max`` (so their error can exceed half an LSB). Symmetric uses
signed integers and zero point 0 (PyTorch's ``qint8`` symmetric scheme); affine uses unsigned ones.

``ipywidgets`` (the ``notebooks`` extra) is imported only when a panel is built; :func:`explore` and
:func:`report` work without it.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from .plots import hist_with_grid
from .qparams import calc_min_max, calc_scale_zero_point, check_float_tensor, quant_range
from .quantize import dequantize, quantize

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class Setting:
    """One position of the explorer's controls."""

    num_bits: int = 8
    clip: float = 1.0
    symmetric: bool = False
    per_channel: bool = False

    def __post_init__(self):
        if isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int) \
                or not MIN_BITS <= self.num_bits <= MAX_BITS:
            raise ValueError(f"num_bits must be an int in {MIN_BITS}..{MAX_BITS}; got {self.num_bits!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) \
                or not 0.0 < self.clip <= 1.0:
            raise ValueError(f"clip must be a float in (0, 1]; got {self.clip!r}")
        for name in ("symmetric", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")


@dataclass
class Result:
    """What the explorer shows for one tensor and one :class:`Setting`."""

    setting: Setting
    axis: int | None          # the channel axis when per channel, else None
    signed: bool
    quant_min: int
    quant_max: int
    min_val: torch.Tensor     # the clipped range, shape () or (C,)
    max_val: torch.Tensor
    scale: torch.Tensor       # float32, shape () or (C,)
    zero_point: torch.Tensor  # int32, shape () or (C,)
    q: torch.Tensor           # int32, the shape of x
    x_hat: torch.Tensor       # dequantized, the shape of x
    err_mean: float           # mean |x_hat - x|, real units
    err_max: float            # max |x_hat - x|, real units
    err_mean_lsb: float       # the same in LSB: |x_hat - x| / scale (of the value's channel)
    err_max_lsb: float
    clipped: int              # values outside the clipped range (they saturate)
    numel: int


def explore(x: torch.Tensor, setting: Setting = Setting(), ch_axis: int = 0) -> Result:
    """Quantize ``x`` as ``setting`` says and measure the round-trip error, with quantlab's functions.

    Args:
        x: float tensor.
        setting: bits, clip fraction, symmetric/affine, per-tensor/per-channel.
        ch_axis: the channel axis used when ``setting.per_channel`` (0 for weights, 1 for NCHW
            activations).
    Returns:
        a :class:`Result`; ``err_max_lsb <= 0.5`` whenever ``clip == 1`` (nothing saturates).
    """
    check_float_tensor(x)
    if not isinstance(setting, Setting):
        raise TypeError(f"setting must be a quantlab.explorer.Setting; got {type(setting).__name__}")
    x = x.detach().to(torch.float32)
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, int) \
            or not -max(x.dim(), 1) <= ch_axis < max(x.dim(), 1):
        raise ValueError(f"ch_axis must be an int in [{-max(x.dim(), 1)}, {max(x.dim(), 1)}) "
                         f"(an axis of x); got {ch_axis!r}")
    axis = ch_axis % x.dim() if setting.per_channel else None
    signed = setting.symmetric
    quant_min, quant_max = quant_range(setting.num_bits, signed)
    min_val, max_val = calc_min_max(x, axis=axis)
    min_val, max_val = min_val * setting.clip, max_val * setting.clip
    scale, zero_point = calc_scale_zero_point(min_val, max_val, setting.num_bits, signed=signed,
                                              symmetric=setting.symmetric)
    q = quantize(x, scale, zero_point, setting.num_bits, signed, axis=axis)
    x_hat = dequantize(q, scale, zero_point, axis=axis)
    err = (x_hat - x).abs()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    err_lsb = err / scale.reshape(shape)
    lo, hi = min_val.reshape(shape), max_val.reshape(shape)
    return Result(setting, axis, signed, quant_min, quant_max, min_val, max_val, scale, zero_point, q,
                  x_hat, err.mean().item(), err.max().item(), err_lsb.mean().item(), err_lsb.max().item(),
                  int(((x < lo) | (x > hi)).sum()), x.numel())


def _values(v: torch.Tensor, fmt: str) -> str:
    """One value, or 'C values in [lo, hi]' for a per-channel vector."""
    if v.dim() == 0:
        return format(v.item(), fmt)
    return f"{v.numel()} values in [{format(v.min().item(), fmt)}, {format(v.max().item(), fmt)}]"


def report(result: Result, name: str = "x", channel: int = 0) -> str:
    """The explorer's printed numbers (scale, zero point, error in real units and in LSB)."""
    if not isinstance(result, Result):
        raise TypeError(f"result must be an explorer Result (from explore(...)); got "
                        f"{type(result).__name__}")
    s = result.setting
    scheme = "symmetric (signed" if s.symmetric else "affine (unsigned"
    lines = [
        f"{name}: {s.num_bits} bits, {scheme}, {result.quant_min}..{result.quant_max}), "
        f"{'per channel (axis ' + str(result.axis) + ')' if s.per_channel else 'per tensor'}, "
        f"clip {s.clip:.0%} of the observed range",
        f"range       min {_values(result.min_val, '.6g')}, max {_values(result.max_val, '.6g')}",
        f"scale       {_values(result.scale, '.6g')}",
        f"zero point  {_values(result.zero_point, 'd')}",
    ]
    if s.per_channel:
        lines.append(f"channel {channel}   scale {result.scale[channel].item():.6g}, "
                     f"zero point {result.zero_point[channel].item()}")
    lines += [
        f"error       mean {result.err_mean:.6g} ({result.err_mean_lsb:.4f} LSB), "
        f"max {result.err_max:.6g} ({result.err_max_lsb:.4f} LSB)",
        f"clipped     {result.clipped} of {result.numel} values ({result.clipped / result.numel:.2%})",
    ]
    return "\n".join(lines)


def draw(fig: Figure, x: torch.Tensor, result: Result, name: str = "x", channel: int = 0) -> Figure:
    """The histogram of ``x`` (or of one channel, per channel) with its quantization grid."""
    fig.clear()
    ax = fig.add_subplot()
    s = result.setting
    if s.per_channel:
        x, scale, zp = x.select(result.axis, channel), result.scale[channel], result.zero_point[channel]
        what = f"{name}, channel {channel} of {result.scale.numel()}"
    else:
        scale, zp, what = result.scale, result.zero_point, name
    title = (f"{what}: {s.num_bits}-bit {'symmetric' if s.symmetric else 'affine'}, "
             f"clip {s.clip:.0%}, scale={float(scale):.4g}, zero_point={int(zp)}")
    hist_with_grid(x, scale, zp, s.num_bits, signed=result.signed, title=title, ax=ax)
    return fig


class QuantExplorer:
    """The panel: ``QuantExplorer({"input a": (a, 1), "weight w": (w, 0)})``, shown by a notebook cell.

    Args:
        tensors: ``{name: tensor}`` or ``{name: (tensor, ch_axis)}`` (ch_axis defaults to 0).
    Attributes:
        result, text, figure: the current :class:`Result`, the printed report and the matplotlib
        Figure (updated by every control); ``panel`` is the ipywidgets box.
    """

    def __init__(self, tensors: dict):
        import ipywidgets as widgets

        if not isinstance(tensors, dict) or not tensors:
            raise TypeError("tensors must be a non-empty dict {name: tensor or (tensor, ch_axis)}")
        self.tensors = {}
        for name, value in tensors.items():
            x, axis = value if isinstance(value, tuple) else (value, 0)
            check_float_tensor(x, name=f"tensors[{name!r}]")
            self.tensors[name] = (x.detach(), axis)
        self.figure = Figure(figsize=(8, 3.2), dpi=90)
        first = next(iter(self.tensors))
        self.tensor = widgets.Dropdown(options=list(self.tensors), value=first, description="tensor")
        self.scheme = widgets.ToggleButtons(options=["affine", "symmetric"], value="affine")
        self.granularity = widgets.ToggleButtons(options=["per tensor", "per channel"], value="per tensor")
        self.bits = widgets.IntSlider(value=8, min=MIN_BITS, max=MAX_BITS, description="bits",
                                      continuous_update=False)
        self.clip = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="clip",
                                        readout_format=".0%", continuous_update=False)
        self.channel = widgets.IntSlider(value=0, min=0, max=0, description="channel",
                                         continuous_update=False)
        self.image = widgets.Image(format="png")
        self.numbers = widgets.HTML()
        self.panel = widgets.VBox([
            widgets.HBox([self.tensor, self.scheme, self.granularity]),
            widgets.HBox([self.bits, self.clip, self.channel]),
            self.image, self.numbers])
        self._hold = False
        for control in (self.tensor, self.scheme, self.granularity, self.bits, self.clip, self.channel):
            control.observe(self.update, names="value")
        self.update()

    def set(self, **values) -> None:
        """Move several controls at once (e.g. ``set(bits=4, scheme="symmetric")``), redrawing once.

        Names: tensor, scheme ("affine"/"symmetric"), granularity ("per tensor"/"per channel"),
        bits, clip, channel; each is set on its widget, as a learner's click would.
        """
        controls = {"tensor": self.tensor, "scheme": self.scheme, "granularity": self.granularity,
                    "bits": self.bits, "clip": self.clip, "channel": self.channel}
        unknown = set(values) - set(controls)
        if unknown:
            raise ValueError(f"unknown control(s) {sorted(unknown)}; accepted: {sorted(controls)}")
        self._hold = True
        try:
            for name in ("tensor", "scheme", "granularity", "bits", "clip"):
                if name in values:
                    controls[name].value = values[name]
            self._sync_channel_range()  # the channel's range depends on the tensor and the granularity
            if "channel" in values:
                self.channel.value = values["channel"]
        finally:
            self._hold = False
        self.update()

    def setting(self) -> Setting:
        return Setting(num_bits=int(self.bits.value), clip=round(float(self.clip.value), 4),
                       symmetric=self.scheme.value == "symmetric",
                       per_channel=self.granularity.value == "per channel")

    def update(self, change=None) -> None:
        """Recompute and redraw (every control calls this when its value changes)."""
        if self._hold:
            return
        self._hold = True  # changing the channel slider's range below must not recurse
        try:
            self._update()
        finally:
            self._hold = False

    def _sync_channel_range(self) -> None:
        x, ch_axis = self.tensors[self.tensor.value]
        per_channel = self.granularity.value == "per channel"
        self.channel.max = x.shape[ch_axis % x.dim()] - 1 if per_channel else 0
        self.channel.disabled = not per_channel

    def _update(self) -> None:
        name = self.tensor.value
        x, ch_axis = self.tensors[name]
        setting = self.setting()
        self._sync_channel_range()
        channel = int(self.channel.value)
        self.result = explore(x, setting, ch_axis)
        self.text = report(self.result, name, channel)
        draw(self.figure, x, self.result, name, channel)
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png")
        self.image.value = buf.getvalue()
        self.numbers.value = f"<pre>{html.escape(self.text)}</pre>"

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.panel._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = ("QuantExplorer: the sliders work in a live notebook (make lab); "
                                "its state is printed and drawn below")
        return bundle
