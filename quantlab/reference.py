"""PyTorch's native int8 modules built from frozen quantlab layers: the oracle for bit-exactness.

``torch_quantized_layer(layer)`` returns a ``torch.ao.nn.quantized`` Conv2d / Linear (or the fused
ConvReLU2d) holding exactly quantlab's integer weights, float bias and qparams;
``torch_integer_inference`` runs it on quantlab's input integers with a chosen engine and returns
the output integers. ``torch_quantized_model(qnet)`` does the same for a whole QuantizedNet.

torch.ao's quantized dtypes are deprecated in favour of torchao, but still work in torch 2.x and
remain the best available oracle; their DeprecationWarnings are silenced here explicitly.
Used by the tests and notebooks ``d_post_training_quantize`` and ``e_conv_quantization_walkthrough``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .graph import _refs, _subst
from .modules import (
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    QModule,
    QReLU,
    check_integer_input,
)
from .observer import QParam
from .ops import QAdd, QAvgPool2d, QCat, QInput, QReLU6

#: the deprecation warnings of torch.ao's quantized tensors and workflow (torch 2.14)
DEPRECATION_MESSAGES = (".*quantized tensor creation functions.*",
                        ".*quantized dtypes are deprecated.*",
                        ".*torch.ao.quantization is deprecated.*")


#: set to "1" to behave as if torch.ao's quantized kernels were missing (tests of the skip path)
HIDE_ENV = "QUANTLAB_HIDE_TORCH_AO"


@functools.cache
def _probe_torch_ao() -> str:
    """'' when torch.ao's qnnpack int8 conv runs here, else the reason it does not."""
    try:
        from torch.ao.nn import quantized as nnq

        if "qnnpack" not in torch.backends.quantized.supported_engines:
            return "torch.backends.quantized has no qnnpack engine"
        with quantized_engine("qnnpack"):
            conv = nnq.Conv2d(1, 1, 1)
            x = torch.quantize_per_tensor(torch.zeros(1, 1, 1, 1), 1.0, 0, torch.quint8)
            conv(x)
    except Exception as e:  # removed module, missing kernel, unsupported build
        return f"torch.ao's quantized kernels do not run here ({type(e).__name__}: {e})"
    return ""


def ao_unavailable_reason() -> str:
    """Why torch.ao's int8 kernels cannot be used as an oracle here; '' when they can."""
    if os.environ.get(HIDE_ENV) == "1":
        return f"torch.ao's quantized kernels hidden by {HIDE_ENV}=1"
    return _probe_torch_ao()


