"""Bad inputs to the figures (plots) and the PyTorch oracle (reference): TypeError/ValueError naming
the argument, RuntimeError saying what to call first."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bad_input import bad_input_test
from torch import nn  # noqa: E402

from quantlab import plots, reference  # noqa: E402
from quantlab.modules import QConv2d, QMaxPool2d  # noqa: E402

T, V, R = TypeError, ValueError, RuntimeError
X = torch.randn(50)
IMAGES = torch.randn(3, 1, 28, 28)
LABELS = torch.tensor([1, 2, 3])


def frozen_conv():
    torch.manual_seed(0)
    q = QConv2d(nn.Conv2d(2, 3, 3), True, True, 8, True)
    q.calibrate(torch.randn(2, 2, 5, 5))
    return q.freeze()


CASES = {
    "hist_with_grid": [
        (lambda: plots.hist_with_grid(None, 0.1, 0), T, "x"),
        (lambda: plots.hist_with_grid(X, 0.0, 0), V, "scale"),
        (lambda: plots.hist_with_grid(X, "0.1", 0), T, "scale"),
        (lambda: plots.hist_with_grid(X, 0.1, 300), V, "zero_point"),
        (lambda: plots.hist_with_grid(X, 0.1, 0.5), T, "zero_point"),
        (lambda: plots.hist_with_grid(X, 0.1, 0, num_bits=0), V, "num_bits"),
        (lambda: plots.hist_with_grid(X, 0.1, 0, bins=0), V, "bins"),
        (lambda: plots.hist_with_grid(X, 0.1, 0, ax="left"), T, "ax"),
    ],
    "error_vs_bits/accuracy_vs_bits": [
        (lambda: plots.error_vs_bits(None, {"a": [1]}), T, "bits"),
        (lambda: plots.error_vs_bits([], {}), V, "bits"),
        (lambda: plots.error_vs_bits([8, 4], None), T, "series"),
        (lambda: plots.error_vs_bits([8, 4], {"a": [1.0]}), V, "series"),
        (lambda: plots.error_vs_bits([8, 4.5], {"a": [1.0, 2.0]}), T, "bits"),
        (lambda: plots.accuracy_vs_bits([8, 4], {"a": [0.9, "x"]}), T, "series"),
        (lambda: plots.accuracy_vs_bits([8], {"a": [0.9]}, reference=98.0), V, "reference"),
    ],
    "lsb_error_hist": [
        (lambda: plots.lsb_error_hist([0.1, 0.2]), T, "err_lsb"),
        (lambda: plots.lsb_error_hist(X, half_lsb="yes"), T, "half_lsb"),
    ],
    "digit_grid": [
        (lambda: plots.digit_grid(None), T, "images"),
        (lambda: plots.digit_grid(torch.randn(3, 10)), V, "images"),
        (lambda: plots.digit_grid(IMAGES, LABELS[:2]), V, "labels"),
        (lambda: plots.digit_grid(IMAGES, LABELS.float()), T, "labels"),
        (lambda: plots.digit_grid(IMAGES, None, LABELS), V, "predictions"),
        (lambda: plots.digit_grid(IMAGES, LABELS, ncols=0), V, "ncols"),
    ],
    "training_curves": [
        (lambda: plots.training_curves(None), T, "history"),
        (lambda: plots.training_curves({"loss": []}), T, "history"),
        (lambda: plots.training_curves({"loss": [], "accuracy": []}), V, "history"),
        (lambda: plots.training_curves({"loss": [1.0], "accuracy": [0.5, 0.6]}), V, "history"),
    ],
    "confusion_matrix": [
        (lambda: plots.confusion_matrix(LABELS.float(), LABELS), T, "pred"),
        (lambda: plots.confusion_matrix(LABELS, LABELS[:2]), V, "pred and labels"),
        (lambda: plots.confusion_matrix(LABELS, LABELS + 10), V, "labels"),
        (lambda: plots.confusion_matrix(LABELS - 5, LABELS), V, "pred"),
        (lambda: plots.confusion_matrix(LABELS, LABELS, num_classes=0), V, "num_classes"),
    ],
    "reference": [
        (lambda: reference.torch_quantized_layer(QMaxPool2d(2)), T, "layer"),
        (lambda: reference.torch_quantized_layer(None), T, "layer"),
        (lambda: reference.torch_quantized_layer(QConv2d(nn.Conv2d(1, 1, 1))), R, "freeze()"),
        (lambda: reference.torch_quantized_model(None), T, "qnet"),
        (lambda: reference.quantized_engine("tpu").__enter__(), V, "engine"),
        (lambda: reference.quantized_engine(None).__enter__(), V, "engine"),
    ],
}

test_bad_input_raises_naming_the_argument = bad_input_test(CASES, cleanup=lambda: plt.close("all"))


@pytest.mark.skipif(not reference.torch_ao_available(), reason=reference.ao_unavailable_reason())
@pytest.mark.parametrize("q_x", [torch.zeros(1, 3, 5, 5, dtype=torch.int32),
                                 torch.full((1, 2, 5, 5), 300, dtype=torch.int32),
                                 torch.zeros(1, 2, 5, 5)])
def test_torch_integer_inference_checks_q_x(q_x):
    with pytest.raises((TypeError, ValueError), match="q_x"):
        reference.torch_integer_inference(frozen_conv(), q_x)
