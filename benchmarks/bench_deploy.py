"""Benchmark: deployment. quantlab's integers against ONNX Runtime and the NumPy engine, and speed.

For the 8-bit ``Net`` per channel and per tensor and ``NetBN`` per channel (calibrated on the
4,000 embedded training digits), exported with ``quantlab.export.to_onnx`` and ``to_npz``, on the
official 10,000 MNIST test images (the embedded 1,000 when the official set is absent, said so):

1. logit integers that differ from quantlab's ``integer_inference``, frozen with quantlab's
   default (qnnpack) multiplier formula and with ``multiplier="onnxruntime"``: ONNX Runtime (its own
   formula, so compared with both), the NumPy engine on the ``.onnx`` and on the ``.npz`` file
   (run with each formula); and each engine's accuracy;
2. seconds per 10,000 images, warm, the minimum over ``--rounds`` rounds in which every engine runs
   once in turn (interleaved, so that load changes hit them alike), batches of 256: float PyTorch,
   quantlab ``integer_inference``, PyTorch qnnpack int8 (while torch.ao exists), ONNX Runtime, the
   NumPy engine; the ratio to float and the load average before and after (shared machines).

Targets (issue 11): 0 differing integers with ONNX Runtime's formula; NumPy engine < 3x float.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_deploy.py --threads 1
    python benchmarks/bench_deploy.py                 # 2 threads (torch, ONNX Runtime, BLAS)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from common import stacked, test_sets

from quantlab.data import mnist_loaders
from quantlab.engine import Engine
from quantlab.export import to_npz, to_onnx
from quantlab.models import quantize_model
from quantlab.reference import DEPRECATION_MESSAGES, torch_ao_available, torch_quantized_model
from quantlab.training import pretrained

CHUNK = 256
MODELS = [("Net per-channel", "net", True), ("Net per-tensor", "net", False),
          ("NetBN per-channel", "netbn", True)]


def blas_threads(n: int):
    """Limit NumPy's BLAS to n threads (threadpoolctl when installed; else the environment's)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def interleaved(fns: dict, rounds: int) -> dict:
    """Minimum seconds of each function over ``rounds`` rounds (each runs once per round)."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def prepare(name, per_channel, train_loader, folder, threads):
    net = pretrained(name).eval()
    qnet = quantize_model(net, 8, per_channel=per_channel).calibrate(train_loader).freeze()
    q_ort = copy.deepcopy(qnet).freeze(multiplier="onnxruntime")
    stem = f"{folder}/{name}_{'pc' if per_channel else 'pt'}"
    to_onnx(qnet, stem + ".onnx")
    to_npz(qnet, stem + ".npz")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(stem + ".onnx", opts, providers=["CPUExecutionProvider"])
    return net, qnet, q_ort, sess, stem


def agreement(label, parts, images, labels):
    net, qnet, q_ort, sess, stem = parts
    x_np = images.numpy()
    q_x = qnet.q_in.quantize_tensor(images)
    ref = {"qnnpack": qnet.integer_inference(q_x).numpy(),
           "onnxruntime": q_ort.integer_inference(q_x).numpy()}
    y_ort = np.concatenate([sess.run(["y_q"], {"x": c})[0] for c in np.split(
        x_np, range(CHUNK, len(x_np), CHUNK))])
    rows = [("quantlab, qnnpack M (the formulas)", ref["qnnpack"], ref["qnnpack"]),
            ("ONNX Runtime (its own formula)", y_ort, y_ort)]
    for suffix in ("onnx", "npz"):
        rows.append((f"NumPy engine, .{suffix}",
                     *(Engine(f"{stem}.{suffix}", multiplier=m).run(x_np)["y_q"]
                       for m in ("qnnpack", "onnxruntime"))))
    with torch.no_grad():
        float_acc = float((net(images).argmax(1) == labels).float().mean())
    y = labels.numpy()
    print(f"\n{label}: logit integers (of {ref['qnnpack'].size}) that differ from quantlab frozen "
          f"with each multiplier formula; accuracy (float {100 * float_acc:.2f}%)")
    print(f"{'engine':34s}{'qnnpack M':>11s}{'ORT M':>8s}{'max |d|':>9s}{'accuracy %':>12s}")
    for name, a, b in rows:
        d1, d2 = int((a != ref["qnnpack"]).sum()), int((b != ref["onnxruntime"]).sum())
        dmax = int(np.abs(a.astype(np.int64) - ref["qnnpack"]).max())
        acc = 100 * float((a.argmax(1) == y).mean())
        print(f"{name:34s}{d1:11d}{d2:8d}{dmax:9d}{acc:12.2f}", flush=True)


def timing(label, parts, images, threads, rounds):
    net, qnet, _, sess, stem = parts
    x_np = images.numpy()
    chunks, np_chunks = images.split(CHUNK), np.split(x_np, range(CHUNK, len(x_np), CHUNK))
    engine = Engine(stem + ".onnx", chunk_size=CHUNK)
    fns = {}
    with torch.no_grad():
        fns["float PyTorch"] = lambda: [net(c) for c in chunks]
        fns["quantlab integer_inference"] = lambda: [qnet.quantize_inference(c) for c in chunks]
        if torch_ao_available():
            tq = torch_quantized_model(qnet, "qnnpack")
            fns["PyTorch qnnpack int8"] = lambda: [tq(c) for c in chunks]
        fns["ONNX Runtime int8"] = lambda: [sess.run(["y"], {"x": c}) for c in np_chunks]
        fns["NumPy engine"] = lambda: engine(x_np)
        before = load()
        with blas_threads(threads):
            best = interleaved(fns, rounds)
    scale = 10_000 / len(images)
    print(f"\n{label}: seconds per 10,000 images, {threads} thread(s), min of {rounds} interleaved "
          f"rounds ({before} before, {load()} after)")
    print(f"{'engine':34s}{'s / 10k':>10s}{'x float':>10s}")
    for name, t in best.items():
        print(f"{name:34s}{t * scale:10.3f}{t / best['float PyTorch']:10.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of torch, ONNX Runtime and NumPy's BLAS (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (0: no timing)")
    parser.add_argument("--timed", default="net_pc", choices=["net_pc", "all"],
                        help="time the per-channel Net only (default) or every model")
    args = parser.parse_args()
    for message in DEPRECATION_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(args.threads)
    train_loader, test_loader = mnist_loaders("embedded")
    set_name, images, labels = stacked(test_sets(test_loader))
    print(f"{len(images)} {set_name} test images; torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, numpy {np.__version__}; {load()}")
    folder = tempfile.mkdtemp()
    for i, (label, name, per_channel) in enumerate(MODELS):
        parts = prepare(name, per_channel, train_loader, folder, args.threads)
        agreement(label, parts, images, labels)
        if args.rounds and (i == 0 or args.timed == "all"):
            timing(label, parts, images, args.threads, args.rounds)


if __name__ == "__main__":
    main()
