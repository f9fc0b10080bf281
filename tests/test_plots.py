"""quantlab.plots: the figure helpers return figures that show what they are given."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from quantlab.plots import flow_diagram, lsb_error_hist  # noqa: E402

BOXES = {"a": (0, 0, "q_x uint8\n= 92"), "b": (1, 0, "acc int32\n= 296", "lightcyan"),
         "c": (1, 1, "q_b int32")}


def test_flow_diagram_draws_every_box_and_arrow():
    fig = flow_diagram(BOXES, [("a", "b"), ("c", "b", "+")], title="t")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    for spec in BOXES.values():
        assert spec[2] in texts
    assert "+" in texts                                   # the arrow's label
    arrows = [c for c in ax.get_children() if isinstance(c, matplotlib.text.Annotation)]
    assert len(arrows) == 2
    colors = {t.get_text(): t.get_bbox_patch().get_facecolor() for t in ax.texts if t.get_bbox_patch()}
    assert colors["acc int32\n= 296"] == matplotlib.colors.to_rgba("lightcyan")
    plt.close(fig)


def test_flow_diagram_rejects_bad_boxes_and_arrows():
    with pytest.raises(ValueError, match="arrows"):
        flow_diagram(BOXES, [("a", "missing")])
    with pytest.raises(ValueError, match="arrows"):
        flow_diagram(BOXES, [("a",)])
    with pytest.raises(TypeError, match="boxes"):
        flow_diagram({"a": (0, 0)}, [])
    plt.close("all")


def test_lsb_error_hist_keeps_its_legend_above_the_bars():
    err = torch.randn(10_000) * 0.4
    fig = lsb_error_hist(err, title="t")
    ax = fig.axes[0]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    tallest = max(p.get_window_extent().y1 for p in ax.patches)
    assert legend.y0 > tallest                            # the legend never covers a bar
    plt.close(fig)


@pytest.mark.parametrize("scale,zero_point,bits,signed", [(0.5, 0, 2, True), (1.272, 3, 3, False),
                                                           (2 / 255, 128, 8, False)])
def test_hist_with_grid_shades_what_the_clamp_leaves_alone(scale, zero_point, bits, signed):
    from quantlab.plots import hist_with_grid
    from quantlab.qparams import quant_range

    fig = hist_with_grid(torch.linspace(-3, 3, 500), scale, zero_point, bits, signed=signed)
    (span,) = [p for p in fig.axes[0].patches if p.get_label().startswith("not clamped")]
    x0, x1 = span.get_x(), span.get_x() + span.get_width()                 # data coordinates
    q_min, q_max = quant_range(bits, signed)
    # half a step beyond the lowest and the highest level: where the clamp starts to add error
    assert x0 == pytest.approx(scale * (q_min - zero_point - 0.5))
    assert x1 == pytest.approx(scale * (q_max - zero_point + 0.5))
    plt.close(fig)


def test_accuracy_vs_bits_has_no_empty_slots_for_unmeasured_widths():
    from quantlab.plots import accuracy_vs_bits

    fig = accuracy_vs_bits([8, 4, 3, 2], {"a": [0.98, 0.97, 0.95, 0.7]}, connect=False)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "4", "3", "2"]
    assert list(ax.get_xticks()) == [0, 1, 2, 3]          # evenly spaced, many bits on the left
    fig = accuracy_vs_bits(list(range(8, 1, -1)), {"a": [0.9] * 7})
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == list(range(8, 1, -1)) and ax.xaxis_inverted()
    plt.close("all")


def test_confusion_matrix_colorbar_has_integer_ticks():
    from quantlab.plots import confusion_matrix

    labels = torch.arange(10).repeat(10)
    pred = labels.clone()
    pred[:3] = (pred[:3] + 1) % 10                        # three errors: counts 0 and 1 only
    fig = confusion_matrix(pred, labels)
    bar = fig.axes[1]
    ticks = [t for t in bar.get_yticks() if 0 <= t <= 1]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


# --- the language of the figures (the Chinese edition, #28) ---------------------------------------

def _texts(fig):
    ax = fig.axes[0]
    return [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()] + \
        [t.get_text() for t in ax.get_legend().get_texts()]


def test_figures_speak_english_by_default_and_chinese_when_asked():
    from quantlab import plots

    x = torch.linspace(-1, 1, 200)
    assert plots.get_language() == "en"
    english = _texts(plots.hist_with_grid(x, 2 / 255, 128))
    assert english[:3] == ["8-bit grid: scale=0.007843, zero_point=128", "real value", "count"]
    try:
        font = plots.set_language("zh_CN")
        chinese = _texts(plots.hist_with_grid(x, 2 / 255, 128))
        assert chinese[:3] == ["8 位量化网格：缩放因子 scale=0.007843，零点 zero_point=128", "实数值", "计数"]
        assert "实数 0 = 整数 128" in chinese
        fig = plots.error_vs_bits([8, 4], {"per tensor": [0.1, 1.0]})
        assert fig.axes[0].get_xlabel() == "位宽 num_bits" and fig.axes[0].get_ylabel() == "RMS 误差"
        # a CJK font as a fallback after matplotlib's own, when one is installed: no empty boxes
        import os
        if os.path.exists("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"):  # make chromium installs it
            assert font == "WenQuanYi Zen Hei"
        if plots.cjk_font() is not None:
            assert font == plots.cjk_font()
            assert matplotlib.rcParams["font.family"][1] == font
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # "Glyph ... missing from font(s)" is a warning
                fig.canvas.draw()
    finally:
        plots.set_language("en")
        matplotlib.rcdefaults()
        plt.close("all")
    assert _texts(plots.hist_with_grid(x, 2 / 255, 128))[:3] == english[:3]
    plt.close("all")
    with pytest.raises(ValueError, match="language"):
        plots.set_language("fr")


def test_the_language_can_come_from_the_environment():
    import os
    import subprocess
    import sys

    code = "import quantlab.plots as p; print(p.get_language(), p.tr('count'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QUANTLAB_LANGUAGE": "zh_CN", "MPLBACKEND": "Agg"})
    assert run.stdout.split() == ["zh_CN", "计数"], run.stderr
