"""Benchmark: the shipped TinyGPT through ONNX Runtime's dynamic quantization against quantlab's
simulation of the same arithmetic (lesson k, issue 27).

ONNX Runtime: the float model exported by PyTorch's TorchScript exporter (opset 17), then
``quantize_dynamic(weight_type=QInt8, per_channel=False/True)``: every MatMul with a constant
weight (16 Linears and the tied head) runs as DynamicQuantizeLinear (one uint8 scale for the
whole input) -> MatMulInteger -> Cast -> Mul (-> Add bias), and the two embedding tables are
stored as uint8 (tables "float": ``op_types_to_quantize=["MatMul"]``, MatMuls only). quantlab:
``w8a8.ort_dynamic_gpt``, the same arithmetic with torch's LayerNorm,
GELU and attention. Scored on the 363 non-overlapping 128-character val windows (46,464
characters), one window per call (one activation scale per sequence and layer) unless said.
Printed: (1) each quantized MatMul alone, fed ONNX Runtime's own input: outputs not bit-identical;
(2) logits and perplexities of the four models; (3) where the whole-model runs part: the integers
q_x - Z_x that differ at each MatMul's input; (4) what ONNX Runtime's graph fusions change;
(5) how a window's logits depend on its batch-mates (per-tensor scales span the batch).
Exit status: 1 when a quantized MatMul is not bit-exact on a CPU where ONNX Runtime's u8 x s8
kernel is exact (VNNI), or when the perplexities of ONNX Runtime and quantlab differ by more than
0.5%; else 0. Usage: OMP_NUM_THREADS=1 python benchmarks/bench_w8a8.py
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

import torch

from quantlab import ort_dynamic as od
from quantlab.text import load_corpus, windows
from quantlab.training import perplexity, pretrained_tinygpt
from quantlab.w8a8 import int8_linears, ort_dynamic_gpt

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
U8S8_EXACT = not X86 or bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def isolation(model, paths, idx) -> bool:
    print("\n(1) each quantized MatMul alone, fed ONNX Runtime's input (4 windows): outputs that "
          "differ")
    exact = True
    for pc, path in paths.items():
        result = od.linear_check(model, path, idx, pc)
        bad = {k: v for k, v in result.items() if v[0]}
        total = sum(t for _, t in result.values())
        print(f"  per_channel={pc}: {len(result) - len(bad)} of {len(result)} bit-exact "
              f"({sum(d for d, _ in result.values())} of {total:,} outputs differ) {bad or ''}")
        exact &= not bad
    return exact


def whole_model(model, ids, folder) -> list:
    print("\n(2) logits and perplexity on 363 val windows (ORT = ONNX Runtime, sim = quantlab)")
    print(f"  {'weights':<12}{'tables':<7}{'ORT graph':<11}{'batch':>6}{'max|dlogit|':>13}"
          f"{'argmax differ':>15}{'ppl ORT':>9}{'ppl sim':>9}{'ppl float':>10}{'ORT float':>10}"
          f"{'float max|d|':>13}"
          f"{'ms/window ORT int8, ORT fp32, sim, torch':>42}")
    rows = []
    for pc, opt, batch, tables in [(False, False, 1, True), (False, True, 1, True),
                                   (True, False, 1, True), (True, True, 1, True),
                                   (True, True, 64, True), (False, True, 1, False),
                                   (True, True, 1, False)]:
        c = od.compare(model, ids, folder, per_channel=pc, optimize=opt, batch_size=batch,
                       quantize_tables=tables)
        ms = [1000 * c.seconds[k] / c.windows for k in ("ort", "ort_float", "sim", "float")]
        print(f"  {'per channel' if pc else 'per tensor':<12}{'uint8' if tables else 'float':<7}"
              f"{'optimized' if opt else 'unfused':<11}"
              f"{batch:>6}{c.max_abs_diff:>13.4f}{c.argmax_differ:>8} / {c.positions:<6,}"
              f"{c.ppl_ort:>8.4f}{c.ppl_sim:>9.4f}{c.ppl_float:>10.4f}{c.ppl_ort_float:>10.4f}"
              f"{c.max_abs_diff_float:>13.2e}      " + ", ".join(f"{m:.1f}" for m in ms))
        rows.append(c)
    per_token = perplexity(int8_linears(model), ids, batch_size=64).ppl
    print(f"  for comparison: quantlab's per-token W8A8 (int8 per token x int8 per channel, "
          f"embeddings and head float): ppl {per_token:.4f}")
    return rows


def flips(model, paths, idx):
    print("\n(3) one whole-model run (4 windows in one batch, ORT unfused): at each MatMul's input, "
          "integers q_x - Z_x that differ (same scale? same zero point?), max |x_ORT - x_sim|")
    for pc, path in paths.items():
        print(f"  per_channel={pc}")
        for name, f in od.code_flips(model, path, idx, pc).items():
            print(f"    {name:<14}{f.flips:>7,} of {f.total:>7,}  scale {'=' if f.same_scale else '!='}"
                  f"  zero point {'=' if f.same_zero_point else '!='}  {f.max_abs_input_diff:.2e}")


def fusions(paths, idx):
    print("\n(4) ONNX Runtime's graph optimizations: max |logits - logits of the unfused graph|")
    for pc, path in paths.items():
        effects = od.fusion_effects(path, idx)
        print(f"  per_channel={pc}: " + "; ".join(f"{k}: {v:.3g}" for k, v in effects.items()))


def batch_dependence(model, ids):
    w = windows(ids, model.context)[:16, :-1]
    print("\n(5) window 0 scored alone and in a batch of 16 (one scale per batch): max |dlogit|")
    for pc in (False, True):
        sim = ort_dynamic_gpt(model, pc)
        with torch.no_grad():
            d = (sim(w[:1])[0] - sim(w)[0]).abs().max().item()
        print(f"  per_channel={pc}: {d:.4f}")


def main() -> int:
    torch.manual_seed(0)
    start = time.time()
    model, ids = pretrained_tinygpt(), load_corpus().val
    idx = windows(ids, model.context)[:4, :-1]
    with tempfile.TemporaryDirectory() as folder:
        f_path = od.export_gpt(model, os.path.join(folder, "tinygpt.onnx"))
        paths = {pc: od.quantize_onnx(f_path, os.path.join(folder, f"q{int(pc)}.onnx"), pc)
                 for pc in (False, True)}
        exact = isolation(model, paths, idx)
        rows = whole_model(model, ids, folder)
        flips(model, paths, idx)
        fusions(paths, idx)
    batch_dependence(model, ids)
    close = all(abs(c.ppl_ort / c.ppl_sim - 1) < 0.005 for c in rows)
    print(f"\nbit-exact MatMuls: {exact} (u8 x s8 exact on this CPU: {U8S8_EXACT}); "
          f"ppl ORT within 0.5% of quantlab's: {close}; {time.time() - start:.0f} s")
    return 0 if (exact or not U8S8_EXACT) and close else 1


if __name__ == "__main__":
    sys.exit(main())
