"""The passes of :func:`quantlab.convert.quantize_model`, each a function of its own.

``trace`` (torch.fx, recording in-place ops) -> ``classify`` (each node's kind, :data:`OPS`) ->
``check_graph`` (one input, one tensor output, no unsupported op, no in-place op read later) ->
``match`` (fuse: the rows of :data:`quantlab.patterns.PATTERNS`, longest chain first) ->
``lower`` (each match -> a quantized layer or a graph step) -> ``fuse_conv_maxpool``.
Taught in notebook ``h_your_own_model``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from .graph import Step, _refs
from .modules import QConv2d, QConvBNReLU, QMaxPool2d
from .patterns import ONLY_IN_A_CHAIN, PATTERNS, Match, Pattern, Refused, op_kind, supported

#: the node ops that compute something (placeholder, get_attr and output do not)
CALLS = ("call_module", "call_function", "call_method")


class UnsupportedModelError(ValueError):
    """The model holds a node quantize_model cannot convert (the message names it)."""


def describe(node: torch.fx.Node, modules: dict) -> str:
    """``node 'conv1' (call_module Conv2d)``: how an error names a node."""
    if node.op == "call_module":
        return f"node '{node.name}' (call_module {type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node '{node.name}' ({node.op} {target})"


def unsupported(node, modules, why: str = "") -> UnsupportedModelError:
    """The error for a node: what it is, why it is refused, and what is supported."""
    why = f": {why}" if why else ""
    return UnsupportedModelError(f"quantize_model cannot convert {describe(node, modules)}{why}. "
                                 f"Supported: {supported()}.")


# --- trace -----------------------------------------------------------------------------------

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


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model's ``torch.fx`` graph, with in-place ops kept visible."""
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); quantize_model needs a model whose forward is a "
            "fixed graph of supported ops") from e


def classify(gm: torch.fx.GraphModule) -> dict:
    """``{node: kind}`` for every computing node (None for a kind no row of OPS has)."""
    modules = dict(gm.named_modules())
    return {n: op_kind(n, modules) for n in gm.graph.nodes if n.op in CALLS}


# --- check -----------------------------------------------------------------------------------

#: in-place functions: their first argument is changed
_IN_PLACE_FUNCTIONS = (torch.relu_, operator.iadd, operator.imul, operator.isub,
                       operator.itruediv)
#: ops that return a view of (or the same tensor as) their first argument
_ALIAS_KINDS = ("shape", "alias", "flatten")


