"""Quantize your own model: trace it with ``torch.fx``, fuse, and build a quantized graph model.

``quantize_model(model)`` traces any ``nn.Module`` and replaces each supported node by a quantized
layer (:mod:`quantlab.modules`, :mod:`quantlab.ops`)::

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

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._validate import check_bool, check_real, check_tensor
from .graph import QuantizedNet, Step
from .learned import LearnedQParam, check_learn_ranges
from .modules import (
    QConv2d,
    QConvBNReLU,
    QFlatten,
    QLinear,
    QMaxPool2d,
    QReLU,
    check_multiplier_formula,
)
from .observer import QParam
from .observers import WEIGHT_OBSERVERS, Observer, check_observer, make_observer
from .ops import QAdd, QAvgPool2d, QCat, QInput, QReLU6
from .qparams import check_num_bits

SUPPORTED = ("Conv2d (+BatchNorm2d) (+ReLU/ReLU6), Linear (+ReLU), MaxPool2d / F.max_pool2d, "
             "AvgPool2d / F.avg_pool2d, AdaptiveAvgPool2d / F.adaptive_avg_pool2d, "
             "ReLU / F.relu / torch.relu, ReLU6 / F.relu6 / Hardtanh(0, 6), a + b / torch.add "
             "(+ReLU), torch.cat, Flatten / torch.flatten / view / reshape / size, Identity, "
             "Dropout")


class UnsupportedModelError(ValueError):
    """The model holds a node quantize_model cannot convert (the message names it)."""


#: module classes by kind, in the order they are tried (a Hardtanh(0, 6) is a ReLU6 too)
_MODULE_KINDS = ((nn.Conv2d, "conv"), (nn.BatchNorm2d, "bn"), (nn.Linear, "linear"),
                 (nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool"),
                 (nn.AvgPool2d, "avgpool"), (nn.AdaptiveAvgPool2d, "adaptive"),
                 (nn.Flatten, "flatten"), ((nn.Identity, nn.Dropout), "alias"))
#: functions by kind
_FUNCTION_KINDS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                   F.max_pool2d: "maxpool", F.avg_pool2d: "avgpool",
                   F.adaptive_avg_pool2d: "adaptive", operator.add: "add", operator.iadd: "add",
                   torch.add: "add", torch.cat: "cat", torch.concat: "cat",
                   torch.flatten: "flatten", F.dropout: "alias", torch.reshape: "shape",
                   operator.getitem: "shape", getattr: "shape"}
#: tensor methods by kind
_METHOD_KINDS = {"relu": "relu", "relu_": "relu", "add": "add", "add_": "add",
                 "flatten": "flatten", "view": "shape", "reshape": "shape", "size": "shape",
                 "contiguous": "shape"}


def _encode(arg):
    """fx arguments -> plain data with '%name' for graph values."""
    if isinstance(arg, torch.fx.Node):
        return "%" + arg.name
    if isinstance(arg, (list, tuple)):
        return type(arg)(_encode(a) for a in arg)
    if isinstance(arg, dict):
        return {k: _encode(v) for k, v in arg.items()}
    return arg


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
        if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0):
            return "relu6"
        return next((kind for cls, kind in _MODULE_KINDS if isinstance(m, cls)), None)
    if node.op == "call_function":
        if node.target is F.hardtanh and (_arg(node, 1, "min_val", -1.0),
                                          _arg(node, 2, "max_val", 1.0)) == (0, 6):
            return "relu6"
        try:
            return _FUNCTION_KINDS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
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


#: in-place functions and methods: their first argument is changed
_IN_PLACE_FUNCTIONS = {torch.relu_, operator.iadd, operator.imul, operator.isub, operator.itruediv}
#: ops that return a view of (or the same tensor as) their first argument
_ALIAS_KINDS = ("shape", "alias", "flatten")


def _in_place_target(node: torch.fx.Node, modules: dict) -> torch.fx.Node | None:
    """The graph value ``node`` changes in place (``y.relu_()``, ``F.relu(y, inplace=True)``,
    ``x += y``, ``nn.ReLU(inplace=True)``), or None."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return first
    if node.op == "call_function":
        try:
            if node.target in _IN_PLACE_FUNCTIONS:
                return first
        except TypeError:
            return None
        return first if node.kwargs.get("inplace") is True else None
    if node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True:
        return first
    return None


