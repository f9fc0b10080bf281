"""Re-train the float checkpoints shipped in quantlab/weights (``make weights``).

quantlab's recipe (quantlab.training.RECIPE) on the embedded 4,000 training digits; writes
``net.pt``, ``netbn.pt`` and ``checksums.json`` (sha256, recipe, seconds, accuracies).
Deterministic on one machine; other CPUs may differ in the last bits of the weights.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import torch
from torch.utils.data import DataLoader

from quantlab.data import mnist_loaders, official_test_set
from quantlab.models import MODELS
from quantlab.training import RECIPE, WEIGHTS_DIR, evaluate, save_checkpoint, train

OFFICIAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> int:
    torch.set_num_threads(2)
    train_loader, test_loader = mnist_loaders("embedded", batch_size=RECIPE["batch_size"],
                                              seed=RECIPE["seed"])
    official = None
    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        official = DataLoader(official_test_set(OFFICIAL), batch_size=1000)
    info = {}
    for name, cls in MODELS.items():
        torch.manual_seed(RECIPE["seed"])
        model = cls()
        start = time.perf_counter()
        train(model, train_loader, RECIPE["epochs"], lr=RECIPE["lr"],
              max_shift=RECIPE["max_shift"], seed=RECIPE["seed"], progress=False)
        seconds = time.perf_counter() - start
        sha = save_checkpoint(model, WEIGHTS_DIR / f"{name}.pt")
        info[name] = {"sha256": sha, "recipe": RECIPE, "train_seconds": round(seconds, 1),
                      "embedded_test_accuracy": evaluate(model, test_loader),
                      "official_test_accuracy": evaluate(model, official) if official else None}
        print(name, json.dumps(info[name]))
    (WEIGHTS_DIR / "checksums.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
