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

from .modules import QConv2d, QConvBNReLU, QLinear, QMaxPool2d, QModule, check_integer_input

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


class TorchQuantizedNet(torch.nn.Module):
    """PyTorch's int8 model with a QuantizedNet's integers and qparams (see torch_quantized_model)."""

    def __init__(self, qnet, engine: str):
        super().__init__()
        self.engine, self.qnet = engine, qnet
        self.mods = torch.nn.ModuleList()
        self.kinds = []
        for layer in qnet.layers:
            if isinstance(layer, (QConv2d, QConvBNReLU, QLinear)):
                self.mods.append(torch_quantized_layer(layer, engine))
                self.kinds.append(("layer", layer.q_out))
            elif isinstance(layer, QMaxPool2d):
                self.mods.append(torch.nn.Identity())
                self.kinds.append(("pool", layer.kernel_size, layer.stride, layer.padding))
            else:
                self.mods.append(torch.nn.Identity())
                self.kinds.append("flatten")

    @torch.no_grad()
    def integer_inference(self, q_x: torch.Tensor) -> torch.Tensor:
        """Input integers (quint8 values) -> logit integers, with PyTorch's kernels."""
        q_in = self.qnet.q_in
        with quantized_engine(self.engine):
            x = torch._make_per_tensor_quantized_tensor(q_x.to(torch.uint8), float(q_in.scale),
                                                        int(q_in.zero_point))
            for mod, kind in zip(self.mods, self.kinds):
                if kind[0] == "layer":
                    x = narrow(mod(x), kind[1])
                elif kind == "flatten":
                    x = torch.flatten(x, 1)
                else:
                    x = F.max_pool2d(x, kind[1], kind[2], kind[3])
            return x.int_repr().to(torch.int32)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> dequantized logits (quantized with the same q_in as quantlab)."""
        q = self.integer_inference(self.qnet.q_in.quantize_tensor(x))
        return self.qnet.q_out.dequantize_tensor(q)


def torch_quantized_model(qnet, engine: str = "qnnpack") -> TorchQuantizedNet:
    """PyTorch's native int8 version of a frozen QuantizedNet, with the same integers."""
    if not hasattr(qnet, "layers") or not hasattr(qnet, "frozen"):
        raise TypeError(f"qnet must be a QuantizedNet (quantize_model); got {type(qnet).__name__}")
    if not qnet.frozen:
        raise RuntimeError("qnet must be frozen (calibrate, then freeze()) before conversion")
    return TorchQuantizedNet(qnet, engine)
