"""What converts to what: the table :func:`quantlab.convert.quantize_model` reads.

Two tables, as PyTorch's FX quantization keeps its patterns as data:

- :data:`OPS`: which PyTorch modules, functions and tensor methods are one *kind* of op
  (``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()`` are all ``relu``);
- :data:`PATTERNS`: a chain of kinds (``conv + bn + relu``: each node the only user of the one
  before) mapped to the quantized layer that implements it, tried in table order, so the
  longest chain starting at a node wins.

Adding an op is one row in each table and a quantized module; the README's list of supported ops
(``python -m quantlab.patterns`` prints it) and the "Supported: ..." of
:class:`quantlab.convert.UnsupportedModelError` are generated from these rows.
Taught in notebook ``h_your_own_model``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .graph import Step
from .modules import QConv2d, QConvBNReLU, QFlatten, QLinear, QMaxPool2d, QReLU
from .ops import QAdd, QAvgPool2d, QCat, QHardtanh, QReLU6


class Refused(Exception):
    """A node matched a row but its arguments are not supported (the message says why)."""


def arg(node: torch.fx.Node, i: int, name: str, default=None):
    """The ``i``-th positional argument of ``node``, or its keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _hardtanh_range(node: torch.fx.Node, module) -> tuple:
    if module is not None:
        return module.min_val, module.max_val
    return arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)


def _is_relu6(node: torch.fx.Node, module) -> bool:
    """``nn.ReLU6`` and ``F.relu6`` always; ``Hardtanh`` / ``F.hardtanh`` when it clamps to [0, 6]."""
    if node.target is F.hardtanh or isinstance(module, nn.Hardtanh):
        return tuple(_hardtanh_range(node, module)) == (0, 6)
    return True


@dataclass(frozen=True)
class Op:
    """One kind of op and every PyTorch spelling of it: module classes, functions, tensor methods.

    ``when(node, module)`` further restricts a match (``module`` is None for functions); ``note``
    says how, for the README."""
    kind: str
    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()
    when: Callable | None = None
    note: str = ""


#: the kinds, tried in this order
OPS = (
    Op("conv", modules=(nn.Conv2d,)),
    Op("bn", modules=(nn.BatchNorm2d,)),
    Op("linear", modules=(nn.Linear,)),
    Op("relu6", modules=(nn.ReLU6, nn.Hardtanh), functions=(F.relu6, F.hardtanh), when=_is_relu6,
       note="Hardtanh only as Hardtanh(0, 6)"),
    Op("hardtanh", modules=(nn.Hardtanh,), functions=(F.hardtanh,)),
    Op("relu", modules=(nn.ReLU,), functions=(F.relu, torch.relu, torch.relu_),
       methods=("relu", "relu_")),
    Op("maxpool", modules=(nn.MaxPool2d,), functions=(F.max_pool2d,)),
    Op("avgpool", modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,)),
    Op("adaptive", modules=(nn.AdaptiveAvgPool2d,), functions=(F.adaptive_avg_pool2d,)),
    Op("add", functions=(operator.add, operator.iadd, torch.add), methods=("add", "add_")),
    Op("cat", functions=(torch.cat, torch.concat)),
    Op("flatten", modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",)),
    Op("shape", functions=(torch.reshape, operator.getitem, getattr),
       methods=("view", "reshape", "size", "contiguous")),
    Op("alias", modules=(nn.Identity, nn.Dropout), functions=(F.dropout,)),
)

_NAMED = {operator.add: "a + b", operator.iadd: "a += b", operator.getitem: "x[i]",
          getattr: "x.shape"}


def spellings(kind: str) -> list[str]:
    """How PyTorch code writes ``kind``: ``["ReLU", "F.relu", "torch.relu", ..., "x.relu()"]``."""
    op = next(o for o in OPS if o.kind == kind)
    functions = [_NAMED.get(f) or ("F." if "functional" in f.__module__ or f.__module__ ==
                                   "torch._C._nn" else "torch.") + f.__name__
                 for f in op.functions]
    return [m.__name__ for m in op.modules] + functions + [f"x.{m}()" for m in op.methods]


def op_kind(node: torch.fx.Node, modules: dict) -> str | None:
    """The kind of ``node`` (a row of :data:`OPS`), or None when no row has it."""
    module = modules[node.target] if node.op == "call_module" else None
    for op in OPS:
        if node.op == "call_module":
            hit = isinstance(module, op.modules)
        elif node.op == "call_function":
            hit = any(node.target is f for f in op.functions)
        else:
            hit = node.op == "call_method" and node.target in op.methods
        if hit and (op.when is None or op.when(node, module)):
            return op.kind
    return None


