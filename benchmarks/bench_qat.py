"""Benchmark: quantization-aware training vs post-training quantization at 8, 4, 3 and 2 bits.

For Net and NetBN: PTQ (calibrated on the embedded training digits) and QAT
(``quantize_model(..., qat=True)`` + ``train(qnet, train_loader, epochs=3)`` with its defaults),
both frozen to integer-only inference; accuracy on the embedded 1,000-digit split and the official
10,000-image MNIST test set (when ../shared/data/mnist exists), and the QAT training time.
Targets (issue 6): 4-bit QAT within 0.3 points of float; 2-bit QAT >= 90%.
Usage: ``python bench_qat.py [net] [netbn] [--bits 4 2]`` (default: both models at 8, 4, 3 and 2 bits).
"""

from __future__ import annotations

import sys
import time

import torch
from common import test_sets

from quantlab.data import mnist_loaders
from quantlab.models import quantize_model
from quantlab.training import evaluate, pretrained, train


def main(names=("net", "netbn"), bits_list=(8, 4, 3, 2)):
    torch.set_num_threads(2)
    train_loader, test_loader = mnist_loaders("embedded")
    sets = test_sets(test_loader)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per-channel weights, "
          "logits 8 bits; QAT = 3 epochs with the QAT model's defaults\n")
    header = f"{'model':6s} {'bits':>4s} {'method':6s}" + "".join(
        f"{s + ' %':>12s}{'d float':>9s}" for s in sets) + f"{'train s':>9s}"
    print(header)
    for name in names:
        net = pretrained(name)
        float_acc = {s: evaluate(net, loader) for s, loader in sets.items()}
        print(f"{name:6s} {'32':>4s} {'float':6s}" + "".join(
            f"{100 * float_acc[s]:12.2f}{0:9.2f}" for s in sets) + f"{'-':>9s}", flush=True)
        for bits in bits_list:
            ptq = quantize_model(net, bits, per_channel=True).calibrate(train_loader).freeze()
            qat = quantize_model(net, bits, per_channel=True, qat=True)
            start = time.perf_counter()
            train(qat, train_loader, epochs=3, progress=False)
            seconds = time.perf_counter() - start
            qat.freeze()
            for method, model, secs in (("PTQ", ptq, "-"), ("QAT", qat, f"{seconds:.1f}")):
                accs = {s: model.accuracy(loader) for s, loader in sets.items()}
                print(f"{name:6s} {bits:4d} {method:6s}" + "".join(
                    f"{100 * accs[s]:12.2f}{100 * (accs[s] - float_acc[s]):+9.2f}" for s in sets)
                    + f"{secs:>9s}", flush=True)


if __name__ == "__main__":
    # usage: bench_qat.py [net] [netbn] [--bits 4 2]   (default: both models, 8 4 3 2 bits)
    args = sys.argv[1:]
    bits_list = (8, 4, 3, 2)
    if "--bits" in args:
        i = args.index("--bits")
        bits_list = tuple(int(b) for b in args[i + 1:])
        args = args[:i]
    main(tuple(args) or ("net", "netbn"), bits_list)