def in_place_target(node: torch.fx.Node, modules: dict) -> torch.fx.Node | None:
    """The graph value ``node`` changes in place (``y.relu_()``, ``F.relu(y, inplace=True)``,
    ``x += y``, ``nn.ReLU(inplace=True)``), or None."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return first
    if node.op == "call_function":
        if any(node.target is f for f in _IN_PLACE_FUNCTIONS):
            return first
        return first if node.kwargs.get("inplace") is True else None
    if node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True:
        return first
    return None


def _views_of(target: torch.fx.Node, kinds: dict, skip: torch.fx.Node) -> set:
    """``target`` and every view that shares its storage (through shape and alias ops)."""
    group, todo = set(), [target]
    while todo:
        n = todo.pop()
        if n in group:
            continue
        group.add(n)
        if kinds.get(n) in _ALIAS_KINDS and n.args and isinstance(n.args[0], torch.fx.Node):
            todo.append(n.args[0])
        todo.extend(u for u in n.users if kinds.get(u) in _ALIAS_KINDS and u is not skip)
    return group


def check_in_place(nodes: list, kinds: dict, modules: dict) -> None:
    """Refuse an in-place op whose changed tensor is read after it, under any name.

    quantlab's integer graph computes every op out of place, which equals the float model only
    when nothing reads the changed tensor (or a view of it) after the in-place op: as in
    ``y = F.relu(y, inplace=True)`` or torchvision's ``out += identity; out = relu(out)``. With
    ``y.relu_()`` whose result is ignored, or ``identity = x; x += f(x); x + identity``, a later op
    reads the changed tensor, and the converted model would silently differ.
    """
    order = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        target = in_place_target(node, modules)
        if target is None:
            continue
        late = sorted((u for n in _views_of(target, kinds, node) for u in n.users
                       if u is not node and order[u] > order[node]), key=order.get)
        if late:
            raise unsupported(node, modules, f"it changes '{target.name}' in place and "
                              f"'{late[0].name}' reads it afterwards, which the converted graph "
                              "cannot follow; write it out of place (y = F.relu(y), x = x + y)")


def check_graph(gm: torch.fx.GraphModule, kinds: dict) -> None:
    """No in-place op whose tensor is read afterwards, one input, one tensor output, parameters
    only inside modules, and every op of a kind in OPS."""
    modules, nodes = dict(gm.named_modules()), list(gm.graph.nodes)
    check_in_place(nodes, kinds, modules)
    name = gm.__class__.__name__
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"quantize_model needs a model with one input; "
                                    f"{name}.forward takes {len(inputs)}")
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, torch.fx.Node):
        raise UnsupportedModelError("quantize_model needs a model that returns one tensor; "
                                    f"{name} returns {type(out).__name__}")
    for node in nodes:
        if node.op == "get_attr":
            raise unsupported(node, modules, "parameters used outside a Conv2d/Linear module")
        if node.op in CALLS and kinds[node] is None:
            raise unsupported(node, modules)


# --- match (fuse) ----------------------------------------------------------------------------

def _chain(node: torch.fx.Node, row: Pattern, kinds: dict) -> tuple | None:
    """The nodes of ``row`` starting at ``node``, each the only user of the one before and
    reading it as its first argument; None if the row does not match there."""
    chain = [node]
    for kind in row.chain[1:]:
        users = list(chain[-1].users)
        if len(users) != 1 or kinds.get(users[0]) != kind or not users[0].args or \
                users[0].args[0] is not chain[-1]:
            return None
        chain.append(users[0])
    return tuple(chain)


def match(gm: torch.fx.GraphModule, kinds: dict, ctx) -> list[Match]:
    """Cover the graph with rows of PATTERNS, in node order, the first row that matches at a
    node winning (the table lists the longest chains first)."""
    modules, matches, taken = dict(gm.named_modules()), [], set()
    for node in gm.graph.nodes:
        if node.op not in CALLS or node in taken:
            continue
        rows = (r for r in PATTERNS if r.chain[0] == kinds[node])
        found = next(((r, c) for r in rows if (c := _chain(node, r, kinds)) is not None), None)
        if found is None:
            raise unsupported(node, modules, ONLY_IN_A_CHAIN.get(kinds[node], ""))
        taken.update(found[1])
        matches.append(Match(found[1], ctx, found[0]))
    return matches


# --- lower (map) -----------------------------------------------------------------------------

@dataclass
class Context:
    """What the builders of PATTERNS need: the settings shared by every layer, the model's
    modules, the weighted layer that quantizes the model's input (or None), and the names."""
    modules: dict
    num_bits: int
    averaging_constant: float | None
    layer_kw: dict
    first_owner: torch.fx.Node | None = None
    names: dict = field(default_factory=dict)   # fx node name -> graph value name

    def ref(self, a):
        """fx arguments -> plain data, each graph value as '%name'."""
        if isinstance(a, torch.fx.Node):
            return "%" + self.names.get(a.name, a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(self.ref(v) for v in a)
        if isinstance(a, dict):
            return {k: self.ref(v) for k, v in a.items()}
        return a


def lower(matches: list[Match], ctx: Context, layers: list, steps: list) -> None:
    """Append each match's quantized layer (and its step) or graph step to ``layers``/``steps``;
    every node of a chain takes the name of its last node."""
    for m in matches:
        for node in m.nodes:
            ctx.names.setdefault(node.name, m.out.name)
    for m in matches:
        try:
            built = m.row.build(m)
        except Refused as e:
            raise unsupported(m.root, ctx.modules, str(e)) from e
        if isinstance(built, Step):
            steps.append(built)
            continue
        layer, args = built
        layers.append(layer)
        steps.append(Step(m.out.name, "layer", len(layers) - 1, args=args))


def fuse_conv_maxpool(layers: list, steps: list, output_name: str) -> None:
    """Mark a conv whose only user is an unpadded max-pool: integer inference then pools its
    accumulators (the same integers, as the max commutes with requantization)."""
    by_name = {s.name: s for s in steps}
    for s in steps:
        layer = layers[s.index] if s.kind == "layer" else None
        if not isinstance(layer, QMaxPool2d) or layer.padding not in (0, (0, 0)):
            continue
        src = by_name.get(_refs(s.args)[0])
        users = [t for t in steps if _refs(s.args)[0] in _refs(t.args)]
        if src is not None and src.kind == "layer" and len(users) == 1 and \
                isinstance(layers[src.index], (QConv2d, QConvBNReLU)) and src.name != output_name:
            src.pool_of = s.name

