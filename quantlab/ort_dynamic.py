"""TinyGPT through ONNX Runtime's dynamic quantization, compared with quantlab's simulation.

The route: :func:`export_gpt` writes the float model to ONNX (PyTorch's TorchScript exporter,
opset 17, dynamic batch and length; every Linear becomes ``MatMul`` + ``Add`` and the tied head a
``MatMul`` with a constant ``tok.weight.T``); :func:`quantize_onnx` runs
``onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)``, which turns the 17 MatMuls into
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` and the two embedding ``Gather`` s into
uint8 tables with a ``DequantizeLinear``; :func:`session` opens it in ONNX Runtime (one thread).
:func:`quantlab.w8a8.ort_dynamic_gpt` is the same arithmetic in quantlab.

Where the two differ and why: :func:`linear_check` feeds ONNX Runtime's own inputs of every
quantized MatMul (and its embedding rows) to quantlab's and counts the outputs that are not
bit-identical; :func:`code_flips` compares, layer by layer, the uint8 codes both compute in a
whole-model run (their inputs differ where the float kernels between the MatMuls, LayerNorm,
GELU, softmax attention, round differently); :func:`compare` gives the logits' differences and
both perplexities. ONNX files belong in a temporary directory. Taught in notebook ``k``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_bool, check_int, check_int_tensor
from .w8a8 import DynamicQuantLinear, dynamic_quantize_linear, ort_dynamic_gpt

__all__ = ["Comparison", "Flips", "code_flips", "compare", "export_gpt", "fusion_effects",
           "linear_check", "linear_io", "onnx_weights", "quantize_onnx", "run", "run_op", "session"]

OPSET = 17


def export_gpt(model: nn.Module, path: str | os.PathLike, opset: int = OPSET) -> str:
    """Write ``model`` (a TinyGPT, float) as ONNX: input ``idx`` (batch, time) int64, output
    ``logits`` (batch, time, vocab); batch and time are dynamic. Uses PyTorch's TorchScript
    exporter (``dynamo=False``: the dynamo exporter needs ``onnxscript``); its deprecation and
    tracer warnings are silenced. Returns ``path`` as a string."""
    if not isinstance(model, nn.Module) or not hasattr(model, "context"):
        raise TypeError(f"model must be a quantlab.models.TinyGPT; got {type(model).__name__}")
    opset = check_int(opset, "opset", 17)
    idx = torch.zeros(1, min(8, model.context), dtype=torch.long)
    axes = {"idx": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (idx,), os.fspath(path), dynamo=False,
                          opset_version=opset, input_names=["idx"], output_names=["logits"],
                          dynamic_axes=axes)
    return os.fspath(path)


def quantize_onnx(float_path, path, per_channel: bool = False, quantize_tables: bool = True) -> str:
    """``onnxruntime.quantization.quantize_dynamic(float_path, path, weight_type=QInt8,
    per_channel=per_channel)`` (reduce_range False), without its advice to pre-process the model
    on the root logger. By default it also stores the embedding tables (``Gather`` of a constant)
    as uint8; ``quantize_tables=False`` passes ``op_types_to_quantize=["MatMul"]`` (tables stay
    float). Returns ``path`` as a string."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    per_channel = check_bool(per_channel, "per_channel")
    ops = None if check_bool(quantize_tables, "quantize_tables") else ["MatMul"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(os.fspath(float_path), os.fspath(path), per_channel=per_channel,
                         weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    finally:
        root.setLevel(level)
    return os.fspath(path)


def session(path, optimize: bool = True, extra_outputs=(), disabled=()):
    """An ONNX Runtime CPU session on one thread. ``optimize=False`` sets
    ``graph_optimization_level = ORT_DISABLE_ALL`` (no fusion: every node runs as written);
    ``extra_outputs``: names of intermediate tensors to return too (the graph is edited in memory);
    ``disabled``: names of graph optimizers to skip (e.g. ``"GeluFusionL2"``,
    ``"SkipLayerNormFusion"``)."""
    import onnx
    import onnxruntime as ort
    optimize = check_bool(optimize, "optimize")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    model = onnx.load(os.fspath(path))
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                     None))
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def run_op(op_type: str, *inputs, outputs: int = 1, opset: int = OPSET):
    """Run one ONNX operator in ONNX Runtime (a one-node graph): ``run_op("DynamicQuantizeLinear",
    x, outputs=3)``, ``run_op("MatMulInteger", a, b, a_zero_point, b_zero_point)``. Inputs are
    NumPy arrays (or tensors) whose dtypes are the graph's input types; returns the outputs as
    NumPy arrays (a list when ``outputs > 1``). Sessions are cached by operator and dtypes."""
    if not isinstance(op_type, str):
        raise TypeError(f"op_type must be an ONNX operator name (str); got {op_type!r}")
    outputs, opset = check_int(outputs, "outputs", 1), check_int(opset, "opset", 13)
    arrays = [np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a) for a in inputs]
    sess = _op_session(op_type, tuple(a.dtype.str for a in arrays), outputs, opset)
    result = sess.run(None, {f"in{i}": a for i, a in enumerate(arrays)})
    return result if outputs > 1 else result[0]


