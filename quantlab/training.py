"""Training, evaluation and checkpoints (seeded and deterministic on the CPU).

Taught in notebook ``c_train_and_test``. ``train`` works unchanged on the fake-quantized models of
quantization-aware training: a model may carry its own ``default_lr`` and ``default_augment``.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import pickle
import zipfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import BACKGROUND
from .models import MODELS

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
#: quantlab's recipe for the shipped checkpoints (make weights): Adam, cosine schedule, shifts
RECIPE = {"epochs": 26, "lr": 3e-3, "batch_size": 64, "max_shift": 2, "seed": 0}
#: the recipe of each shipped checkpoint (the ResNet converges in fewer epochs)
RECIPES = {"net": RECIPE, "netbn": RECIPE, "resnet": {**RECIPE, "epochs": 12}}


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift] (x and y),
    filling with the background value."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x - BACKGROUND, (p, p, p, p)) + BACKGROUND
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train(model: nn.Module, train_loader, epochs: int, lr: float | None = None,
          max_shift: int | None = None, weight_decay: float = 0.0, seed: int = 0,
          progress: bool = True, eval_loader=None) -> dict:
    """Train with Adam and a cosine learning-rate schedule; return the history.

    Args:
        model: any module mapping (N, 1, 28, 28) images to logits (float or fake-quantized).
        train_loader: yields ``(images, labels)``.
        epochs: number of passes over ``train_loader``.
        lr: peak learning rate; None uses ``model.default_lr`` if it has one, else 3e-3.
        max_shift: random shift augmentation in pixels; None uses ``model.default_augment`` if it
            has one, else 2.
        seed: seeds torch, the augmentation and the loader's shuffling (its ``generator`` is
            re-seeded when it has one), so training twice in a row gives the same weights.
        eval_loader: when given, the accuracy on it is recorded after every epoch.
    Returns:
        ``{"loss": [...], "accuracy": [...], "lr": [...]}``, one entry per epoch (training set),
        plus ``"eval_accuracy"`` when ``eval_loader`` is given.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int; got {epochs!r}")
    lr = getattr(model, "default_lr", 3e-3) if lr is None else lr
    max_shift = getattr(model, "default_augment", 2) if max_shift is None else max_shift
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    torch.manual_seed(seed)
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history = {"loss": [], "accuracy": [], "lr": []}
    if eval_loader is not None:
        history["eval_accuracy"] = []
    for epoch in range(epochs):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        # few refreshes: a notebook's progress widget sends messages per refresh, and a flood of
        # them overflows the kernel's output queue (nbval then loses the end of the cell)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=True, mininterval=0.5)
        history["lr"].append(opt.param_groups[0]["lr"])
        for images, labels in bar:
            images = random_shift(images, max_shift, g)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}",
                            refresh=False)
        history["loss"].append(total_loss / seen)
        history["accuracy"].append(correct / seen)
        if eval_loader is not None:
            history["eval_accuracy"].append(evaluate(model, eval_loader))
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module | Callable, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All predictions and labels of ``loader``: ``(predicted, labels)`` int64 tensors.

    ``model`` is a module (put in eval mode) or any callable mapping images to logits, e.g. a
    quantized model's ``quantize_inference``.
    """
    if isinstance(model, nn.Module):
        model.eval()
    preds, labels = [], []
    for images, y in loader:
        preds.append(model(images).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def evaluate(model: nn.Module | Callable, loader) -> float:
    """Accuracy of ``model`` on ``loader`` as a fraction in [0, 1]."""
    pred, labels = predict(model, loader)
    return (pred == labels).float().mean().item()


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``correct / total`` (95% for the default ``z``).

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct/total``:
    unlike ``p -/+ z sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not empty at 0% or 100%.
    On 1,000 test digits at 98% it is about [97.0%, 98.7%]: differences of a few tenths of a
    point are noise. Taught in notebook ``d_post_training_quantize``.
    """
    if isinstance(correct, bool) or isinstance(total, bool) or not isinstance(correct, int) \
            or not isinstance(total, int):
        raise TypeError(f"correct and total must be ints; got {correct!r}, {total!r}")
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0; got {correct}, {total}")
    p, n = correct / total, total
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return lo, hi


def save_checkpoint(model: nn.Module, path) -> str:
    """``torch.save(model.state_dict(), path)``; returns the file's sha256."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(model: nn.Module, path, sha256: str | None = None) -> nn.Module:
    """Load a state_dict saved by :func:`save_checkpoint` into ``model`` (weights_only=True).

    Raises:
        FileNotFoundError, ValueError: missing, corrupt, checksum-failing or mismatched checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if sha256 is not None:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != sha256:
            raise ValueError(f"checkpoint {path} fails its checksum (sha256 {actual}, expected "
                             f"{sha256}): the file is corrupt or was replaced")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is not a readable PyTorch state_dict "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"{str(e).strip()[:400]}") from e
    return model


def _checksums() -> dict:
    return json.loads((WEIGHTS_DIR / "checksums.json").read_text())


def pretrained(name: str = "net") -> nn.Module:
    """The trained float model shipped inside the package, verified by checksum, in eval mode.

    Args:
        name: ``"net"`` (:class:`~quantlab.models.Net`), ``"netbn"`` (``NetBN``) or
            ``"resnet"`` (``ResNet``).
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}; got {name!r}")
    info = _checksums().get(name)
    if info is None:
        raise FileNotFoundError(f"no checkpoint of {name!r} is shipped in {WEIGHTS_DIR}: train it "
                                f"with `python scripts/train_pretrained.py {name}`")
    model = MODELS[name]()
    load_checkpoint(model, WEIGHTS_DIR / f"{name}.pt", sha256=info["sha256"])
    return model.eval()


def pretrained_info(name: str = "net") -> dict:
    """What the shipped checkpoint was trained with and what it measured (see ``make weights``)."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}; got {name!r}")
    return _checksums()[name]

