"""Benchmark: accuracy and training time of the float models with quantlab's recipe.

Prints a table: model, epochs, training seconds, accuracy on the embedded 1,000-digit test split
and on the official 10,000-image MNIST test set (when ../shared/data/mnist exists), and the time to
evaluate the official set. Targets (issue 3): Net >= 98.0% official, >= 96.0% embedded, <= 60 s of
training on 2 cores; evaluating 10,000 images < 5 s.
"""

from __future__ import annotations

import time

import torch
from common import test_sets

from quantlab.data import mnist_loaders
from quantlab.models import MODELS
from quantlab.training import RECIPE, evaluate, pretrained, train


def main():
    torch.set_num_threads(2)
    train_loader, test_loader = mnist_loaders("embedded", batch_size=RECIPE["batch_size"])
    official = test_sets(test_loader).get("official")
    print(f"recipe {RECIPE}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':8s} {'weights':9s} {'epochs':>6s} {'train s':>8s} {'embedded %':>10s} "
          f"{'official %':>10s} {'eval 10k s':>10s}")
    for name, cls in MODELS.items():
        for kind in ("trained", "shipped"):
            if kind == "trained":
                torch.manual_seed(RECIPE["seed"])
                model = cls()
                start = time.perf_counter()
                train(model, train_loader, RECIPE["epochs"], lr=RECIPE["lr"],
                      max_shift=RECIPE["max_shift"], seed=RECIPE["seed"], progress=False)
                seconds = f"{time.perf_counter() - start:8.1f}"
            else:
                model, seconds = pretrained(name), f"{'-':>8s}"
            emb = 100 * evaluate(model, test_loader)
            off, eval_s = "n/a", "n/a"
            if official is not None:
                evaluate(model, official)  # warm-up
                start = time.perf_counter()
                off = f"{100 * evaluate(model, official):.2f}"
                eval_s = f"{time.perf_counter() - start:.2f}"
            print(f"{name:8s} {kind:9s} {RECIPE['epochs']:6d} {seconds} {emb:10.2f} {off:>10s} "
                  f"{eval_s:>10s}", flush=True)


if __name__ == "__main__":
    main()
