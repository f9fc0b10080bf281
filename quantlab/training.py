"""Training and evaluation (seeded and deterministic on the CPU).

Taught in notebook ``c_train_and_test``. ``train`` works unchanged on the fake-quantized models of
quantization-aware training: a model may carry its own ``default_lr`` and ``default_augment``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._validate import (
    check_bool,
    check_int,
    check_iterable_of_batches,
    check_real,
    images_and_labels,
)
from .data import BACKGROUND

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
#: quantlab's recipe for the shipped checkpoints (make weights): Adam, cosine schedule, shifts
RECIPE = {"epochs": 26, "lr": 3e-3, "batch_size": 64, "max_shift": 2, "seed": 0}
#: the recipe of each shipped checkpoint (the ResNet converges in fewer epochs)
RECIPES = {"net": RECIPE, "netbn": RECIPE, "resnet": {**RECIPE, "epochs": 12}}


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift] (x and y),
    filling with the background value."""
    max_shift = check_int(max_shift, "max_shift", 0)
    if max_shift == 0:
        return x
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be a batch of images (N, 1, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
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
          progress: bool = True, eval_loader=None, teacher: nn.Module | None = None,
          distill_weight: float = 0.5) -> dict:
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
        eval_loader: when given, the accuracy on it and the predicted classes are recorded after
            every epoch (e.g. to compare an epoch's model with another by the paired test).
        teacher: a trained model to distil from (Hinton et al. 2015), e.g. the float model of a
            QAT model: the loss becomes ``(1 - w) CE(logits, labels) + w KL(softmax(teacher) ||
            softmax(logits))`` with ``w = distill_weight`` (in [0, 1]); the teacher is frozen.
    Returns:
        ``{"loss": [...], "accuracy": [...], "lr": [...]}``, one entry per epoch (training set;
        ``"lr"`` is the rate at each epoch's start), ``"lr_batches"``: the rate each batch was
        trained with, ``lr (1 + cos(pi t / T)) / 2`` for batch ``t = 0 .. T-1`` of the ``T`` in the
        run (the schedule steps after every batch), plus ``"eval_accuracy"`` and
        ``"eval_predictions"`` (one int64 tensor of classes per epoch) when ``eval_loader`` is
        given, and ``"lr_end"``: the rate after the last batch (0, the cosine schedule's end).
    """
    epochs, lr, max_shift, weight_decay, seed, progress, distill_weight, n_batches = \
        _check_train_arguments(model, train_loader, epochs, lr, max_shift, weight_decay, seed,
                               progress, eval_loader, teacher, distill_weight)
    torch.manual_seed(seed)
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history = {"loss": [], "accuracy": [], "lr": [], "lr_batches": []}
    if eval_loader is not None:
        history["eval_accuracy"], history["eval_predictions"] = [], []
    # one bar for the whole run, refreshed at most once a second: a notebook's progress widget sends
    # messages per bar and per refresh, and a flood of them overflows the kernel's output queue
    # (nbval, which reads the queue only after the cell, then loses the end of the cell)
    bar = tqdm(total=steps, desc=f"epoch 1/{epochs}", disable=not progress, leave=True,
               mininterval=1.0)
    for epoch in range(epochs):
        bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        history["lr"].append(opt.param_groups[0]["lr"])
        loss, accuracy = _train_epoch(model, train_loader, opt, sched, g, max_shift, teacher,
                                      distill_weight, bar, history["lr_batches"])
        history["loss"].append(loss)
        history["accuracy"].append(accuracy)
        if eval_loader is not None:
            pred, eval_labels = predict(model, eval_loader)
            history["eval_predictions"].append(pred)
            history["eval_accuracy"].append((pred == eval_labels).float().mean().item())
    bar.close()
    history["lr_end"] = opt.param_groups[0]["lr"]
    model.eval()
    return history


def _check_train_arguments(model, train_loader, epochs, lr, max_shift, weight_decay, seed,
                           progress, eval_loader, teacher, distill_weight) -> tuple:
    """train's arguments, checked (an error names the argument) and normalised, the model's
    defaults filled in; and the number of batches per epoch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters")
    check_iterable_of_batches(train_loader, "train_loader")
    epochs = check_int(epochs, "epochs", 1)
    if lr is None:
        lr = getattr(model, "default_lr", 3e-3)
    lr = check_real(lr, "lr", 0.0, low_open=True)
    if max_shift is None:
        max_shift = getattr(model, "default_augment", 2)
    max_shift = check_int(max_shift, "max_shift", 0)
    weight_decay = check_real(weight_decay, "weight_decay", 0.0)
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    if eval_loader is not None:
        check_iterable_of_batches(eval_loader, "eval_loader")
    if teacher is not None:
        if not callable(teacher):
            raise TypeError(f"teacher must be None or a torch.nn.Module; got "
                            f"{type(teacher).__name__}")
        if isinstance(teacher, nn.Module):
            teacher.eval()
    distill_weight = check_real(distill_weight, "distill_weight", 0.0, 1.0)
    try:
        n_batches = len(train_loader)
    except TypeError:
        raise TypeError("train_loader must have a length (a DataLoader or a list of batches)") \
            from None
    if n_batches == 0:
        raise ValueError("train_loader yielded no batches: training needs at least one")
    return epochs, lr, max_shift, weight_decay, seed, progress, distill_weight, n_batches


def _train_epoch(model, train_loader, opt, sched, g, max_shift, teacher, distill_weight,
                 bar, rates: list) -> tuple[float, float]:
    """One pass over ``train_loader``; returns its mean loss and accuracy, and appends the
    learning rate of each batch to ``rates``."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in train_loader:
        images, labels = images_and_labels(batch, "train_loader")
        images = random_shift(images, max_shift, g)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        if teacher is not None:
            with torch.no_grad():
                target = F.log_softmax(teacher(images), 1)
            kl = F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean",
                          log_target=True)
            loss = (1 - distill_weight) * loss + distill_weight * kl
        opt.zero_grad()
        loss.backward()
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}",
                        refresh=False)
        bar.update(1)
    return total_loss / seen, correct / seen


@torch.no_grad()
def predict(model: nn.Module | Callable, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All predictions and labels of ``loader``: ``(predicted, labels)`` int64 tensors.

    ``model`` is a module (put in eval mode) or any callable mapping images to logits, e.g. a
    quantized model's ``quantize_inference``.
    """
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable; got {type(model).__name__}")
    check_iterable_of_batches(loader, "loader")
    if isinstance(model, nn.Module):
        model.eval()
    preds, labels = [], []
    for batch in loader:
        images, y = images_and_labels(batch, "loader")
        logits = model(images)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(y):
            raise ValueError(f"model must map N images to (N, classes) logits; got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else logits!r}"
                             f" for {len(y)} images")
        preds.append(logits.argmax(1))
        labels.append(y)
    if not preds:
        raise ValueError("loader yielded no batches: evaluation needs at least one image")
    return torch.cat(preds), torch.cat(labels)


def evaluate(model: nn.Module | Callable, loader) -> float:
    """Accuracy of ``model`` on ``loader`` as a fraction in [0, 1]."""
    pred, labels = predict(model, loader)
    return (pred == labels).float().mean().item()


#: the format of quantlab's checkpoint files (a dict around the state_dict)


# the statistics, the checkpoints and the tiny GPT's training live in modules of their own; their
# names stay importable from here (quantlab.training.wilson_interval, .pretrained, ...)
from .checkpoints import (  # noqa: E402, F401
    CHECKPOINT_FORMAT,
    load_checkpoint,
    model_config,
    pretrained,
    pretrained_info,
    pretrained_tinygpt,
    save_checkpoint,
    tensors_sha256,
    tinygpt_info,
)
from .lm_training import GPT_RECIPE, LMScore, gpt_lr, perplexity, train_gpt  # noqa: E402, F401
from .stats import (  # noqa: E402, F401
    PairedComparison,
    compare_predictions,
    mcnemar_p_value,
    wilson_interval,
)
