"""Benchmark: the small ResNet (quantlab.models.ResNet), float vs its integer versions.

Calibrates on the embedded training digits and prints
1. accuracy on the embedded 1,000-digit split (95% Wilson interval) and the official 10,000-image
   test set (when ../shared/data/mnist exists): float, PTQ int8 and int4, and agreement with
   PyTorch's qnnpack integers;
2. seconds to run the official images (or the embedded split) through the float model and
   quantlab's integer model. Target (issue 13): integer inference <= 2x the float model's time.
"""

from __future__ import annotations

import time
import warnings

import torch
from common import test_sets

from quantlab import quantize_model
from quantlab.data import mnist_loaders
from quantlab.reference import DEPRECATION_MESSAGES, torch_ao_available, torch_quantized_model
from quantlab.training import evaluate, pretrained, wilson_interval

CHUNK = 256  # both models run the images in the same batches of 256


def best_of(fn, x, repeats=5):
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
    resnet = pretrained("resnet")
    models = {"float ResNet": resnet}
    for bits in (8, 4):
        models[f"PTQ int{bits} per-channel"] = quantize_model(resnet, bits).calibrate(
            train_loader).freeze()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'model':26s}{'embedded % [95% interval]':>28s}" + "".join(
        f"{name + ' %':>14s}" for name in sets if name != "embedded"))
    for label, model in models.items():
        fn = model if label.startswith("float") else model.quantize_inference
        accs = {s: evaluate(fn, loader) for s, loader in sets.items()}
        n = len(test_loader.dataset)
        lo, hi = wilson_interval(round(accs["embedded"] * n), n)
        emb = f"{100 * accs['embedded']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"
        print(f"{label:26s}{emb:>28s}" + "".join(f"{100 * accs[s]:14.2f}" for s in sets
                                                  if s != "embedded"), flush=True)

    images = torch.cat([x for x, _ in sets.get("official", test_loader)])
    qnet = models["PTQ int8 per-channel"]
    if torch_ao_available():
        q_x = qnet.q_in.quantize_tensor(images)
        ours, theirs = qnet.integer_inference(q_x), torch_quantized_model(qnet).integer_inference(q_x)
        print(f"\nint8 logit integers equal to PyTorch's qnnpack: {int((ours == theirs).sum())} of "
              f"{ours.numel()}; predictions equal: {int((ours.argmax(1) == theirs.argmax(1)).sum())}"
              f" of {len(images)}")
    print(f"\nspeed on {len(images)} images in batches of {CHUNK} (best of 5)")
    print(f"{'model':38s}{'seconds':>10s}{'x float':>10s}")
    t_float = best_of(resnet, images)
    print(f"{'float ResNet':38s}{t_float:10.3f}{1.0:10.2f}")
    t_int = best_of(qnet.quantize_inference, images)
    print(f"{'quantlab int8 integer inference':38s}{t_int:10.3f}{t_int / t_float:10.2f}")
    print(f"target: integer <= 2x float: {'met' if t_int <= 2 * t_float else 'NOT met'}")


if __name__ == "__main__":
    main()