# --- the builders: a matched chain -> a quantized layer and its arguments, or a Step -------------

@dataclass
class Match:
    """A chain of nodes ``row`` matched: ``nodes[0]`` is the root, ``out`` the last node (whose
    name the layer's output takes); ``ctx`` holds the conversion's settings and ``ref``."""
    nodes: tuple
    ctx: object
    row: object = None

    @property
    def root(self) -> torch.fx.Node:
        return self.nodes[0]

    @property
    def out(self) -> torch.fx.Node:
        return self.nodes[-1]

    @property
    def module(self):
        return self.ctx.modules[self.root.target] if self.root.op == "call_module" else None

    def first_input(self) -> tuple:
        return (self.ctx.ref(next(a for a in self.root.args if isinstance(a, torch.fx.Node))),)


def _weighted(cls, relu=False, relu6=False, bn=False):
    def build(m: Match):
        c = m.ctx
        args = (m.ctx.modules[m.nodes[1].target],) if bn else ()
        layer = cls(m.module, *args, m.root is c.first_owner, True, relu=relu, **c.layer_kw)
        layer.relu6 = relu6
        return layer, m.first_input()
    return build


def _clamp(cls):
    def build(m: Match):
        return cls(m.ctx.num_bits), m.first_input()
    return build


def _hardtanh(m: Match):
    low, high = _hardtanh_range(m.root, m.module)
    return QHardtanh(low, high, m.ctx.num_bits), m.first_input()


def pool_args(node: torch.fx.Node, module, kind: str) -> dict:
    """The pooling settings of a module or a functional call, as keywords."""
    if kind == "adaptive":
        return dict(output_size=module.output_size if module is not None
                    else arg(node, 1, "output_size"))
    if module is not None:
        d = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                 ceil_mode=module.ceil_mode)
        extra = ("dilation", "return_indices") if kind == "maxpool" else \
            ("count_include_pad", "divisor_override")
        return d | {k: getattr(module, k) for k in extra}
    k = arg(node, 1, "kernel_size")
    d = dict(kernel_size=k, stride=arg(node, 2, "stride") or k, padding=arg(node, 3, "padding", 0))
    names = ("dilation", "ceil_mode", "return_indices") if kind == "maxpool" else \
        ("ceil_mode", "count_include_pad", "divisor_override")
    defaults = {"dilation": 1, "ceil_mode": False, "return_indices": False,
                "count_include_pad": True, "divisor_override": None}
    return d | {n: arg(node, 4 + i, n, defaults[n]) for i, n in enumerate(names)}


def _maxpool(m: Match):
    p = pool_args(m.root, m.module, "maxpool")
    if p["dilation"] not in (1, (1, 1)) or p["ceil_mode"] or p["return_indices"]:
        raise Refused("max-pooling with dilation, ceil_mode or return_indices")
    try:
        return QMaxPool2d(p["kernel_size"], p["stride"], p["padding"], m.ctx.num_bits), \
            m.first_input()
    except (TypeError, ValueError) as e:   # e.g. a non-square window
        raise Refused(str(e)) from e


def _avgpool(m: Match):
    p = pool_args(m.root, m.module, "avgpool")
    if p["divisor_override"] is not None:
        raise Refused("avg-pooling with divisor_override")
    return QAvgPool2d(p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                      p["count_include_pad"], num_bits=m.ctx.num_bits), m.first_input()


def _adaptive(m: Match):
    p = pool_args(m.root, m.module, "adaptive")
    return QAvgPool2d(output_size=p["output_size"], num_bits=m.ctx.num_bits), m.first_input()


def _add(relu: bool):
    def build(m: Match):
        tensors = [a for a in m.root.args if isinstance(a, torch.fx.Node)]
        if len(tensors) != 2 or len(m.root.args) != 2 or m.root.kwargs.get("alpha", 1) != 1:
            raise Refused("only the sum of two tensors is supported (no constants, no alpha)")
        layer = QAdd(m.ctx.num_bits, relu=relu, averaging_constant=m.ctx.averaging_constant)
        return layer, tuple(m.ctx.ref(a) for a in tensors)
    return build


