"""The explorer of lesson a: drive its widgets as a learner would and check the printed numbers
against quantlab's functions, called here directly."""

import html
import re

import pytest
import torch

from quantlab import calc_min_max, calc_scale_zero_point, dequantize, quantize
from quantlab.explorer import Setting, explore, report

widgets = pytest.importorskip("ipywidgets")
from quantlab.explorer import QuantExplorer  # noqa: E402

NUM = r"-?[\d.]+(?:e[-+]?\d+)?"


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 1, 12, 12, generator=g)
    w = torch.randn(6, 2, 3, 3, generator=g) * torch.tensor([0.1, 0.5, 1, 2, 3, 4]).reshape(6, 1, 1, 1)
    res = torch.relu(torch.randn(8, 6, 10, 10, generator=g))
    return {"input a": (a, 1), "weight w": (w, 0), "output res": (res, 1)}


def expected(x, ch_axis, bits, clip, symmetric, per_channel):
    """The same quantities, from quantlab's functions called here."""
    axis = ch_axis if per_channel else None
    mn, mx = calc_min_max(x, axis=axis)
    scale, zp = calc_scale_zero_point(mn * clip, mx * clip, bits, signed=symmetric, symmetric=symmetric)
    x_hat = dequantize(quantize(x, scale, zp, bits, symmetric, axis=axis), scale, zp, axis=axis)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    err = (x_hat - x).abs()
    return scale, zp, err, err / scale.reshape(shape)


def printed(text, label):
    line = next(line for line in text.splitlines() if line.startswith(label))
    return [float(v) for v in re.findall(NUM, line[len(label):])]


SETTINGS = [  # tensor, bits, clip, scheme, granularity, channel
    ("input a", 8, 1.0, "affine", "per tensor", 0),
    ("weight w", 4, 1.0, "symmetric", "per channel", 3),
    ("weight w", 2, 0.5, "affine", "per tensor", 0),
    ("output res", 3, 0.7, "symmetric", "per channel", 5),
    ("output res", 6, 1.0, "affine", "per channel", 1),
]


@pytest.mark.parametrize("name,bits,clip,scheme,granularity,channel", SETTINGS)
def test_printed_numbers_equal_quantlabs(tensors, name, bits, clip, scheme, granularity, channel):
    ex = QuantExplorer(tensors)
    png_before = bytes(ex.image.value)
    if (name, bits) == ("weight w", 4):
        # a learner moves the controls one by one; each change runs the callback
        ex.tensor.value = name
        ex.granularity.value = granularity
        ex.scheme.value = scheme
        ex.bits.value = bits
        ex.clip.value = clip
        ex.channel.value = channel
    else:  # the same through set(): the widgets' values change, then one redraw
        ex.set(tensor=name, granularity=granularity, scheme=scheme, bits=bits, clip=clip, channel=channel)
    assert (ex.tensor.value, ex.bits.value, ex.clip.value, ex.channel.value) == (name, bits, clip, channel)
    x, ch_axis = tensors[name]
    per_channel = granularity == "per channel"
    scale, zp, err, err_lsb = expected(x, ch_axis, bits, clip, scheme == "symmetric", per_channel)
    text = ex.text
    assert ex.numbers.value == f"<pre>{html.escape(text)}</pre>"
    assert f"{bits} bits" in text and f"clip {clip:.0%}" in text
    if per_channel:
        # "C values in [lo, hi]" for the scales and zero points, then the chosen channel's own
        assert printed(text, "scale") == pytest.approx(
            [scale.numel(), scale.min().item(), scale.max().item()], rel=1e-5)
        assert printed(text, "zero point") == [zp.numel(), zp.min().item(), zp.max().item()]
        assert printed(text, f"channel {channel}") == pytest.approx(
            [scale[channel].item(), zp[channel].item()], rel=1e-5)
    else:
        assert printed(text, "scale") == pytest.approx([scale.item()], rel=1e-5)
        assert printed(text, "zero point") == [zp.item()]
    mean, mean_lsb, mx, mx_lsb = printed(text, "error")
    assert mean == pytest.approx(err.mean().item(), rel=1e-5)
    assert mx == pytest.approx(err.max().item(), rel=1e-5)
    assert mean_lsb == pytest.approx(err_lsb.mean().item(), abs=5e-5)
    assert mx_lsb == pytest.approx(err_lsb.max().item(), abs=5e-5)
    # the figure was redrawn: a new PNG (unless the setting is the default one)
    png = bytes(ex.image.value)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (png != png_before) == ((name, bits, clip, scheme, granularity) != SETTINGS[0][:5])


def test_without_clipping_the_error_is_at_most_half_an_lsb(tensors):
    for x, ch_axis in tensors.values():
        for bits in range(2, 9):
            for symmetric in (False, True):
                r = explore(x, Setting(bits, 1.0, symmetric, True), ch_axis)
                assert r.clipped == 0
                assert r.err_max_lsb <= 0.5 + 1e-4
    # clipping saturates the outliers: more than half an LSB, and the count is printed
    x, _ = tensors["input a"]
    r = explore(x, Setting(4, 0.5))
    outside = int(((x < r.min_val) | (x > r.max_val)).sum())
    assert r.clipped == outside > 0 and r.err_max_lsb > 0.5
    assert f"clipped     {outside} of {x.numel()}" in report(r)


def test_channel_slider_only_per_channel(tensors):
    ex = QuantExplorer(tensors)
    assert ex.channel.disabled and ex.channel.max == 0
    ex.set(tensor="weight w", granularity="per channel")
    assert not ex.channel.disabled and ex.channel.max == 5
    with pytest.raises(ValueError, match="accepted"):
        ex.set(bit=4)


def test_bad_settings_name_the_argument(tensors):
    with pytest.raises(ValueError, match="num_bits"):
        Setting(num_bits=9)
    with pytest.raises(ValueError, match="clip"):
        Setting(clip=0.0)
    with pytest.raises(TypeError, match="symmetric"):
        Setting(symmetric=1)
    with pytest.raises(TypeError, match="tensors"):
        QuantExplorer({})
    with pytest.raises(TypeError, match="setting"):
        explore(torch.ones(3), (8, 1.0))


def test_the_stored_notebook_sees_a_text_placeholder(tensors):
    bundle = QuantExplorer(tensors)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "make lab" in bundle["text/plain"]
