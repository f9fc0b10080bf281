"""Benchmark: weight-only quantization of the shipped TinyGPT (lessons i and j), against issue 26.

Perplexity per character on the 363 non-overlapping 128-character windows of the val split (46,464
characters). Calibration (GPTQ, AWQ): 128 random 128-character sequences of the train split
(generator seed 1234), never the val split. Every Linear is quantized (asymmetric unless said:
integer zero point), embeddings, LayerNorms and the tied head stay float. Recovery = (ppl_RTN -
ppl) / (ppl_RTN - ppl_float), and each method's per-chunk NLL difference with RTN over the 8
contiguous chunks of val windows is printed (mean +- sd, chunks better, and the sign test's p-value:
McNemar's exact test on the chunks, quantlab.stats.mcnemar_p_value, as lessons i and j print it).

Targets (issue 26): float <= 3.70, trained in <= 5 min; W8 per channel <= +0.5%; RTN 4-bit g32 or
g128 <= +3%; GPTQ recovers >= 70% at 3 bits g128, >= 75% at 2 bits g128, 2-bit ppl <= 1.2x float,
<= 60 s per model; AWQ on planted outliers (3 channels x16) recovers >= 45% at 3 bits g128, >= 70%
at 4 bits; AWQ on the trained model never worse than RTN by more than 1%.
Issue 27 (lesson l): FP8 E4M3 weights <= +1%; NF4 (blocks of 64) <= +2% and better than symmetric int4
in the same blocks on each of the 8 chunks; MXFP4 <= +4%. Issue 27 (lesson k): W8A8 (symmetric per-channel
weights, symmetric activations) per token within +0.5%, per tensor static (calibrated) within +1%; with
planted outliers, SmoothQuant (alpha 0.5) recovers >= 50% of what they cost W8A8 per tensor.
Issue 27 (lesson k, rotations): W4A4 = symmetric 4-bit weights per output channel (RTN) and symmetric
4-bit activations per token at the input of every Linear (quantlab.act_quant). The rotated float model
(quantlab.rotation.rotate_model) within 1e-5 relative ppl of float; a random Hadamard rotation of every
Linear input (the residual stream folded, proj and fc2 rotated online) cuts W4A4's ppl increase by >= 40%,
mean of the random signs of seeds 0, 1, 2. Informational: online rotations of the proj and fc2 inputs only
(LayerNorms and the stream untouched), same seeds.
The training time is informational: it is the wall time recorded when the shipped weights were
trained (on a shared machine), not something this run measures, so it is printed as [MISS] when over
5 min and does not fail the run. Exit status: 0 when every other target is met, 1 otherwise.
Usage: OMP_NUM_THREADS=1 python benchmarks/bench_llm.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

from quantlab.act_quant import quantize_activations, smooth_quant
from quantlab.awq import awq_model, plant_outliers
from quantlab.block_formats import block_fake_quantize
from quantlab.gptq import gptq_model
from quantlab.minifloat import scaled_round
from quantlab.rotation import online_rotate, rotate_model
from quantlab.stats import mcnemar_p_value
from quantlab.text import load_corpus, random_batch
from quantlab.training import perplexity, pretrained_tinygpt, tinygpt_info
from quantlab.weight_only import (
    fake_quantize_groups,
    linear_names,
    map_weights,
    model_bytes,
    quantize_linears,
)

CALIB_SEED, CALIB_SEQUENCES = 1234, 128


def calibration_batch(train: torch.Tensor) -> torch.Tensor:
    """The 128 calibration sequences (inputs only) of the train split, seed 1234."""
    x, _ = random_batch(train, CALIB_SEQUENCES, 128, torch.Generator().manual_seed(CALIB_SEED))
    return x


def paired(a, b) -> str:
    """a - b in mean NLL per chunk: mean +- sd, on how many chunks a is better, and the sign test."""
    d = a.chunk_nll - b.chunk_nll
    better, worse = int((d < 0).sum()), int((d > 0).sum())
    p = mcnemar_p_value(better, worse)
    return f"{d.mean().item():+.4f} +- {d.std().item():.4f} ({better}/{len(d)} better, p = {p:.3f})"


def report(checks) -> int:
    """Print each check as [PASS], [FAIL] or (informational, not met) [MISS]; return the exit status:
    1 when a check that is not informational fails, else 0."""
    for what, value, ok, *informational in checks:
        print(f"[{'PASS' if ok else 'MISS' if informational else 'FAIL'}] {what}: {value}"
              + (" (informational)" if informational else ""))
    return int(any(not ok and not informational for _, _, ok, *informational in checks))


def formats(model, score, checks, f) -> None:
    """Issue 27's weight formats (lesson l): FP8 E4M3 per channel, NF4 (blocks of 64), MXFP4, NVFP4
    and symmetric int4 in the same blocks of 64, on every Linear weight."""
    ppl0 = f.ppl
    fmts = {"FP8 E4M3 per channel": lambda w: scaled_round(w, "e4m3", axis=0)[0],
            "NF4 (blocks of 64)": lambda w: block_fake_quantize(w, "nf4"),
            "MXFP4 (blocks of 32)": lambda w: block_fake_quantize(w, "mxfp4"),
            "NVFP4 (blocks of 16)": lambda w: block_fake_quantize(w, "nvfp4"),
            "int4 sym g64": lambda w: fake_quantize_groups(w, 4, 64, True)}
    s = {name: score(name, map_weights(model, fn)) for name, fn in fmts.items()}
    rel = {name: s[name].ppl / ppl0 - 1 for name in fmts}
    checks.append(("FP8 E4M3 weights within +1%", f"{100 * rel['FP8 E4M3 per channel']:+.2f}%",
                   rel["FP8 E4M3 per channel"] <= 0.01))
    checks.append(("NF4 <= +2%", f"{100 * rel['NF4 (blocks of 64)']:+.2f}%",
                   rel["NF4 (blocks of 64)"] <= 0.02))
    checks.append(("MXFP4 <= +4%", f"{100 * rel['MXFP4 (blocks of 32)']:+.2f}%",
                   rel["MXFP4 (blocks of 32)"] <= 0.04))
    d = s["NF4 (blocks of 64)"].chunk_nll - s["int4 sym g64"].chunk_nll
    checks.append(("NF4 beats symmetric int4 (same blocks) on every chunk",
                   paired(s["NF4 (blocks of 64)"], s["int4 sym g64"]), bool((d < 0).all())))


def activations(model, calib, score, checks, f, planted) -> None:
    """Issue 27's activation targets (lesson k): W8A8 per token and per tensor (static), and
    SmoothQuant on the planted outliers."""
    ppl0 = f.ppl
    tok = score("W8A8 per token", quantize_activations(model, 8, 8, "token"))
    ten = score("W8A8 per tensor (static)", quantize_activations(model, 8, 8, "tensor", calib))
    checks.append(("W8A8 per token within +0.5%", f"{100 * (tok.ppl / ppl0 - 1):+.2f}%",
                   tok.ppl <= 1.005 * ppl0))
    checks.append(("W8A8 per tensor static within +1%", f"{100 * (ten.ppl / ppl0 - 1):+.2f}%",
                   ten.ppl <= 1.01 * ppl0))
    bad = score("W8A8 per tensor (static, planted)", quantize_activations(planted, 8, 8, "tensor", calib))
    smoothed, _ = smooth_quant(planted, calib, 0.5)
    good = score("SmoothQuant 0.5 + W8A8 per tensor (planted)",
                 quantize_activations(smoothed, 8, 8, "tensor", calib))
    rec = (bad.ppl - good.ppl) / (bad.ppl - ppl0)
    checks.append(("SmoothQuant (planted) recovers >= 50% of W8A8 per tensor's loss",
                   f"{rec:.0%} ({bad.ppl:.3f} -> {good.ppl:.3f}; paired {paired(good, bad)})", rec >= 0.5))


def rotations(model, score, checks, f) -> None:
    """Issue 27's rotations (lesson k): W4A4 per token without rotation, with QuaRot's rotation of
    every Linear input (fold + online proj/fc2) and with online rotations of proj/fc2 only."""
    ppl0 = f.ppl
    rotated = rotate_model(model, "random_hadamard", seed=0)
    r = score("float32, rotated (Hadamard seed 0)", rotated)
    checks.append(("rotation leaves the float ppl within 1e-5 relative",
                   f"{r.ppl:.7f} vs {ppl0:.7f} ({r.ppl / ppl0 - 1:+.1e})", abs(r.ppl / ppl0 - 1) <= 1e-5))
    none = score("W4A4 per token, no rotation", quantize_activations(model, 4, 4, "token"))
    kinds = [n for n in linear_names(model) if n.rpartition(".")[2] in ("proj", "fc2")]
    for row, label, make, informational in (
            ("every input", "every Linear input (stream folded, proj and fc2 online)",
             lambda s: rotate_model(model, seed=s), ()),
            ("online proj+fc2 only", "the proj and fc2 inputs only (online)",
             lambda s: online_rotate(model, kinds, seed=s), ("informational",))):
        cut = []
        for seed in (0, 1, 2):
            q = score(f"W4A4 {row} s{seed}", quantize_activations(make(seed), 4, 4, "token"))
            cut.append((q, 1 - (q.ppl - ppl0) / (none.ppl - ppl0)))
        mean = sum(c for _, c in cut) / len(cut)
        checks.append((f"W4A4: random Hadamard on {label} cuts the ppl increase by >= 40% (mean of 3 seeds)",
                       f"{100 * mean:.1f}% ({', '.join(f'{100 * c:.1f}%' for _, c in cut)}; "
                       f"{none.ppl:.3f} -> {cut[0][0].ppl:.3f}; seed 0 paired {paired(cut[0][0], none)})",
                       mean >= 0.40, *informational))


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    corpus = load_corpus()
    model = pretrained_tinygpt()
    calib = calibration_batch(corpus.train)
    info = tinygpt_info()
    rows, checks = [], []

    def score(name, m, bits_note="", seconds=None):
        s = perplexity(m, corpus.val)
        rows.append((name, s, bits_note, seconds))
        return s

    f = score("float32", model, f"{model_bytes(model) / 1000:.0f} kB")
    ppl0 = f.ppl
    checks.append(("float ppl <= 3.70", f"{ppl0:.3f}", ppl0 <= 3.70))
    t = info["train_seconds"]
    recorded = f"{t:.0f} s ({info['threads']} thread, recorded at training)"
    checks.append(("trained in <= 300 s", recorded, t <= 300, "informational"))

    def rtn(bits, group, symmetric=False):
        q = quantize_linears(model, bits, group, symmetric)
        name = f"RTN {'sym' if symmetric else 'asym'} {bits}b {'g' + str(group) if group else 'per-ch'}"
        return score(name, q, f"{model_bytes(q) / 1000:.0f} kB"), q

    w8, _ = rtn(8, None, True)
    checks.append(("W8 per-channel within +0.5%", f"{100 * (w8.ppl / ppl0 - 1):+.2f}%",
                   w8.ppl <= 1.005 * ppl0))
    r4_32, _ = rtn(4, 32)
    r4_128, _ = rtn(4, 128)
    best4 = min(r4_32.ppl, r4_128.ppl)
    checks.append(("RTN 4b g32 or g128 <= +3%",
                   f"g32 {100 * (r4_32.ppl / ppl0 - 1):+.2f}%, g128 {100 * (r4_128.ppl / ppl0 - 1):+.2f}%",
                   best4 <= 1.03 * ppl0))
    for bits, target in ((3, 0.70), (2, 0.75)):
        r, _ = rtn(bits, 128)
        q, details = gptq_model(model, calib, bits, 128)
        g = score(f"GPTQ asym {bits}b g128", q, seconds=details["seconds"])
        rec = (r.ppl - g.ppl) / (r.ppl - ppl0)
        checks.append((f"GPTQ {bits}b g128 recovers >= {target:.0%}",
                       f"{rec:.0%} ({r.ppl:.3f} -> {g.ppl:.3f}; paired {paired(g, r)})", rec >= target))
        checks.append((f"GPTQ {bits}b g128 <= 60 s", f"{details['seconds']:.1f} s", details["seconds"] <= 60))
        if bits == 2:
            checks.append(("GPTQ 2b g128 <= 1.2x float", f"{g.ppl / ppl0:.3f}x", g.ppl <= 1.2 * ppl0))
        errs = details["layers"].values()
        checks.append((f"GPTQ {bits}b: every layer's error below RTN's",
                       f"{sum(e['gptq_error'] < e['rtn_error'] for e in errs)}/{len(errs)}",
                       all(e["gptq_error"] < e["rtn_error"] for e in errs)))
    planted = plant_outliers(model)
    p = score("float32, outliers planted", planted)
    checks.append(("planted outliers leave the float ppl unchanged", f"{p.ppl:.6f} vs {ppl0:.6f}",
                   p.nll == f.nll))
    for bits, target in ((3, 0.45), (4, 0.70)):
        r = score(f"RTN asym {bits}b g128 (planted)", quantize_linears(planted, bits, 128))
        q, details = awq_model(planted, calib, bits, 128)
        a = score(f"AWQ asym {bits}b g128 (planted)", q, seconds=details["seconds"])
        rec = (r.ppl - a.ppl) / (r.ppl - ppl0)
        checks.append((f"AWQ planted {bits}b g128 recovers >= {target:.0%}",
                       f"{rec:.0%} ({r.ppl:.3f} -> {a.ppl:.3f}; paired {paired(a, r)})", rec >= target))
    for bits in (4, 3):
        r = next(s for n, s, *_ in rows if n == f"RTN asym {bits}b g128")
        q, details = awq_model(model, calib, bits, 128)
        a = score(f"AWQ asym {bits}b g128", q, seconds=details["seconds"])
        checks.append((f"AWQ {bits}b g128 (trained) <= RTN + 1%",
                       f"{100 * (a.ppl / r.ppl - 1):+.2f}% (paired {paired(a, r)})", a.ppl <= 1.01 * r.ppl))
    formats(model, score, checks, f)
    activations(model, calib, score, checks, f, planted)
    rotations(model, score, checks, f)

    print(f"{'model':34s} {'ppl':>7s} {'bits/char':>9s} {'vs float':>9s}  size / time")
    for name, s, note, seconds in rows:
        extra = note if seconds is None else f"{seconds:.1f} s"
        print(f"{name:34s} {s.ppl:7.3f} {s.bits_per_char:9.3f} {100 * (s.ppl / ppl0 - 1):+8.2f}%  {extra}")
    print()
    return report(checks)


if __name__ == "__main__":
    start = time.perf_counter()
    status = main()
    print(f"total {time.perf_counter() - start:.0f} s")
    sys.exit(status)
