"""Re-train the float checkpoints shipped in quantlab/weights (``make weights``).

quantlab's recipes (quantlab.training.RECIPES) on the embedded 4,000 training digits; writes
``net.pt``, ``netbn.pt``, ``resnet.pt`` and their entries in ``checksums.json`` (sha256, recipe,
seconds, accuracies). ``python scripts/train_pretrained.py resnet`` re-trains only the named ones.
Deterministic on one machine; other CPUs may differ in the last bits of the weights.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import torch
from torch.utils.data import DataLoader

from quantlab.data import mnist_loaders, official_test_set
from quantlab.models import MODELS
from quantlab.training import RECIPES, WEIGHTS_DIR, evaluate, save_checkpoint, train

OFFICIAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # nice to a shared CPU
    names = sys.argv[1:] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model names {unknown}; choose from {sorted(MODELS)}")
    official = None
    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        official = DataLoader(official_test_set(OFFICIAL), batch_size=1000)
    path = WEIGHTS_DIR / "checksums.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        cls, recipe = MODELS[name], RECIPES[name]
        train_loader, test_loader = mnist_loaders("embedded", batch_size=recipe["batch_size"],
                                                  seed=recipe["seed"])
        torch.manual_seed(recipe["seed"])
        model = cls()
        start = time.perf_counter()
        train(model, train_loader, recipe["epochs"], lr=recipe["lr"],
              max_shift=recipe["max_shift"], seed=recipe["seed"], progress=False)
        seconds = time.perf_counter() - start
        sha = save_checkpoint(model, WEIGHTS_DIR / f"{name}.pt")
        info[name] = {"sha256": sha, "recipe": recipe, "train_seconds": round(seconds, 1),
                      "embedded_test_accuracy": evaluate(model, test_loader),
                      "official_test_accuracy": evaluate(model, official) if official else None}
        print(name, json.dumps(info[name]))
    path.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