@functools.lru_cache(maxsize=32)
def _op_session(op_type: str, dtypes: tuple, outputs: int, opset: int):
    import onnxruntime as ort
    from onnx import helper
    names = [f"in{i}" for i in range(len(dtypes))]
    graph = helper.make_graph(
        [helper.make_node(op_type, names, [f"out{i}" for i in range(outputs)])], op_type,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), None)
         for n, d in zip(names, dtypes)],
        [helper.make_empty_tensor_value_info(f"out{i}") for i in range(outputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run(sess, idx: torch.Tensor) -> torch.Tensor:
    """The logits (batch, time, vocab) float32 of an ONNX Runtime session for ``idx`` (int64)."""
    check_int_tensor(idx, "idx")
    if idx.dim() != 2:
        raise ValueError(f"idx must be (batch, time); got shape {tuple(idx.shape)}")
    return torch.from_numpy(sess.run(["logits"], {"idx": idx.to(torch.int64).numpy()})[0])


def _module_name(node_name: str) -> str:
    """``/blocks.0/qkv/MatMul_quant`` -> ``blocks.0.qkv``; the head's ``/MatMul_quant`` -> head."""
    name = node_name.strip("/").rsplit("/", 1)[0] if "/" in node_name.strip("/") else ""
    return name.replace("/", ".") or "head"


def _graph_maps(graph):
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def linear_io(path) -> dict:
    """For every ``MatMulInteger`` of a ``quantize_dynamic`` model: the names of its float input
    (before ``DynamicQuantizeLinear``) and of its float output (after the scale ``Mul`` and the
    bias ``Add``), keyed by the module name (``blocks.0.qkv``, ..., ``head``); and for the two
    embedding tables (``tok``, ``pos``) the output of their ``DequantizeLinear``."""
    import onnx
    graph = onnx.load(os.fspath(path)).graph
    producer, consumers = _graph_maps(graph)
    inits = {i.name for i in graph.initializer}
    io = {}
    for node in graph.node:
        if node.op_type == "MatMulInteger":
            x = producer[node.input[0]].input[0]
            cast = consumers[node.output[0]][0]
            out = consumers[cast.output[0]][0].output[0]
            nxt = consumers.get(out, [])
            if len(nxt) == 1 and nxt[0].op_type == "Add" and set(nxt[0].input) & inits:
                out = nxt[0].output[0]
            io[_module_name(node.name)] = (x, out)
        elif node.op_type == "DequantizeLinear":
            gather = producer[node.input[0]]
            io[_module_name(gather.name)] = (None, node.output[0])
    return io


def onnx_weights(path) -> dict:
    """The int8 weights and scales ``quantize_dynamic`` stored, keyed like :func:`linear_io`:
    ``name -> (q_w, scale)`` with ``q_w`` int32 (out, in) (the transposed ONNX ``B``)."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(os.fspath(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type == "MatMulInteger":
            base = node.input[1].removesuffix("_quantized")
            q = torch.from_numpy(inits[node.input[1]].astype(np.int32)).T.contiguous()
            out[_module_name(node.name)] = (q, torch.from_numpy(np.asarray(inits[base + "_scale"])))
    return out


def _sim_linears(model: nn.Module, per_channel: bool) -> dict:
    """quantlab's DynamicQuantLinear of every quantized MatMul, keyed like :func:`linear_io`."""
    sim = {name: DynamicQuantLinear(m, per_channel) for name, m in model.named_modules()
           if isinstance(m, nn.Linear)}
    head = nn.Linear(*model.tok.weight.shape[::-1], bias=False)
    head.weight.data = model.tok.weight.detach().clone()
    sim["head"] = DynamicQuantLinear(head, per_channel)
    return sim


def linear_check(model: nn.Module, path, idx: torch.Tensor, per_channel: bool) -> dict:
    """Each quantized MatMul (and embedding) of the ONNX model at ``path`` in isolation: ONNX
    Runtime's own float input (unoptimized session) fed to quantlab's :class:`DynamicQuantLinear`.

    Returns ``name -> (differing, total)``: how many outputs are not bit-identical with ONNX
    Runtime's, of how many. ``tok``/``pos``: quantlab's dequantized rows against ONNX Runtime's.
    """
    per_channel = check_bool(per_channel, "per_channel")
    io = linear_io(path)
    names = [n for pair in io.values() for n in pair if n is not None]
    sess = session(path, optimize=False, extra_outputs=names)
    values = dict(zip(names, sess.run(names, {"idx": idx.numpy()})))
    sim, tables = _sim_linears(model, per_channel), ort_dynamic_gpt(model, per_channel)
    result = {}
    for name, (x, y) in io.items():
        y_ort = torch.from_numpy(values[y])
        with torch.no_grad():
            if x is None:
                rows = idx if name == "tok" else torch.arange(idx.shape[1])
                y_sim = getattr(tables, name)(rows)
            else:
                y_sim = sim[name](torch.from_numpy(values[x]))
        result[name] = (int((y_sim != y_ort).sum()), y_ort.numel())
    return result


class Flips(NamedTuple):
    """One quantized MatMul's input in a whole-model run, ONNX Runtime against quantlab."""
    flips: int              # integers q_x - Z_x (what MatMulInteger multiplies) that differ
    total: int              # codes
    same_scale: bool        # the two per-tensor scales are equal
    same_zero_point: bool   # the two zero points are equal
    max_abs_input_diff: float  # max |x_ort - x_sim| of the float inputs


def code_flips(model: nn.Module, path, idx: torch.Tensor, per_channel: bool) -> dict:
    """In one whole-model run (ONNX Runtime unoptimized), the input of every quantized MatMul as
    ONNX Runtime and quantlab's simulation compute it, and the uint8 codes
    :func:`~quantlab.w8a8.dynamic_quantize_linear` makes of each: ``name -> Flips``. A flip is an
    integer ``q_x - Z_x`` that differs (a zero point one higher with every code one higher is no
    flip: MatMulInteger multiplies the same integers)."""
    per_channel = check_bool(per_channel, "per_channel")
    everything = linear_io(path)
    io = {k: v for k, v in everything.items() if v[0] is not None}
    names = [x for x, _ in io.values()]
    sess = session(path, optimize=False, extra_outputs=names)
    ort_in = dict(zip(io, sess.run(names, {"idx": idx.numpy()})))
    sim = ort_dynamic_gpt(model, per_channel, quantize_tables="tok" in everything)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
             for name, m in sim.named_modules() if name in io]
    with torch.no_grad():
        sim(idx)
    for h in hooks:
        h.remove()
    result = {}
    for name in io:
        x_ort = torch.from_numpy(ort_in[name])
        q_o, s_o, z_o = dynamic_quantize_linear(x_ort)
        q_s, s_s, z_s = dynamic_quantize_linear(seen[name])
        result[name] = Flips(int((q_o - z_o != q_s - z_s).sum()), q_o.numel(), bool(s_o == s_s),
                             bool(z_o == z_s), (x_ort - seen[name]).abs().max().item())
    return result


def fusion_effects(path, idx: torch.Tensor) -> dict:
    """How ONNX Runtime's graph optimizations change the logits of the model at ``path``: max
    |logits - logits unoptimized| with every optimization, then without the GELU fusion
    (``GeluFusionL2``: Div, Erf, Add, Mul, Mul -> one ``Gelu``), then without it and the
    ``SkipLayerNormFusion`` (Add + LayerNormalization -> ``SkipLayerNormalization``); the
    remaining fusions (``DynamicQuantizeMatMul`` among them) stay on."""
    base = run(session(path, optimize=False), idx)
    cases = {"all": (), "all but GeluFusionL2": ("GeluFusionL2",),
             "all but GeluFusionL2, SkipLayerNormFusion": ("GeluFusionL2", "SkipLayerNormFusion")}
    return {k: (run(session(path, disabled=v), idx) - base).abs().max().item()
            for k, v in cases.items()}


@dataclass
class Comparison:
    """ONNX Runtime's dynamic-quantized TinyGPT against quantlab's simulation, and both float
    models, on the same windows scored in the same batches."""
    per_channel: bool
    optimize: bool
    windows: int
    batch_size: int
    max_abs_diff: float        # max |logits_ort - logits_sim|
    argmax_differ: int         # positions whose top character differs, ORT against quantlab
    positions: int
    ppl_ort: float             # ONNX Runtime, dynamic int8
    ppl_sim: float             # quantlab's simulation of it
    ppl_float: float           # torch, float32
    ppl_ort_float: float       # ONNX Runtime, float32 (the exported model)
    max_abs_diff_float: float  # max |logits_ort_float - logits_float|
    seconds: dict              # time spent in each of the four models


def compare(model: nn.Module, ids: torch.Tensor, folder, per_channel: bool = False,
            optimize: bool = True, windows: int | None = None, batch_size: int = 1,
            quantize_tables: bool = True) -> Comparison:
    """Export ``model`` into ``folder``, quantize it dynamically, and score four models on the
    non-overlapping windows of ``ids`` (the first ``windows``, or all): ONNX Runtime int8, quantlab's
    simulation (:func:`~quantlab.w8a8.ort_dynamic_gpt`), torch float and ONNX Runtime float.
    ``batch_size`` windows per call: the per-tensor activation scales span the whole batch (1: one
    scale per sequence and layer). ``quantize_tables``: as :func:`quantize_onnx`. Perplexities as
    :func:`quantlab.training.perplexity` (NLL summed in float64)."""
    from .text import windows as make_windows
    per_channel, optimize = check_bool(per_channel, "per_channel"), check_bool(optimize, "optimize")
    batch_size = check_int(batch_size, "batch_size", 1)
    w = make_windows(ids, model.context)
    w = w[:check_int(windows, "windows", 1)] if windows is not None else w
    folder = os.fspath(folder)
    f_path = export_gpt(model, os.path.join(folder, "tinygpt.onnx"))
    q_path = quantize_onnx(f_path, os.path.join(folder, f"tinygpt_dynamic_pc{int(per_channel)}.onnx"),
                           per_channel, quantize_tables)
    sess, f_sess = session(q_path, optimize), session(f_path, optimize)
    engines = {"ort": lambda x: run(sess, x),
               "sim": ort_dynamic_gpt(model, per_channel, quantize_tables),
               "float": model.eval(), "ort_float": lambda x: run(f_sess, x)}
    nll, seconds = dict.fromkeys(engines, 0.0), dict.fromkeys(engines, 0.0)
    diff = diff_float = 0.0
    differ = 0
    for batch in w.split(batch_size):
        idx, target = batch[:, :-1], batch[:, 1:].reshape(-1)
        y = {}
        for name, engine in engines.items():
            start = time.perf_counter()
            with torch.no_grad():
                y[name] = engine(idx)
            seconds[name] += time.perf_counter() - start
            nll[name] += F.cross_entropy(y[name].reshape(len(target), -1), target,
                                         reduction="none").double().sum().item()
        diff = max(diff, (y["ort"] - y["sim"]).abs().max().item())
        diff_float = max(diff_float, (y["ort_float"] - y["float"]).abs().max().item())
        differ += int((y["ort"].argmax(-1) != y["sim"].argmax(-1)).sum())
    n = w.shape[0] * (w.shape[1] - 1)
    ppl = {k: math.exp(v / n) for k, v in nll.items()}
    return Comparison(per_channel, optimize, w.shape[0], batch_size, diff, differ, n, ppl["ort"],
                      ppl["sim"], ppl["float"], ppl["ort_float"], diff_float, seconds)
