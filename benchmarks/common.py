"""Shared set-up of the benchmark scripts: threads, and the test sets to measure on."""

from __future__ import annotations

import os
import pathlib
import time
import warnings

import torch
from torch.utils.data import DataLoader

from quantlab.data import mnist_loaders, official_test_set
from quantlab.reference import DEPRECATION_MESSAGES

#: the official MNIST test set beside the project (../shared/data/mnist), or $QUANTLAB_OFFICIAL_MNIST
OFFICIAL = pathlib.Path(os.environ.get(
    "QUANTLAB_OFFICIAL_MNIST",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


def test_sets(embedded_loader) -> dict:
    """``{"embedded": loader, "official": loader}``; "official" only when its files exist."""
    sets = {"embedded": embedded_loader}
    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        sets["official"] = DataLoader(official_test_set(OFFICIAL), batch_size=1000)
    else:
        print(f"(official MNIST test set not found at {OFFICIAL}: embedded split only)")
    return sets


def stacked(sets: dict) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(name, images, labels)`` of the official set stacked into two tensors, or of the embedded
    split when the official set is absent (``test_sets`` then printed why)."""
    name = "official" if "official" in sets else "embedded"
    images, labels = zip(*sets[name])
    return name, torch.cat(images), torch.cat(labels)


#: the benchmarks run the images in the same batches of 256
CHUNK = 256


def best_of(fn, x, repeats=3):
    """The best of ``repeats`` wall-clock times of ``fn`` over ``x`` in chunks of :data:`CHUNK`."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for chunk in x.split(CHUNK):
                fn(chunk)
            times.append(time.perf_counter() - start)
    return min(times)


def setup():
    """torch.ao's deprecation warnings filtered, 2 threads; ``(train_loader, test_loader, sets)``
    of the embedded digits and :func:`test_sets`."""
    for message in DEPRECATION_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(2)
    train_loader, test_loader = mnist_loaders("embedded")
    return train_loader, test_loader, test_sets(test_loader)