def torch_ao_available() -> bool:
    """True when PyTorch's (deprecated) torch.ao int8 kernels run on this machine (qnnpack).

    Tests and notebook cells that use them as an oracle skip with ``ao_unavailable_reason()``
    when this is False; setting ``QUANTLAB_HIDE_TORCH_AO=1`` simulates their removal.
    """
    return not ao_unavailable_reason()


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Select ``torch.backends.quantized.engine`` for a block (ValueError if unsupported)."""
    supported = torch.backends.quantized.supported_engines
    if not isinstance(engine, str) or engine not in supported:
        raise ValueError(f"engine must be one of {supported} on this machine; got {engine!r}")
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            for message in DEPRECATION_MESSAGES:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        torch.backends.quantized.engine = old


def _qweight(layer) -> torch.Tensor:
    w = layer.weight_int.to(torch.int8)
    q_w = layer.q_w
    if q_w.axis is None:
        return torch._make_per_tensor_quantized_tensor(w, float(q_w.scale), int(q_w.zero_point))
    return torch._make_per_channel_quantized_tensor(
        w, q_w.scale.double(), q_w.zero_point.long(), q_w.axis)


def _relu6(x: torch.Tensor) -> torch.Tensor:
    """PyTorch's quantized ReLU6 on a contiguous tensor: measured on torch 2.14.1, ``F.relu6`` of a
    channels-last quint8 tensor (what qnnpack's conv returns) gives its values in NHWC order read
    as NCHW, i.e. scrambled (tests/test_convert.py shows it)."""
    return F.relu6(x.contiguous())


_GRAPH_LAYERS = (QAdd, QCat, QMaxPool2d, QAvgPool2d, QReLU, QReLU6, QFlatten, QInput)


def torch_quantized_layer(layer: QModule, engine: str = "qnnpack"):
    """The ``torch.ao.nn.quantized`` equivalent of a frozen QConv2d / QConvBNReLU / QLinear."""
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.intrinsic import quantized as nniq

    if not isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
        raise TypeError(f"layer must be a QConv2d, QConvBNReLU or QLinear; got "
                        f"{type(layer).__name__}")
    if not layer.frozen:
        raise RuntimeError("layer must be frozen (freeze()) before it can be converted")
    if layer.num_bits > 8:
        raise ValueError(f"PyTorch's int8 kernels need num_bits <= 8; got {layer.num_bits}")
    with quantized_engine(engine):
        _, b = layer.float_weight_bias()
        b = None if b is None else b.detach().to(torch.float32)
        if isinstance(layer, (QConv2d, QConvBNReLU)):
            c = layer.conv
            cls = nniq.ConvReLU2d if layer.relu else nnq.Conv2d
            args = (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                    c.groups, True)
            mod = cls(*args)
        elif isinstance(layer, QLinear):
            mod = (nniq.LinearReLU if layer.relu else nnq.Linear)(layer.fc.in_features,
                                                                 layer.fc.out_features)
        else:
            raise TypeError(f"layer must be a QConv2d, QConvBNReLU or QLinear; got "
                            f"{type(layer).__name__}")
        mod.set_weight_bias(_qweight(layer), b)
        mod.scale = float(layer.q_out.scale)
        mod.zero_point = int(layer.q_out.zero_point)
    return mod


def narrow(x: torch.Tensor, qparam) -> torch.Tensor:
    """Clamp a quint8 tensor's integers to a narrower QParam range (e.g. [0, 15] for 4 bits).

    PyTorch's kernels always clamp to [0, 255]; a kernel with a narrower output clamps further.
    """
    if not isinstance(x, torch.Tensor) or not x.is_quantized:
        raise TypeError(f"x must be a quantized torch tensor; got {type(x).__name__}")
    if not isinstance(qparam, QParam):
        raise TypeError(f"qparam must be a quantlab QParam; got {type(qparam).__name__}")
    if (qparam.quant_min, qparam.quant_max) == (0, 255):
        return x
    q = x.int_repr().clamp(qparam.quant_min, qparam.quant_max)
    return torch._make_per_tensor_quantized_tensor(q, x.q_scale(), x.q_zero_point())


def torch_integer_inference(layer: QModule, q_x: torch.Tensor, engine: str = "qnnpack"):
    """Run PyTorch's int8 kernel for ``layer`` on quantlab's input integers; int32 output."""
    mod = torch_quantized_layer(layer, engine)
    check_integer_input(q_x, layer.q_in, "q_x")
    layer._check_input_shape(q_x, "q_x")
    with quantized_engine(engine):
        x = torch._make_per_tensor_quantized_tensor(q_x.to(torch.uint8), float(layer.q_in.scale),
                                                    int(layer.q_in.zero_point))
        return narrow(mod(x), layer.q_out).int_repr().to(torch.int32)


def float_bias_inference(layer: QModule, q_x: torch.Tensor) -> torch.Tensor:
    """A model of PyTorch's x86 (fbgemm) requantization, which keeps the bias in float:

        q_y = clamp(rne(f32(f32(acc) + f32(b / f32(S_x * S_w))) * M) + Z_y)

    With 7-bit activations (x86's default ``reduce_range``) it reproduces the x86 engine's
    integers exactly (tests/test_modules.py); quantlab's own layers quantize the bias to int32
    as qnnpack, TFLite and ONNX Runtime do, which differs by 1 LSB on about 0.1% of outputs.
    """
    acc = layer.accumulate(q_x).to(torch.float32)
    _, b = layer.float_weight_bias()
    if b is None:
        b = torch.zeros(layer.weight_int.shape[0])
    shape = [1, -1] + [1] * (acc.dim() - 2)
    bias = (b.detach().to(torch.float32) / (layer.q_in.scale * layer.q_w.scale)).reshape(shape)
    return layer.add_zero_point_and_clamp(torch.round((acc + bias) * layer.multiplier.reshape(shape)))


def x86_conv_kernel(layer: QModule | None = None) -> str:
    """The library PyTorch's x86 engine runs a quantized conv with on this machine.

    PyTorch's ``should_use_onednn_quant`` (``aten/src/ATen/native/quantized/cpu/OnednnUtils.h``)
    sends a conv to oneDNN on Linux when the CPU has AVX512-VNNI, the weights are symmetric (every
    weight zero point 0), ``groups <= 100`` and there is no output padding; every other conv runs
    in fbgemm. Returns ``"onednn"`` or ``"fbgemm"`` (for ``layer``'s weights; without a layer, for
    symmetric weights and ``groups <= 100``). Linear layers always run in fbgemm.
    """
    import sys
    if layer is not None and not isinstance(layer, QModule):
        raise TypeError(f"layer must be None or a quantlab layer (QConv2d, QLinear, ...); got "
                        f"{type(layer).__name__}")
    vnni = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
    if layer is not None:
        if not isinstance(layer, (QConv2d, QConvBNReLU)):
            return "fbgemm"
        symmetric = bool((layer.weight_zero_point == 0).all())
        groups = layer.conv.groups
    else:
        symmetric, groups = True, 1
    return "onednn" if sys.platform.startswith("linux") and vnni and symmetric and groups <= 100 \
        else "fbgemm"


#: oneDNN's CPU ISA caps (ONEDNN_MAX_CPU_ISA) without a VNNI dot product
_ONEDNN_NO_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
#: fbgemm's instruction sets (FBGEMM_ENABLE_INSTRUCTIONS) with VNNI
_FBGEMM_VNNI = {"AVX512_E1", "AVX512_E1_256"}


def x86_uses_vnni(kernel: str) -> bool:
    """Whether ``kernel``'s ("onednn" or "fbgemm", see :func:`x86_conv_kernel`) int8 kernels use
    a VNNI dot product on this machine, which adds uint8 x int8 products straight into int32:
    then 8-bit activations cannot saturate. True when the CPU has AVX512-VNNI and no environment
    variable caps the library below it (``ONEDNN_MAX_CPU_ISA``/``DNNL_MAX_CPU_ISA`` for oneDNN,
    ``FBGEMM_ENABLE_INSTRUCTIONS`` for fbgemm); without VNNI both multiply with AVX2's
    ``vpmaddubsw``, whose int16 pair sums saturate (notebook e, section 3).
    """
    if kernel not in ("onednn", "fbgemm"):
        raise ValueError(f"kernel must be 'onednn' or 'fbgemm'; got {kernel!r}")
    if not bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()):
        return False
    if kernel == "onednn":
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        return cap.upper() not in _ONEDNN_NO_VNNI
    cap = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "")
    return not cap or cap.upper() in _FBGEMM_VNNI


def onednn_inference(layer: QModule, q_x: torch.Tensor) -> torch.Tensor:
    """A model of the requantization of PyTorch's x86 engine when it runs a conv in oneDNN
    (:func:`x86_conv_kernel`): the bias stays float and is added after the scales, and the output
    zero point is added in float32 *before* rounding, each step rounded to float32:

        q_y = clamp(rne(f32(f32(f32(f32(acc * f32(S_x S_w)) + b) * f32(1 / S_y)) + Z_y)))

    Measured on an AVX512-VNNI CPU (torch 2.14.1): equal to the x86 engine on every output of
    notebook e's conv, and within 1 LSB elsewhere, the rare differences lying on near-ties
    (``tests/test_modules.py``). VNNI's ``vpdpbusd`` adds four uint8 x int8 products straight
    into int32, so no 8-bit activation saturates on this path (unless oneDNN is capped below
    VNNI: :func:`x86_uses_vnni`).
    """
    acc = layer.accumulate(q_x).to(torch.float32)
    _, b = layer.float_weight_bias()
    if b is None:
        b = torch.zeros(layer.weight_int.shape[0])
    shape = [1, -1] + [1] * (acc.dim() - 2)
    scale = (layer.q_in.scale * layer.q_w.scale).to(torch.float32).reshape(shape)   # f32(S_x S_w)
    zero_point = float(layer.q_out.zero_point)
    v = acc * scale                                              # separate float32 steps (no
    v = v + b.detach().to(torch.float32).reshape(shape)          # fused multiply-add), each rounded
    v = v * (1.0 / layer.q_out.scale.to(torch.float32))
    q = torch.round(v + zero_point)                              # Z_y added before rounding
    return layer.add_zero_point_and_clamp(q - zero_point)


class TorchQuantizedNet(torch.nn.Module):
    """PyTorch's int8 model with a QuantizedNet's integers and qparams (see torch_quantized_model).

    Walks the quantized graph with PyTorch's quantized ops: ``nnq.Conv2d`` / ``Linear`` (fused
    ReLU variants), ``F.relu6``, ``torch.ops.quantized.add`` / ``add_relu``,
    ``torch.ops.quantized.cat``, ``F.max_pool2d``, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d`` and
    ``F.relu`` on quint8 tensors; shape ops run unchanged on the quantized tensors.
    """

    def __init__(self, qnet, engine: str):
        super().__init__()
        self.engine, self.qnet = engine, qnet
        self.mods = torch.nn.ModuleDict()
        for step in qnet.steps:
            if step.kind != "layer":
                continue
            layer = qnet.layers[step.index]
            if isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
                self.mods[str(step.index)] = torch_quantized_layer(layer, engine)
            elif not isinstance(layer, _GRAPH_LAYERS):
                raise TypeError(f"no PyTorch equivalent for {type(layer).__name__}")

    def _layer(self, index: int, layer, args):
        if isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
            y = self.mods[str(index)](args[0])
            if layer.relu6:
                y = _relu6(y)
            return narrow(y, layer.q_out)
        if isinstance(layer, QAdd):
            add = torch.ops.quantized.add_relu if layer.relu else torch.ops.quantized.add
            y = add(args[0], args[1], float(layer.q_out.scale), int(layer.q_out.zero_point))
            return narrow(y, layer.q_out)
        if isinstance(layer, QCat):
            y = torch.ops.quantized.cat(list(args), layer.dim, float(layer.q_out.scale),
                                        int(layer.q_out.zero_point))
            return narrow(y, layer.q_out)
        x = args[0]
        if isinstance(layer, QMaxPool2d):
            return F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding)
        if isinstance(layer, QAvgPool2d):
            if layer.output_size is not None:
                return F.adaptive_avg_pool2d(x, layer.output_size)
            return F.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                                layer.ceil_mode, layer.count_include_pad)
        if isinstance(layer, QReLU):
            return F.relu(x)
        if isinstance(layer, QReLU6):
            return _relu6(x)
        if isinstance(layer, QFlatten):
            return torch.flatten(x, 1)
        return x  # QInput

    @torch.no_grad()
    def integer_inference(self, q_x: torch.Tensor) -> torch.Tensor:
        """Input integers (quint8 values) -> output integers, with PyTorch's kernels."""
        q_in = self.qnet.q_in
        with quantized_engine(self.engine):
            values = {self.qnet.input_name: torch._make_per_tensor_quantized_tensor(
                q_x.to(torch.uint8), float(q_in.scale), int(q_in.zero_point))}
            for step in self.qnet.steps:
                names = _refs(step.args)
                if step.kind == "alias":
                    values[step.name] = values[names[0]]
                    continue
                args = _subst(step.args, values)
                if step.kind == "shape":
                    values[step.name] = step.fn(*args, **_subst(step.kwargs, values))
                else:
                    values[step.name] = self._layer(step.index, self.qnet.layers[step.index], args)
            return values[self.qnet.output_name].int_repr().to(torch.int32)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> dequantized outputs (quantized with the same q_in as quantlab)."""
        q = self.integer_inference(self.qnet.q_in.quantize_tensor(x))
        return self.qnet.q_out.dequantize_tensor(q)


def torch_quantized_model(qnet, engine: str = "qnnpack") -> TorchQuantizedNet:
    """PyTorch's native int8 version of a frozen QuantizedNet (any converted model), with the
    same integer weights and qparams."""
    if not hasattr(qnet, "steps") or not hasattr(qnet, "frozen"):
        raise TypeError(f"qnet must be a QuantizedNet (quantize_model); got {type(qnet).__name__}")
    if not qnet.frozen:
        raise RuntimeError("qnet must be frozen (calibrate, then freeze()) before conversion")
    return TorchQuantizedNet(qnet, engine)
