"""Benchmark: post-training quantization accuracy and integer-inference speed.

Calibrates on the embedded training digits, then prints two tables:
1. accuracy on the embedded 1,000-digit test split and the official 10,000-image MNIST test set
   (when ../shared/data/mnist exists) of the float models and their int8 versions;
2. seconds to run the 10,000 official images (or the embedded split) through the float model,
   quantlab's integer model and PyTorch's native int8 model (qnnpack) with the same qparams.
Targets (issue 4): int8 per-channel within 0.1 points of float (official) and 0.3 (embedded);
integer inference <= 3x the float model's time.
"""

from __future__ import annotations

import time
import warnings

import torch
from common import stacked, test_sets

from quantlab.data import mnist_loaders
from quantlab.models import quantize_model
from quantlab.reference import DEPRECATION_MESSAGES, torch_quantized_model
from quantlab.training import evaluate, pretrained

CHUNK = 256  # every model runs the images in the same batches of 256


def best_of(fn, x, repeats=3):
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for chunk in x.split(CHUNK):
                fn(chunk)
            times.append(time.perf_counter() - start)
    return min(times)


def main():
    for message in DEPRECATION_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(2)
    train_loader, test_loader = mnist_loaders("embedded")
    sets = test_sets(test_loader)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; calibration on the "
          f"4,000 embedded training digits\n")
    print(f"{'model':38s}" + "".join(f"{name + ' %':>14s}" for name in sets)
          + "".join(f"{'d ' + name:>12s}" for name in sets))
    variants = [("float Net", "net", None), ("int8 per-tensor", "net", dict(per_channel=False)),
                ("int8 per-channel", "net", dict(per_channel=True)),
                ("int8 per-channel fixed-point", "net", dict(per_channel=True, fixed_point=True)),
                ("float NetBN", "netbn", None),
                ("NetBN folded int8 per-channel", "netbn", dict(per_channel=True))]
    float_acc, models = {}, {}
    for label, name, kw in variants:
        model = pretrained(name)
        if kw is not None:
            model = quantize_model(model, 8, **kw).calibrate(train_loader).freeze()
        models[label] = model
        fn = model if kw is None else model.quantize_inference
        accs = {s: evaluate(fn, loader) for s, loader in sets.items()}
        if kw is None:
            float_acc[name] = accs
        deltas = "".join(f"{100 * (accs[s] - float_acc[name][s]):+12.2f}" for s in sets)
        print(f"{label:38s}" + "".join(f"{100 * accs[s]:14.2f}" for s in sets) + deltas,
              flush=True)

    _, images, _ = stacked(sets)
    print(f"\nspeed on {len(images)} images in batches of {CHUNK} (best of 3)")
    print(f"{'model':38s}{'seconds':>10s}{'x float':>10s}")
    t_float = best_of(models["float Net"], images)
    print(f"{'float Net':38s}{t_float:10.3f}{1.0:10.2f}")
    for label in ("int8 per-tensor", "int8 per-channel", "int8 per-channel fixed-point"):
        t = best_of(models[label].quantize_inference, images)
        print(f"{'quantlab ' + label:38s}{t:10.3f}{t / t_float:10.2f}")
    for engine in ("qnnpack", "x86"):
        if engine in torch.backends.quantized.supported_engines:
            # timing only: x86 with 8-bit activations may saturate (see notebook e)
            ref = torch_quantized_model(models["int8 per-channel"], engine)
            t = best_of(ref, images)
            print(f"{'PyTorch int8 (' + engine + ')':38s}{t:10.3f}{t / t_float:10.2f}")


if __name__ == "__main__":
    main()
