"""Re-train the float checkpoints shipped in quantlab/weights (``make weights``).

quantlab's recipes (quantlab.training.RECIPES) on the embedded 4,000 training digits; writes
``net.pt``, ``netbn.pt``, ``resnet.pt`` and their entries in ``checksums.json`` (sha256, recipe,
seconds, accuracies). ``tinygpt.pt``: the character-level GPT of lessons i and j
(quantlab.training.GPT_RECIPE on the pinned corpus of quantlab.text; sha256, recipe, seconds, val
perplexity). ``python scripts/train_pretrained.py resnet`` re-trains only the named ones.
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
from quantlab.models import MODELS, TinyGPT
from quantlab.text import CORPUS_SHA256, load_corpus
from quantlab.training import (
    GPT_RECIPE,
    RECIPES,
    WEIGHTS_DIR,
    evaluate,
    perplexity,
    save_checkpoint,
    train,
    train_gpt,
)

OFFICIAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # nice to a shared CPU
    names = sys.argv[1:] or [*MODELS, "tinygpt"]
    unknown = sorted(set(names) - set(MODELS) - {"tinygpt"})
    if unknown:
        raise SystemExit(f"unknown model names {unknown}; choose from {sorted([*MODELS, 'tinygpt'])}")
    official = None
    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        official = DataLoader(official_test_set(OFFICIAL), batch_size=1000)
    path = WEIGHTS_DIR / "checksums.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        if name == "tinygpt":
            info[name] = train_tinygpt()
            print(name, json.dumps(info[name]))
            continue
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


def train_tinygpt() -> dict:
    """Train TinyGPT once with GPT_RECIPE; save tinygpt.pt; return its checksums.json entry."""
    corpus = load_corpus()
    config = {"vocab_size": len(corpus.vocab), "n_layers": 4, "d_model": 128, "n_heads": 4,
              "context": GPT_RECIPE["context"]}
    torch.manual_seed(GPT_RECIPE["seed"])
    model = TinyGPT(**config)
    start = time.perf_counter()
    history = train_gpt(model, corpus.train, progress=False)
    seconds = time.perf_counter() - start
    sha = save_checkpoint(model, WEIGHTS_DIR / "tinygpt.pt")
    score = perplexity(model, corpus.val, GPT_RECIPE["context"])
    return {"sha256": sha, "config": config, "recipe": GPT_RECIPE, "corpus_sha256": CORPUS_SHA256,
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "final_train_loss": round(sum(history["loss"][-50:]) / 50, 4),
            "val_nll": round(score.nll, 5), "val_perplexity": round(score.ppl, 4),
            "val_bits_per_char": round(score.bits_per_char, 4)}


if __name__ == "__main__":
    sys.exit(main())