def _check_in_place(nodes: list, kinds: dict, modules: dict) -> None:
    """Refuse an in-place op whose changed tensor is read after it, under any name.

    quantlab's integer graph computes every op out of place, which equals the float model only
    when nothing reads the changed tensor (or a view of it) after the in-place op: as in
    ``y = F.relu(y, inplace=True)`` or torchvision's ``out += identity; out = relu(out)``. With
    ``y.relu_()`` whose result is ignored, or ``identity = x; x += f(x); x + identity``, a later op
    reads the changed tensor, and the converted model would silently differ.
    """
    order = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        target = _in_place_target(node, modules)
        if target is None:
            continue
        group, todo = set(), [target]
        while todo:                                     # target and every view that shares it
            n = todo.pop()
            if n in group:
                continue
            group.add(n)
            if kinds.get(n) in _ALIAS_KINDS and n.args and isinstance(n.args[0], torch.fx.Node):
                todo.append(n.args[0])
            todo.extend(u for u in n.users if kinds.get(u) in _ALIAS_KINDS and u is not node)
        late = sorted((u for n in group for u in n.users if u is not node and order[u] > order[node]),
                      key=order.get)
        if late:
            raise _unsupported(node, modules, f"it changes '{target.name}' in place and "
                               f"'{late[0].name}' reads it afterwards, which the converted graph "
                               "cannot follow; write it out of place (y = F.relu(y), x = x + y)")


class _InPlaceProxy(torch.fx.Proxy):
    """A proxy that records ``x += y`` as ``operator.iadd`` (torch.fx's own falls back to
    ``x = x + y``, which hides that the tensor ``x`` held is changed in place)."""

    def _in_place(self, op, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other):
        return self._in_place(operator.iadd, other)

    def __isub__(self, other):
        return self._in_place(operator.isub, other)

    def __imul__(self, other):
        return self._in_place(operator.imul, other)

    def __itruediv__(self, other):
        return self._in_place(operator.itruediv, other)


class _Tracer(torch.fx.Tracer):
    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _InPlaceProxy(node, self)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); quantize_model needs a model whose forward is a "
            "fixed graph of supported ops") from e


