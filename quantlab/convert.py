"""Quantize your own model: trace it with ``torch.fx``, fuse, and build a quantized graph model.

``quantize_model(model)`` traces any ``nn.Module`` and replaces each supported node by a quantized
layer (:mod:`quantlab.modules`, :mod:`quantlab.ops`):

    Conv2d (+ BatchNorm2d, folded) (+ ReLU / ReLU6, the output clamp)  -> QConv2d / QConvBNReLU
    Linear (+ ReLU)                                                      -> QLinear
    a + b, torch.add (+ ReLU)                                            -> QAdd
    torch.cat                                                            -> QCat
    MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, ReLU, ReLU6                 -> QMaxPool2d, QAvgPool2d,
                                                                            QReLU, QReLU6
    flatten / view / reshape / size, Identity, Dropout (eval)            -> shape ops, pass-through

in module and functional form alike. ``Net`` and ``NetBN`` are two inputs like any other.
The result, a :class:`QuantizedNet`, keeps its layers in graph order in ``layers`` and runs them
in three modes: float with fake quantization (calibration, QAT), and integer inference.
Taught in notebooks ``d_post_training_quantize`` (Net) and ``h_your_own_model`` (a ResNet).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .modules import (
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    QModule,
    QReLU,
    _QWeighted,
    calibration_mode,
    check_integer_input,
)
from .observer import QParam
from .ops import QAdd, QAvgPool2d, QCat, QInput, QReLU6

SUPPORTED = ("Conv2d (+BatchNorm2d) (+ReLU/ReLU6), Linear (+ReLU), MaxPool2d / F.max_pool2d, "
             "AvgPool2d / F.avg_pool2d, AdaptiveAvgPool2d / F.adaptive_avg_pool2d, "
             "ReLU / F.relu / torch.relu, ReLU6 / F.relu6 / Hardtanh(0, 6), a + b / torch.add "
             "(+ReLU), torch.cat, Flatten / torch.flatten / view / reshape / size, Identity, "
             "Dropout")


class UnsupportedModelError(ValueError):
    """The model holds a node quantize_model cannot convert (the message names it)."""


_RELU_FNS = {F.relu, torch.relu, torch.relu_}
_RELU6_FNS = {F.relu6}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_CAT_FNS = {torch.cat, torch.concat}
_FLATTEN_FNS = {torch.flatten}
_DROPOUT_FNS = {F.dropout}
_SHAPE_METHODS = {"view", "reshape", "size", "contiguous"}
_SHAPE_FNS = {torch.reshape, operator.getitem, getattr}


@dataclass
class Step:
    """One node of the quantized graph: ``kind`` is 'layer' (``layers[index]``), 'shape' (a
    shape function applied as-is to float or integer tensors) or 'alias' (pass-through)."""
    name: str
    kind: str
    index: int = -1
    fn: object = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    #: the integer step computes a conv with this max-pool on its accumulators (same integers)
    pool_of: str | None = None


def _refs(args):
    """Names of the graph values used in (nested) args."""
    out = []
    for a in args:
        if isinstance(a, str) and a.startswith("%"):
            out.append(a[1:])
        elif isinstance(a, (list, tuple)):
            out.extend(_refs(a))
    return out


def _subst(args, values):
    if isinstance(args, str) and args.startswith("%"):
        return values[args[1:]]
    if isinstance(args, (list, tuple)):
        return type(args)(_subst(a, values) for a in args)
    if isinstance(args, dict):
        return {k: _subst(v, values) for k, v in args.items()}
    return args


def _encode(arg):
    """fx arguments -> plain data with '%name' for graph values."""
    if isinstance(arg, torch.fx.Node):
        return "%" + arg.name
    if isinstance(arg, (list, tuple)):
        return type(arg)(_encode(a) for a in arg)
    if isinstance(arg, dict):
        return {k: _encode(v) for k, v in arg.items()}
    return arg


class QuantizedNet(nn.Module):
    """A quantized graph model built by :func:`quantize_model`.

    ``forward(x)`` runs fake quantization on float images (calibration, QAT);
    ``calibrate(data)`` observes ranges; ``freeze()``; ``quantize_inference(x)`` runs the integer
    layers on float images and returns dequantized outputs; ``integer_inference(q_x)`` maps the
    input integers to the output integers. ``layers`` holds the quantized layers in graph order.
    """

    def __init__(self, layers: list[nn.Module], num_bits: int, per_channel: bool,
                 fixed_point: bool, qat: bool, steps: list[Step] | None = None,
                 input_name: str = "x", output_name: str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_bits, self.per_channel = num_bits, per_channel
        self.fixed_point, self.qat = fixed_point, qat
        if steps is None:  # a plain chain of layers
            steps, prev = [], input_name
            for i in range(len(layers)):
                steps.append(Step(f"layer{i}", "layer", i, args=("%" + prev,)))
                prev = f"layer{i}"
            output_name = prev
        self.steps, self.input_name, self.output_name = steps, input_name, output_name
        self._qsource = self._trace_qparams()
        #: max-pool step name -> the conv step whose accumulators it pools (integer inference)
        self._pool_fused = {s.pool_of: s for s in steps if s.pool_of is not None}
        if qat:
            # fine-tuning from a trained float model: a third of its peak learning rate, and no
            # shift augmentation (measured best at 2-4 bits on the embedded digits)
            self.default_lr, self.default_augment = 1e-3, 0

    # -- where each value's qparams live ------------------------------------------------------
    def _trace_qparams(self) -> dict:
        """value name -> (layer index, 'q_in' | 'out'): the QParam describing that value."""
        src, first = {}, None
        for step in self.steps:
            ins = _refs(step.args)
            if step.kind == "layer":
                layer = self.layers[step.index]
                if self.input_name in ins and getattr(layer, "qi", False):
                    first = (step.index, "q_in")
                    src[self.input_name] = first
                if isinstance(layer, (_QWeighted, QAdd, QCat)):
                    src[step.name] = (step.index, "out")
                elif isinstance(layer, QInput):
                    src[step.name] = (step.index, "q_in")
                else:  # shares its input's qparams
                    src[step.name] = src.get(ins[0])
            elif ins:
                src[step.name] = src.get(ins[0])
        return src

    def _qparam(self, name: str) -> QParam | None:
        where = self._qsource.get(name)
        if where is None:
            return None
        layer = self.layers[where[0]]
        return layer.q_in if where[1] == "q_in" else layer.output_qparam

    @property
    def q_in(self) -> QParam:
        """The QParam of the input images."""
        return self._qparam(self.input_name)

    @property
    def q_out(self) -> QParam:
        """The QParam of the model's output (the logits)."""
        return self._qparam(self.output_name)

    @property
    def frozen(self) -> bool:
        return all(layer.frozen for layer in self.layers if isinstance(layer, QModule))

    # -- running the graph --------------------------------------------------------------------
    def _run(self, x: torch.Tensor, integer: bool, keep: bool = False):
        values = {self.input_name: x}
        for step in self.steps:
            if step.kind == "alias":
                values[step.name] = values[_refs(step.args)[0]]
                continue
            args = _subst(step.args, values)
            if step.kind == "shape":
                values[step.name] = step.fn(*args, **_subst(step.kwargs, values))
                continue
            layer = self.layers[step.index]
            if not integer:
                if isinstance(layer, (QAvgPool2d, QReLU6)):
                    values[step.name] = layer(args[0], self._qparam(_refs(step.args)[0]))
                else:
                    values[step.name] = layer(*args)
            elif step.pool_of is not None:
                values[step.name] = None  # computed by the max-pool that follows (pool_of)
            elif step.name in self._pool_fused:
                conv_step = self._pool_fused[step.name]
                conv = self.layers[conv_step.index]
                q_x = values[_refs(conv_step.args)[0]]
                values[step.name] = conv.quantize_inference(
                    q_x, pool=(layer.kernel_size, layer.stride or layer.kernel_size))
            else:
                values[step.name] = layer.quantize_inference(*args)
        return values if keep else values[self.output_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, integer=False)

    @torch.no_grad()
    def calibrate(self, data, num_batches: int | None = None) -> QuantizedNet:
        """Observe activation ranges on calibration data (use training data, never the test set).

        Args:
            data: a DataLoader of ``(images, labels)`` or any iterable of image batches.
            num_batches: stop after this many batches (None: all).
        """
        seen = 0
        with calibration_mode(self):
            for batch in data:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(images, torch.Tensor):
                    raise TypeError(f"data must yield image tensors or (images, labels); got "
                                    f"{type(images).__name__}")
                self(images)
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
        if seen == 0:
            raise ValueError("data yielded no batches: calibration needs at least one batch")
        return self

    def freeze_bn_stats(self, frozen: bool = True) -> QuantizedNet:
        """Fold BN's running statistics during training too (True), or let BN normalize with the
        batch statistics while training (False; see QConvBNReLU)."""
        for m in self.modules():
            if isinstance(m, QConvBNReLU):
                m.freeze_bn_stats = frozen
        return self

    def freeze_observers(self) -> QuantizedNet:
        """Stop updating activation ranges (e.g. for the last epochs of QAT)."""
        for m in self.modules():
            if isinstance(m, QParam) and m.averaging_constant != 1.0:
                m.observing = False
        return self

    @torch.no_grad()
    def freeze(self) -> QuantizedNet:
        """Freeze every layer in graph order, feeding each its inputs' QParams."""
        self.eval()
        for step in self.steps:
            if step.kind != "layer":
                continue
            layer = self.layers[step.index]
            ins = [self._qparam(n) for n in _refs(step.args)]
            if isinstance(layer, QAdd):
                layer.freeze(ins[0], ins[1])
            elif isinstance(layer, QCat):
                layer.freeze(ins)
            elif isinstance(layer, QInput):
                layer.freeze()
            elif isinstance(layer, _QWeighted) and layer.qi:
                layer.freeze(q_in=None)
            else:
                if ins[0] is None:
                    raise RuntimeError(f"layer {step.index} ({type(layer).__name__}) has no "
                                       "quantized input")
                layer.freeze(q_in=ins[0])
        return self

    def _check_frozen(self):
        if not self.frozen:
            raise RuntimeError("quantize_inference needs freeze() first: "
                               "qnet.calibrate(train_loader); qnet.freeze()")

    #: images per chunk in integer inference: small tensors stay in the CPU caches (measured
    #: 3-4x faster than one 10,000-image batch on 2 cores)
    chunk_size = 256

    @torch.no_grad()
    def integer_inference(self, q_x: torch.Tensor) -> torch.Tensor:
        """int32 image integers -> int32 output integers, integer arithmetic only.

        A max-pool that is a conv's only consumer is applied to the conv's accumulators (same
        integers, faster). Large batches are processed in chunks of ``chunk_size`` images.
        """
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        if q_x.dim() > 0 and q_x.shape[0] > self.chunk_size:
            return torch.cat([self._run(c, integer=True) for c in q_x.split(self.chunk_size)])
        return self._run(q_x, integer=True)

    @torch.no_grad()
    def integer_values(self, q_x: torch.Tensor) -> dict:
        """Every intermediate integer tensor of ``integer_inference(q_x)``, by graph node name
        (the step names of ``steps``; a conv fused with its max-pool appears as the pool)."""
        self._check_frozen()
        check_integer_input(q_x, self.q_in)
        values = self._run(q_x, integer=True, keep=True)
        return {k: v for k, v in values.items() if v is not None}

    def qparam_of(self, name: str) -> QParam:
        """The QParam of the graph value ``name`` (a step name, or the input's name)."""
        q = self._qparam(name)
        if q is None:
            raise KeyError(f"name must be a graph value with qparams; got {name!r}")
        return q

    @torch.no_grad()
    def quantize_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> quantize with ``q_in`` -> integer layers -> dequantized float output."""
        self._check_frozen()
        return self.q_out.dequantize_tensor(self.integer_inference(self.q_in.quantize_tensor(x)))

    def accuracy(self, loader) -> float:
        """Accuracy of the integer model (``quantize_inference``) on ``loader`` of
        ``(images, labels)``, as a fraction in [0, 1]."""
        correct = total = 0
        for images, labels in loader:
            correct += int((self.quantize_inference(images).argmax(1) == labels).sum())
            total += len(labels)
        if total == 0:
            raise ValueError("loader yielded no images")
        return correct / total

    def size_bytes(self) -> dict:
        """Storage of the frozen integer model: weights at ceil(num_bits/8) bytes each, int32
        biases, and per output channel a float32 multiplier plus the weight's scale and zero
        point; compared with the float32 parameters of the float layers."""
        self._check_frozen()
        int_bytes, float_bytes = 0, 0
        per_weight = (self.num_bits + 7) // 8
        for layer in self.layers:
            if isinstance(layer, QModule) and hasattr(layer, "weight_int"):
                w, b = layer.float_weight_bias()
                float_bytes += 4 * (w.numel() + (b.numel() if b is not None else 0))
                channels = layer.weight_int.shape[0]
                int_bytes += per_weight * layer.weight_int.numel() + 4 * channels  # w, bias
                int_bytes += 4 * channels + 4 * layer.q_w.scale.numel() * 2      # M, S_w, Z_w
        return {"float32": float_bytes, "integer": int_bytes}


# ---------------------------------------------------------------------------------------------
# conversion

def _describe(node: torch.fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"node '{node.name}' (call_module {type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node '{node.name}' ({node.op} {target})"


def _unsupported(node, modules, why: str = "") -> UnsupportedModelError:
    why = f": {why}" if why else ""
    return UnsupportedModelError(f"quantize_model cannot convert {_describe(node, modules)}{why}. "
                                 f"Supported: {SUPPORTED}.")


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _kind(node: torch.fx.Node, modules: dict) -> str | None:
    """Classify a node: conv, bn, linear, relu, relu6, maxpool, avgpool, adaptive, add, cat,
    flatten, shape, alias; None if unsupported."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d):
            return "conv"
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and
                                       (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.MaxPool2d):
            return "maxpool"
        if isinstance(m, nn.AvgPool2d):
            return "avgpool"
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return "adaptive"
        if isinstance(m, nn.Flatten):
            return "flatten"
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return "alias"
        return None
    if node.op == "call_function":
        t = node.target
        if t in _RELU_FNS:
            return "relu"
        if t in _RELU6_FNS or (t is F.hardtanh and (_arg(node, 1, "min_val", -1.0),
                                                     _arg(node, 2, "max_val", 1.0)) == (0, 6)):
            return "relu6"
        if t is F.max_pool2d:
            return "maxpool"
        if t is F.avg_pool2d:
            return "avgpool"
        if t is F.adaptive_avg_pool2d:
            return "adaptive"
        if t in _ADD_FNS:
            return "add"
        if t in _CAT_FNS:
            return "cat"
        if t in _FLATTEN_FNS:
            return "flatten"
        if t in _DROPOUT_FNS:
            return "alias"
        if t in _SHAPE_FNS:
            return "shape"
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("add", "add_"):
            return "add"
        if node.target == "flatten":
            return "flatten"
        if node.target in _SHAPE_METHODS:
            return "shape"
        return None
    return None


