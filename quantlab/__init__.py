"""quantlab: the reusable pieces of the quantization notebooks.

Layers, lowest first (lower layers never import higher ones):
``_validate`` (argument checks) <- ``qparams`` (ranges, scale, zero point) <- ``quantize``
(quantize / dequantize / fake_quantize) <- ``observers`` (range estimators) <- ``observer``
(QParam) <- ``learned`` (LSQ/PACT: QParams whose step is trained) <- ``fixed_point`` (integer
requantization) <- ``qmodule`` (the layers' life cycle) <- ``requantize`` / ``qat_simulation``
(a weighted layer's integer and float sides) <- ``weighted`` (QConv2d, QLinear, QConvBNReLU) <-
``modules`` (every layer's door, and ReLU, max-pool, flatten) <- ``ops`` (add, average pool, cat,
ReLU6, Hardtanh) <- ``graph`` (QuantizedNet) <- ``patterns`` (what converts to what) <- ``passes``
(trace, check, match, lower) <- ``convert`` (quantize_model) <- ``models`` (Net, NetBN, ResNet) <-
``ptq`` (cross-layer equalization, bias correction, AdaRound).
``data``, ``training``, ``plots``, ``reference`` and ``export`` (with ``onnx_nodes``) sit beside
them and are imported on demand; ``engine`` (with ``engine_kernels``) and ``npz`` need only NumPy
(and onnx to read .onnx files); ``check`` (the exercise checker, ``quantlab.check.run("a")``, with
``notebook_import``, ``sandbox``, ``gradebook`` and ``exercise_checks``) sits on top.
The transformer track sits beside the CNN track, lowest first: ``text`` (the pinned corpus and its
split) <- ``weight_only`` (groups, packing, WeightOnlyLinear) <- ``gptq`` <- ``awq``; ``models``
holds TinyGPT and ``lm_training`` its recipe and perplexity; ``w8a8`` (the integer W8A8 Linear,
ONNX Runtime's dynamic quantization simulated) <- ``ort_dynamic`` (TinyGPT through ONNX Runtime).

The names below are imported lazily (PEP 562), so ``import quantlab.engine`` does not import
torch: a deployed model runs where torch is not installed.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "Net": "models",
    "NetBN": "models",
    "ResNet": "models",
    "QuantizedNet": "graph",
    "quantize_model": "convert",
    "UnsupportedModelError": "convert",
    "QParam": "observer",
    "LearnedQParam": "learned",
    "OBSERVERS": "observers",
    "make_observer": "observers",
    "calc_min_max": "qparams",
    "calc_scale_zero_point": "qparams",
    "quant_range": "qparams",
    "dequantize": "quantize",
    "fake_quantize": "quantize",
    "quantize": "quantize",
}

__all__ = list(_LAZY)


def __getattr__(name):
    # quantlab.check on first use (not imported eagerly: `python -m quantlab.check` runs it as main)
    if name == "check":
        return importlib.import_module(".check", __name__)
    if name in _LAZY:
        # bind every name at once: importing the submodule quantlab.quantize sets the package
        # attribute ``quantize`` to that module, which the function of the same name must replace
        for attr, module in _LAZY.items():
            globals()[attr] = getattr(importlib.import_module(f".{module}", __name__), attr)
        return globals()[name]
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """Keeps ``quantlab.quantize`` the function: importing the submodule of the same name would
    otherwise rebind the package attribute to the module (it stays in ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