def _cat(m: Match):
    tensors, dim = arg(m.root, 0, "tensors"), arg(m.root, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or dim == 0 or not all(
            isinstance(t, torch.fx.Node) for t in tensors):
        raise Refused("torch.cat needs a list of tensors and dim != 0 (the batch)")
    layer = QCat(len(tensors), dim, m.ctx.num_bits, m.ctx.averaging_constant)
    return layer, tuple(m.ctx.ref(t) for t in tensors)


def _flatten(m: Match):
    module = m.module
    start, end = (module.start_dim, module.end_dim) if module is not None else \
        (arg(m.root, 1, "start_dim", 0), arg(m.root, 2, "end_dim", -1))
    if start == 0:
        raise Refused("flattening the batch dimension (start_dim=0)")
    if (start, end) == (1, -1):
        return QFlatten(m.ctx.num_bits), m.first_input()
    return Step(m.root.name, "shape", fn=torch.flatten, args=(m.first_input()[0], start, end))


def _shape(m: Match):
    node = m.root
    fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    return Step(node.name, "shape", fn=fn, args=m.ctx.ref(node.args),
                kwargs=m.ctx.ref(node.kwargs))


def _alias(m: Match):
    return Step(m.root.name, "alias", args=(m.ctx.ref(m.root.args[0]),))


@dataclass(frozen=True)
class Pattern:
    """A row: the chain of kinds it matches, the layer it becomes, and the function that builds
    it from a :class:`Match` (returning ``(layer, args)`` or a graph ``Step``)."""
    chain: tuple
    becomes: str
    build: Callable


#: what converts to what, tried in this order (the longest chain at a node first)
PATTERNS = (
    Pattern(("conv", "bn", "relu"), "QConvBNReLU (BN folded, ReLU the output clamp)",
            _weighted(QConvBNReLU, relu=True, bn=True)),
    Pattern(("conv", "bn", "relu6"), "QConvBNReLU (BN folded, clamp at 6)",
            _weighted(QConvBNReLU, relu=True, relu6=True, bn=True)),
    Pattern(("conv", "bn"), "QConvBNReLU (BN folded)", _weighted(QConvBNReLU, bn=True)),
    Pattern(("conv", "relu"), "QConv2d (ReLU the output clamp)", _weighted(QConv2d, relu=True)),
    Pattern(("conv", "relu6"), "QConv2d (clamp at 6)", _weighted(QConv2d, relu=True, relu6=True)),
    Pattern(("conv",), "QConv2d", _weighted(QConv2d)),
    Pattern(("linear", "relu"), "QLinear (ReLU the output clamp)", _weighted(QLinear, relu=True)),
    Pattern(("linear",), "QLinear", _weighted(QLinear)),
    Pattern(("maxpool",), "QMaxPool2d (fused into the conv before it when unpadded)", _maxpool),
    Pattern(("avgpool",), "QAvgPool2d", _avgpool),
    Pattern(("adaptive",), "QAvgPool2d (adaptive)", _adaptive),
    Pattern(("relu",), "QReLU", _clamp(QReLU)),
    Pattern(("relu6",), "QReLU6", _clamp(QReLU6)),
    Pattern(("hardtanh",), "QHardtanh", _hardtanh),
    Pattern(("add", "relu"), "QAdd (ReLU the output clamp)", _add(relu=True)),
    Pattern(("add",), "QAdd", _add(relu=False)),
    Pattern(("cat",), "QCat", _cat),
    Pattern(("flatten",), "QFlatten (a shape step unless start_dim=1, end_dim=-1)", _flatten),
    Pattern(("shape",), "a shape step (same function on integers)", _shape),
    Pattern(("alias",), "a pass-through", _alias),
)

#: kinds that only appear inside a chain, and why alone they are refused
ONLY_IN_A_CHAIN = {"bn": "a BatchNorm2d is only supported right after a Conv2d whose only user "
                         "it is (it is folded into the conv)"}


def supported() -> str:
    """One line for error messages: each root kind with its optional fused followers."""
    parts = []
    for root in dict.fromkeys(row.chain[0] for row in PATTERNS):
        chains = [r.chain[1:] for r in PATTERNS if r.chain[0] == root]
        followers = []          # groups of kinds that never meet in one chain: (+BN) (+ReLU/ReLU6)
        for kind in dict.fromkeys(k for c in chains for k in c):
            group = next((g for g in followers if not any(kind in c and set(g) & set(c)
                                                          for c in chains)), None)
            if group is None:
                followers.append(group := [])
            group.append(kind)
        parts.append(" / ".join(spellings(root)) + "".join(
            " (+" + "/".join(spellings(k)[0] for k in kinds) + ")" for kinds in followers))
    return ", ".join(parts)


def markdown() -> str:
    """The README's table of supported patterns."""
    notes = {o.kind: f" ({o.note})" if o.note else "" for o in OPS}
    rows = ["| pattern | PyTorch spellings | becomes |", "|---|---|---|"]
    for row in PATTERNS:
        written = "; ".join(", ".join(spellings(k)) + notes[k] for k in row.chain)
        rows.append(f"| {' + '.join(row.chain)} | {written} | {row.becomes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