def quantize_model(net: nn.Module, num_bits: int = 8, per_channel: bool = True,
                   qat: bool = False, fixed_point: bool = False,
                   averaging_constant: float | None = None, output_bits: int | None = 8,
                   multiplier: str = "qnnpack", observer=None, weight_observer=None,
                   learn_ranges=False,
                   example_input: torch.Tensor | None = None) -> QuantizedNet:
    """Build the quantized version of any supported model (a deep copy: ``net`` is untouched).

    The model is traced with ``torch.fx``; a Conv2d's BatchNorm2d is folded into it and a
    following ReLU/ReLU6 fused (the output range is observed after it and the activation becomes
    the output clamp); a ReLU after an add is fused into the add. See the module docstring for
    the supported ops; anything else raises :class:`UnsupportedModelError` naming the node.

    Args:
        net: the float model, an ``nn.Module`` mapping one image tensor to one output tensor
            (``Net``, ``NetBN``, ``ResNet`` or your own).
        num_bits: bits of weights and activations (2..16; 8 for PyTorch's engines).
        per_channel: symmetric per-channel int weights (True) or affine per-tensor (False).
        qat: return a trainable model for quantization-aware training: activation ranges follow a
            moving average (``averaging_constant`` 0.01 unless given), BN statistics are frozen
            (``freeze_bn_stats``), the model is in train mode and carries its own default
            learning rate and augmentation for ``quantlab.training.train``.
        fixed_point: integer-only requantization of conv/linear layers (Q31 multiplier and shift)
            instead of float.
        output_bits: bits of the model's output, the logits to the host (8 by default; None for
            ``num_bits``). Below 8 bits ``num_bits`` applies to the input, every weight and every
            hidden activation, but 10 logits on 2 bits (4 levels) would mostly tie at the top
            level, so the output keeps its own width.
        multiplier: ``"qnnpack"`` (default) or ``"onnxruntime"``: how ``freeze()`` computes the
            float32 requantization multiplier of the conv/linear layers, as PyTorch's qnnpack
            (``f32(f32(S_x*S_w) * f32(1/S_y))``) or as ONNX Runtime (``f32(f32(S_x*S_w) / S_y)``).
        observer: the range estimator of the hidden activations (the outputs of the conv, linear,
            add and cat layers, except the model's output): None (min/max, or the moving average
            for QAT), a name in ``quantlab.observers.OBSERVERS`` or an ``Observer`` (copied for
            each QParam). The input keeps min/max (the pixel range, known exactly; entropy would
            clip the white strokes) and so do the logits (clipping the top logit creates ties for
            the argmax). Notebook ``da_calibration``.
        weight_observer: ``None``/``"minmax"`` or ``"mse"`` (clipping per channel with
            ``per_channel=True``).
        learn_ranges: with ``qat=True``, learn the ranges instead of following a moving average
            (``quantlab.learned``): ``True`` or ``"lsq"`` learns every step with LSQ (weights per
            output channel, activations per tensor); ``"pact"`` learns the clip of the outputs of
            conv/linear layers with a fused ReLU with PACT and the other steps with LSQ; ``False``
            (default) learns none. The steps start from ``observer`` (hidden activations and
            the input; ``"mse"`` unless given), ``weight_observer`` (``"mse"`` unless given)
            and min/max for the model's output, on the first batch or in ``calibrate()``; the
            zero points stay as initialised. Notebook ``fa_learned_step_size``.
        example_input: an input batch; when given, the float and the traced graph are run on it
            and must agree (catches a reshape that mixes the batch dimension), and the model
            accepts only inputs of its shape (``input_shape``).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
    num_bits = check_num_bits(num_bits, "num_bits")
    per_channel, qat = check_bool(per_channel, "per_channel"), check_bool(qat, "qat")
    fixed_point = check_bool(fixed_point, "fixed_point")
    if output_bits is not None:
        output_bits = check_num_bits(output_bits, "output_bits")
    if averaging_constant is not None:
        averaging_constant = check_real(averaging_constant, "averaging_constant", 0, 1,
                                        low_open=True)
    multiplier = check_multiplier_formula(multiplier)
    observer = check_observer(observer, "observer")
    weight_observer = check_observer(weight_observer, "weight_observer", WEIGHT_OBSERVERS)
    if isinstance(weight_observer, Observer):
        raise TypeError("weight_observer must be None or one of "
                        f"{list(WEIGHT_OBSERVERS)}; got an Observer instance")
    if example_input is not None:
        check_tensor(example_input, "example_input")
        if example_input.dim() < 2 or len(example_input) == 0:
            raise ValueError(f"example_input must be a batch (N, ...) of at least one input, e.g. "
                             f"torch.zeros(1, 1, 28, 28); got shape {tuple(example_input.shape)}")
        if not example_input.is_floating_point():
            raise TypeError(f"example_input must be a float tensor like the model's inputs (the "
                            f"normalized images, e.g. torch.zeros(1, 1, 28, 28)); got dtype "
                            f"{example_input.dtype}")
        if not bool(torch.isfinite(example_input).all()):
            raise ValueError("example_input must hold finite values: it checks the traced graph "
                             "against the model, which NaN or inf cannot show")
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()):
        raise TypeError(f"net must hold at least one Conv2d or Linear layer to quantize; "
                        f"{type(net).__name__} has none")
    for name, p in list(net.named_parameters()) + list(net.named_buffers()):
        check_tensor(p, f"net.{name}")  # meta tensors (no data) cannot be quantized
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"net.{name} holds NaN or inf: a float model to quantize must be "
                             "finite")
    learn = check_learn_ranges(learn_ranges)
    if learn is not None and not qat:
        raise ValueError(f"learn_ranges={learn_ranges!r} learns ranges during quantization-aware "
                         "training: it needs qat=True")
    if averaging_constant is None and qat and learn is None:
        averaging_constant = 0.01
    # quantlab's qparams and observers are float32: a float64/float16 model is converted
    # (float16 -> float32 is exact; float64 -> float32 rounds each weight once)
    model = copy.deepcopy(net).float().eval()
    gm = _trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    kinds = {n: _kind(n, modules) for n in nodes if n.op in ("call_module", "call_function",
                                                             "call_method")}
    _check_in_place(nodes, kinds, modules)
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
              averaging_constant=averaging_constant, multiplier=multiplier)

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
            try:
                pool = QMaxPool2d(p["kernel_size"], p["stride"], p["padding"], num_bits)
            except (TypeError, ValueError) as e:   # e.g. a non-square window
                raise _unsupported(node, modules, str(e)) from e
            add_layer(node, pool, (ref(tensor_args[0]),))
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
            qnet.link_inputs()
    # the input shape the model accepts: example_input's, or one the model declares (Net's fc
    # needs 28x28 images); None accepts any batch
    qnet.input_shape = tuple(example_input.shape[1:]) if example_input is not None else \
        getattr(model, "input_shape", None)
    if learn is not None:
        _learn_ranges(qnet, learn, observer, weight_observer)
        qnet.default_lr = 3e-3  # the steps learn too: LSQ's recipe (benchmarks/bench_lsq.py)
    for layer in layers if learn is None else ():
        if observer is not None and isinstance(layer, (QConv2d, QConvBNReLU, QLinear, QAdd, QCat)) \
                and layer.q_out is not None and layer.q_out is not qnet.q_out:  # hidden ones only
            layer.q_out.observer = make_observer(copy.deepcopy(observer), None, averaging_constant)
        if weight_observer is not None and hasattr(layer, "q_w"):
            layer.q_w.observer = make_observer(weight_observer, layer.q_w.axis,
                                               name="weight_observer", allowed=WEIGHT_OBSERVERS)
    for layer in layers:
        # QAT's forward pass computes exactly what the integer model will: int32 bias and
        # requantization rounding (the calibration of PTQ keeps the plain fake quantization)
        layer.simulate_integer = qat and hasattr(layer, "link_input")
    if example_input is not None:
        _check_example_input(model, gm, example_input)
    if qat:
        # fine-tuning a trained model: BN statistics frozen, i.e. training folds BN exactly as
        # inference does (the last phase of the standard recipe)
        qnet.freeze_bn_stats(True)
    return qnet.train(qat)


def _check_example_input(model: nn.Module, gm: torch.fx.GraphModule, example_input) -> None:
    """The traced graph must reproduce the model on ``example_input`` and on a batch of twice
    its size (a batch of one cannot reveal a hard-coded ``reshape(1, -1)``), keeping the batch
    dimension."""
    x = example_input.float()
    batches = (x, torch.cat([x, x.flip(0)]))
    for batch in batches:
        try:
            with torch.no_grad():
                want, got = model(batch), gm(batch)
        except Exception as e:  # the model itself fails on a batch of another size
            raise UnsupportedModelError(
                f"the model fails on a batch of {batch.shape[0]} example inputs "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}): quantize_model needs a "
                "model that keeps the batch dimension (no hard-coded batch size)") from e
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or \
                want.shape != got.shape or not torch.allclose(want, got) or \
                got.shape[0] != batch.shape[0]:
            raise UnsupportedModelError(
                f"the traced graph does not reproduce the model on a batch of "
                f"{batch.shape[0]} example inputs, or does not keep the batch dimension "
                f"(output shape {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__})")


def _flat(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        else:
            out.append(a)
    return out


def _learn_ranges(qnet: QuantizedNet, method: str, observer, weight_observer) -> None:
    """Replace the model's QParams by learned ones (:class:`quantlab.learned.LearnedQParam`):
    every weight's (per output channel), the input's and every hidden activation's (per tensor;
    PACT only after a fused ReLU, whose output is unsigned from 0), and the output's, initialised
    by min/max (clipping the top logit would create ties for the argmax)."""

    def like(q: QParam, method="lsq", per_image=True, obs="mse"):
        return LearnedQParam(q.num_bits, q.signed, q.symmetric, q.axis, method=method,
                             per_image=per_image, observer=copy.deepcopy(obs))

    act = "mse" if observer is None else observer
    output = qnet.q_out
    for layer in qnet.layers:
        if hasattr(layer, "q_w"):
            layer.q_w = like(layer.q_w, per_image=False,
                             obs="mse" if weight_observer is None else weight_observer)
        if getattr(layer, "qi", False):  # the layer that quantizes the model's input (QInput too)
            layer.q_in = like(layer.q_in, obs=act)
        q_out = getattr(layer, "q_out", None)
        if q_out is None:
            continue
        if q_out is output:
            layer.q_out = like(q_out, obs="minmax")
        else:
            fused_relu = getattr(layer, "relu", False) and not getattr(layer, "relu6", False)
            layer.q_out = like(q_out, method=method if fused_relu else "lsq", obs=act)
    qnet.link_inputs()
