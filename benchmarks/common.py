"""Shared set-up of the benchmark scripts: threads, and the test sets to measure on."""

from __future__ import annotations

import os
import pathlib

import torch
from torch.utils.data import DataLoader

from quantlab.data import official_test_set

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