def _single_user(node, kinds, kind_set) -> torch.fx.Node | None:
    """The node's only user if it is of one of ``kind_set``, else None."""
    users = list(node.users)
    if len(users) == 1 and kinds.get(users[0]) in kind_set:
        return users[0]
    return None


def _pool_args(node, modules, kind):
    if node.op == "call_module":
        m = modules[node.target]
        if kind == "adaptive":
            return dict(output_size=m.output_size)
        d = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                 ceil_mode=m.ceil_mode)
        if kind == "maxpool":
            d["dilation"] = m.dilation
            d["return_indices"] = m.return_indices
        else:
            d["count_include_pad"] = m.count_include_pad
            d["divisor_override"] = m.divisor_override
        return d
    if kind == "adaptive":
        return dict(output_size=_arg(node, 1, "output_size"))
    k = _arg(node, 1, "kernel_size")
    d = dict(kernel_size=k, stride=_arg(node, 2, "stride") or k, padding=_arg(node, 3, "padding", 0))
    if kind == "maxpool":
        d.update(dilation=_arg(node, 4, "dilation", 1), ceil_mode=_arg(node, 5, "ceil_mode", False),
                 return_indices=_arg(node, 6, "return_indices", False))
    else:
        d.update(ceil_mode=_arg(node, 4, "ceil_mode", False),
                 count_include_pad=_arg(node, 5, "count_include_pad", True),
                 divisor_override=_arg(node, 6, "divisor_override"))
    return d


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); quantize_model needs a model whose forward is a "
            "fixed graph of supported ops") from e


