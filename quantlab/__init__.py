"""quantlab: the reusable pieces of the quantization notebooks.

Layers, lowest first (lower layers never import higher ones):
``qparams`` (ranges, scale, zero point) <- ``quantize`` (quantize / dequantize / fake_quantize)
<- ``observers`` (range estimators) <- ``observer`` (QParam) <- ``fixed_point`` (integer
requantization) <- ``modules`` (QConv2d, QLinear, ...) <- ``models`` (Net, NetBN, quantize_model)
<- ``ptq`` (cross-layer equalization, bias correction, AdaRound).
``data``, ``training`` and ``plots`` sit beside them and are imported on demand; ``check`` (the
exercise checker, ``quantlab.check.run("a")``) sits on top.
"""

from .models import Net, NetBN, QuantizedNet, quantize_model
from .observer import QParam
from .qparams import calc_min_max, calc_scale_zero_point, quant_range
from .quantize import dequantize, fake_quantize, quantize

__version__ = "0.1.0"


def __getattr__(name):
    # quantlab.check on first use (not imported eagerly: `python -m quantlab.check` runs it as main)
    if name == "check":
        import importlib

        return importlib.import_module(".check", __name__)
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")

__all__ = [
    "Net",
    "NetBN",
    "QParam",
    "QuantizedNet",
    "quantize_model",
    "calc_min_max",
    "calc_scale_zero_point",
    "dequantize",
    "fake_quantize",
    "quant_range",
    "quantize",
]