def quantize_model(model: nn.Module, num_bits: int = 8, per_channel: bool = True,
                   qat: bool = False, fixed_point: bool = False,
                   averaging_constant: float | None = None, output_bits: int | None = 8,
                   example_input: torch.Tensor | None = None) -> QuantizedNet:
    """Build the quantized version of any supported model (a deep copy: ``model`` is untouched).

    The model is traced with ``torch.fx``; a Conv2d's BatchNorm2d is folded into it and a
    following ReLU/ReLU6 fused (the output range is observed after it and the activation becomes
    the output clamp); a ReLU after an add is fused into the add. See the module docstring for
    the supported ops; anything else raises :class:`UnsupportedModelError` naming the node.

    Args:
        model: an ``nn.Module`` mapping one image tensor to one output tensor.
        num_bits: bits of weights and activations (2..16; 8 for PyTorch's engines).
        per_channel: symmetric per-channel int weights (True) or affine per-tensor (False).
        qat: return a trainable model for quantization-aware training: activation ranges follow a
            moving average (``averaging_constant`` 0.01 unless given), BN statistics are frozen
            (``freeze_bn_stats``), the model is in train mode and carries its own default
            learning rate and augmentation for ``quantlab.training.train``.
        fixed_point: integer-only requantization of conv/linear layers (Q31 multiplier and shift)
            instead of float.
        output_bits: bits of the model's output (8 by default; None for ``num_bits``): 10
            logits on 2 bits would mostly tie at the top level.
        example_input: an input batch; when given, the float and the traced graph are run on it
            and must agree (catches a reshape that mixes the batch dimension).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if averaging_constant is None and qat:
        averaging_constant = 0.01
    model = copy.deepcopy(model).eval()
    gm = _trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    kinds = {n: _kind(n, modules) for n in nodes if n.op in ("call_module", "call_function",
                                                             "call_method")}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"quantize_model needs a model with one input; "
                                    f"{type(model).__name__}.forward takes {len(placeholders)}")
    out_arg = outputs[0].args[0]
    if not isinstance(out_arg, torch.fx.Node):
        raise UnsupportedModelError("quantize_model needs a model that returns one tensor; "
                                    f"{type(model).__name__} returns {type(out_arg).__name__}")
    x_name = placeholders[0].name
    kw = dict(num_bits=num_bits, per_channel=per_channel, fixed_point=fixed_point,
              averaging_constant=averaging_constant)

    layers, steps, absorbed = [], [], {}
    # the input goes straight into exactly one weighted layer: that layer quantizes it (qi=True)
    x_users = list(placeholders[0].users)
    first_owner = x_users[0] if len(x_users) == 1 and kinds.get(x_users[0]) in ("conv", "linear") \
        else None
    if first_owner is None:
        layers.append(QInput(num_bits, averaging_constant))
        steps.append(Step(x_name + "_q", "layer", 0, args=("%" + x_name,)))
        rename = {x_name: x_name + "_q"}
    else:
        rename = {}

    def ref(n):
        if not isinstance(n, torch.fx.Node):
            return _encode(n)
        name = absorbed.get(n.name, n.name)
        return "%" + rename.get(name, name)

    def enc(a):
        if isinstance(a, torch.fx.Node):
            return ref(a)
        if isinstance(a, (list, tuple)):
            return type(a)(enc(v) for v in a)
        if isinstance(a, dict):
            return {k: enc(v) for k, v in a.items()}
        return a

    def add_layer(node, layer, args, out_node=None):
        layers.append(layer)
        steps.append(Step((out_node or node).name, "layer", len(layers) - 1, args=args))

    for node in nodes:
        if node.op in ("placeholder", "output") or node.name in absorbed:
            continue
        if node.op == "get_attr":
            raise _unsupported(node, modules, "parameters used outside a Conv2d/Linear module")
        kind = kinds.get(node)
        if kind is None:
            raise _unsupported(node, modules)
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if kind in ("conv", "linear"):
            m = modules[node.target]
            qi = node is first_owner
            bn = _single_user(node, kinds, {"bn"}) if kind == "conv" else None
            last = bn or node
            act = _single_user(last, kinds, {"relu", "relu6"})
            if act is not None and act.op == "call_method" and act.args[0] is not last:
                act = None
            relu = act is not None
            if kind == "linear":
                if act is not None and kinds[act] == "relu6":
                    act, relu = None, False
                layer = QLinear(m, qi, True, relu=relu, **kw)
            elif bn is not None:
                layer = QConvBNReLU(m, modules[bn.target], qi, True, relu=relu, **kw)
            else:
                layer = QConv2d(m, qi, True, relu=relu, **kw)
            if act is not None and kinds[act] == "relu6":
                layer.relu6 = True
            out = act or last
            for fused in (bn, act):
                if fused is not None:
                    absorbed[fused.name] = out.name
            add_layer(node, layer, (ref(tensor_args[0]),), out)
        elif kind == "bn":
            raise _unsupported(node, modules, "a BatchNorm2d is only supported right after a "
                               "Conv2d whose only user it is (it is folded into the conv)")
        elif kind in ("relu", "relu6"):
            layer = QReLU(num_bits) if kind == "relu" else QReLU6(num_bits)
            add_layer(node, layer, (ref(tensor_args[0]),))
        elif kind == "maxpool":
            p = _pool_args(node, modules, kind)
            if p["dilation"] not in (1, (1, 1)) or p["ceil_mode"] or p["return_indices"]:
                raise _unsupported(node, modules, "max-pooling with dilation, ceil_mode or "
                                   "return_indices")
            add_layer(node, QMaxPool2d(p["kernel_size"], p["stride"], p["padding"], num_bits),
                      (ref(tensor_args[0]),))
        elif kind == "avgpool":
            p = _pool_args(node, modules, kind)
            if p["divisor_override"] is not None:
                raise _unsupported(node, modules, "avg-pooling with divisor_override")
            layer = QAvgPool2d(p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                               p["count_include_pad"], num_bits=num_bits)
            add_layer(node, layer, (ref(tensor_args[0]),))
        elif kind == "adaptive":
            p = _pool_args(node, modules, kind)
            add_layer(node, QAvgPool2d(output_size=p["output_size"], num_bits=num_bits),
                      (ref(tensor_args[0]),))
        elif kind == "add":
            alpha = node.kwargs.get("alpha", 1)
            if len(tensor_args) != 2 or len(node.args) != 2 or alpha != 1:
                raise _unsupported(node, modules, "only the sum of two tensors is supported "
                                   "(no constants, no alpha)")
            act = _single_user(node, kinds, {"relu"})
            layer = QAdd(num_bits, relu=act is not None, averaging_constant=averaging_constant)
            if act is not None:
                absorbed[act.name] = act.name
            add_layer(node, layer, tuple(ref(a) for a in tensor_args), act)
        elif kind == "cat":
            tensors = _arg(node, 0, "tensors")
            dim = _arg(node, 1, "dim", 0)
            if not isinstance(tensors, (list, tuple)) or not all(
                    isinstance(t, torch.fx.Node) for t in tensors) or dim == 0:
                raise _unsupported(node, modules, "torch.cat needs a list of tensors and dim != 0 "
                                   "(the batch)")
            add_layer(node, QCat(len(tensors), dim, num_bits, averaging_constant),
                      tuple(ref(t) for t in tensors))
        elif kind == "flatten":
            if node.op == "call_module":
                m = modules[node.target]
                start, end = m.start_dim, m.end_dim
            else:
                start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            if start == 0:
                raise _unsupported(node, modules, "flattening the batch dimension (start_dim=0)")
            if (start, end) == (1, -1):
                add_layer(node, QFlatten(num_bits), (ref(tensor_args[0]),))
            else:
                steps.append(Step(node.name, "shape", fn=torch.flatten,
                                  args=(ref(tensor_args[0]), start, end)))
        elif kind == "alias":
            steps.append(Step(node.name, "alias", args=(ref(node.args[0]),)))
        else:  # shape
            if node.op == "call_method":
                fn = getattr(torch.Tensor, node.target)
            else:
                fn = node.target
            steps.append(Step(node.name, "shape", fn=fn, args=enc(node.args),
                              kwargs=enc(node.kwargs)))

    # fuse a conv with the max-pool that is its only user (integer inference only)
    by_name = {s.name: s for s in steps}
    for s in steps:
        layer = layers[s.index] if s.kind == "layer" else None
        if isinstance(layer, QMaxPool2d) and layer.padding in (0, (0, 0)):
            src = by_name.get(s.args[0][1:])
            users = [t for t in steps if s.args[0] in _flat(t.args)]
            if src is not None and src.kind == "layer" and isinstance(
                    layers[src.index], (QConv2d, QConvBNReLU)) and len(users) == 1 \
                    and src.name != out_arg.name:
                src.pool_of = s.name

    out_name = ref(out_arg)[1:]
    qnet = QuantizedNet(layers, num_bits, per_channel, fixed_point, qat, steps,
                        input_name=x_name, output_name=out_name)
    if output_bits is not None and output_bits != num_bits:
        where = qnet._qsource.get(out_name)
        if where is not None and where[1] == "out":
            qnet.layers[where[0]].q_out = QParam(output_bits, averaging_constant=averaging_constant)
    if example_input is not None:
        with torch.no_grad():
            want, got = model(example_input), gm(example_input)
        if not isinstance(want, torch.Tensor) or want.shape != got.shape or \
                not torch.allclose(want, got) or got.shape[0] != example_input.shape[0]:
            raise UnsupportedModelError("the traced graph does not reproduce the model on "
                                        "example_input, or does not keep the batch dimension")
    if qat:
        # fine-tuning a trained model: BN statistics frozen, i.e. training folds BN exactly as
        # inference does (the last phase of the standard recipe)
        qnet.freeze_bn_stats(True)
    return qnet.train(qat)


def _flat(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        else:
            out.append(a)
    return out
