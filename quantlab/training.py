"""Training, evaluation and checkpoints (seeded and deterministic on the CPU).

Taught in notebook ``c_train_and_test``. ``train`` works unchanged on the fake-quantized models of
quantization-aware training: a model may carry its own ``default_lr`` and ``default_augment``.
"""

from __future__ import annotations

import fractions
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Callable
from typing import NamedTuple

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
from .models import MODELS
from .modules import QModule
from .observer import QParam

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
        eval_loader: when given, the accuracy on it is recorded after every epoch.
        teacher: a trained model to distil from (Hinton et al. 2015), e.g. the float model of a
            QAT model: the loss becomes ``(1 - w) CE(logits, labels) + w KL(softmax(teacher) ||
            softmax(logits))`` with ``w = distill_weight`` (in [0, 1]); the teacher is frozen.
    Returns:
        ``{"loss": [...], "accuracy": [...], "lr": [...]}``, one entry per epoch (training set;
        ``"lr"`` is the rate at each epoch's start), plus ``"eval_accuracy"`` when ``eval_loader``
        is given, and ``"lr_end"``: the rate after the last batch (0, the cosine schedule's end).
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
    history = {"loss": [], "accuracy": [], "lr": []}
    if eval_loader is not None:
        history["eval_accuracy"] = []
    # one bar for the whole run, refreshed at most once a second: a notebook's progress widget sends
    # messages per bar and per refresh, and a flood of them overflows the kernel's output queue
    # (nbval, which reads the queue only after the cell, then loses the end of the cell)
    bar = tqdm(total=steps, desc=f"epoch 1/{epochs}", disable=not progress, leave=True,
               mininterval=1.0)
    for epoch in range(epochs):
        bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        history["lr"].append(opt.param_groups[0]["lr"])
        loss, accuracy = _train_epoch(model, train_loader, opt, sched, g, max_shift, teacher,
                                      distill_weight, bar)
        history["loss"].append(loss)
        history["accuracy"].append(accuracy)
        if eval_loader is not None:
            history["eval_accuracy"].append(evaluate(model, eval_loader))
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
                 bar) -> tuple[float, float]:
    """One pass over ``train_loader``; returns its mean loss and accuracy."""
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
CHECKPOINT_FORMAT = "quantlab-checkpoint/1"


def tensors_sha256(state: dict) -> str:
    """sha256 over a state_dict's keys, dtypes, shapes and tensor bytes (in key order)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f"state must be a dict of tensors (a state_dict); got {type(state).__name__}")
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_config(model: nn.Module) -> dict:
    """What a state_dict's integers depend on beyond its tensors: the model class, and per
    QParam its bits/signedness/symmetry/axis, per quantized layer per_channel/fixed_point/relu."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    config = {"class": type(model).__name__}
    for name, m in model.named_modules():
        if isinstance(m, QParam):
            config[f"{name}"] = (f"num_bits={m.num_bits}, signed={m.signed}, "
                                 f"symmetric={m.symmetric}, axis={m.axis}")
        elif isinstance(m, QModule) and hasattr(m, "per_channel"):
            config[f"{name}"] = (f"per_channel={m.per_channel}, fixed_point={m.fixed_point}, "
                                 f"relu={m.relu}")
    return config


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``correct / total`` (95% for the default ``z``).

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct/total``:
    unlike ``p -/+ z sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not empty at 0% or 100%.
    On 1,000 test digits at 98% it is about [97.0%, 98.7%]. It describes one accuracy; two models
    scored on the same digits are compared with :func:`compare_predictions`. Taught in notebook
    ``c_train_and_test``.
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


class PairedComparison(NamedTuple):
    """Two models compared on the same test digits (see :func:`compare_predictions`).

    ``only_a``: digits ``a`` classifies right and ``b`` wrong; ``only_b``: the reverse;
    ``p_value``: McNemar's exact two-sided p-value; ``verdict``: ``"better"`` (``a`` beats ``b``
    at the level ``alpha``), ``"worse"`` or ``"no measurable difference"``.
    """

    only_a: int
    only_b: int
    p_value: float
    verdict: str

    def __str__(self) -> str:
        return (f"{self.verdict} (right only in a: {self.only_a}, right only in b: {self.only_b}, "
                f"McNemar exact p = {self.p_value:.3g})")


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value for ``only_a`` digits that only model a gets right and
    ``only_b`` that only model b gets right.

    Digits both get right or both get wrong say nothing about which is better; under "neither is
    better" each of the ``n = only_a + only_b`` discordant digits is a fair coin, so the p-value is
    ``min(1, 2 P(X <= min(only_a, only_b)))`` for ``X ~ Binomial(n, 1/2)`` (1 when ``n = 0``),
    which is what ``scipy.stats.binomtest(only_a, n).pvalue`` computes. Exact integers: no
    normal approximation, so it is right for the handful of digits quantization moves.
    """
    for value, name in ((only_a, "only_a"), (only_b, "only_b")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (a count of digits); got {value!r}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(fractions.Fraction(2 * tail, 2 ** n)))


def compare_predictions(pred_a, pred_b, labels, alpha: float = 0.05) -> PairedComparison:
    """Is model a better than model b on the same test digits? McNemar's exact test.

    ``pred_a``, ``pred_b``: each model's predicted classes (as :func:`predict` returns them);
    ``labels``: the true classes, all three the same length. The two models are compared digit
    by digit: only the digits where exactly one of them is right count (the *discordant* digits),
    and a model is ``"better"`` only when the exact test rejects "neither is better" at the level
    ``alpha`` (5%) and it has more of them. This is the series' one rule for "better"; a 95%
    interval (:func:`wilson_interval`) stays the way to report one accuracy. Two models whose
    intervals overlap can still differ measurably: this paired test uses that both saw the same
    digits.
    """
    def as_labels(x, name):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
        else:
            try:
                t = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"{name} must be a 1-D tensor or array of class indices; got "
                                f"{type(x).__name__}") from err
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of class indices; got dtype "
                             f"{t.dtype} and shape {tuple(t.shape)}")
        return t.long()

    a, b, y = as_labels(pred_a, "pred_a"), as_labels(pred_b, "pred_b"), as_labels(labels, "labels")
    if not len(a) == len(b) == len(y) or len(y) == 0:
        raise ValueError(f"pred_a, pred_b and labels must have the same length > 0 (the same test "
                         f"digits); got {len(a)}, {len(b)} and {len(y)}")
    alpha = check_real(alpha, "alpha", 0.0, 1.0, low_open=True, high_open=True)
    right_a, right_b = a == y, b == y
    only_a = int((right_a & ~right_b).sum())
    only_b = int((right_b & ~right_a).sum())
    p = mcnemar_p_value(only_a, only_b)
    verdict = ("no measurable difference" if p >= alpha or only_a == only_b
               else "better" if only_a > only_b else "worse")
    return PairedComparison(only_a, only_b, p, verdict)


def save_checkpoint(model: nn.Module, path) -> str:
    """Save ``model.state_dict()`` with a sha256 of its tensors and the model's configuration
    (see :func:`model_config`); returns the file's sha256."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state,
                "tensors_sha256": tensors_sha256(state), "config": model_config(model)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_sha256_text(sha256) -> str:
    if not isinstance(sha256, str):
        raise TypeError(f"sha256 must be None or a hex string; got {type(sha256).__name__}")
    text = sha256.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"sha256 must be 64 hexadecimal digits (upper or lower case); got "
                         f"{sha256!r}")
    return text


def load_checkpoint(model: nn.Module, path, sha256: str | None = None,
                    strict: bool = True) -> nn.Module:
    """Load a checkpoint saved by :func:`save_checkpoint` (or a plain state_dict file) into
    ``model`` (weights_only=True).

    Verified before anything is loaded: the file's sha256 when given (upper or lower case), the
    sha256 of the tensors stored inside quantlab's checkpoints (a flipped byte is caught even
    without ``sha256``; a plain state_dict file carries none), the stored configuration against
    ``model``'s (bits, per-channel, fixed point: the mismatch is named), and with ``strict`` the
    keys (missing and unexpected ones are named).

    Raises:
        FileNotFoundError: no such file. ValueError: an empty, truncated, corrupt,
        checksum-failing or mismatched checkpoint. TypeError: wrong argument types.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    strict = check_bool(strict, "strict")
    expected = None if sha256 is None else _check_sha256_text(sha256)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    if expected is not None:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(f"checkpoint {path} fails its checksum (sha256 {actual}, expected "
                             f"{expected}): the file is corrupt or was replaced")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, corrupt pickle, ...: all mean an unreadable file
        raise ValueError(f"checkpoint {path} is not a readable PyTorch state_dict "
                         f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from e
    state = _unpack_checkpoint(obj, path, model)
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"{len(missing)} missing key(s) {missing[:6]}, {len(unexpected)} "
                         f"unexpected key(s) {unexpected[:6]}")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"{str(e).strip()[:600]}") from e
    return model


def _unpack_checkpoint(obj, path, model) -> dict:
    """The state_dict inside a quantlab checkpoint (verified) or a plain state_dict file."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        state = obj.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise ValueError(f"checkpoint {path} is corrupt: its state_dict is not a dict of "
                             "tensors")
        if tensors_sha256(state) != obj.get("tensors_sha256"):
            raise ValueError(f"checkpoint {path} is corrupt: the sha256 of its tensors does not "
                             "match the one stored at saving (a changed byte)")
        stored, now = obj.get("config") or {}, model_config(model)
        diff = [f"{k}: checkpoint {stored.get(k)!r}, model {now.get(k)!r}"
                for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        if diff:
            raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: it was "
                             "saved from a model of another configuration: " + "; ".join(diff[:4]))
        return state
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"checkpoint {path} is not a state_dict (a dict of tensors)")
    return obj


def _checksums() -> dict:
    return json.loads((WEIGHTS_DIR / "checksums.json").read_text())


def pretrained(name: str = "net") -> nn.Module:
    """The trained float model shipped inside the package, verified by checksum, in eval mode.

    Args:
        name: ``"net"`` (:class:`~quantlab.models.Net`), ``"netbn"`` (``NetBN``) or
            ``"resnet"`` (``ResNet``).
    """
    if not isinstance(name, str) or name not in MODELS:
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
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}; got {name!r}")
    return _checksums()[name]



# ---- the tiny GPT of lessons i and j (character-level language model) ----

#: the recipe of the shipped ``tinygpt.pt`` (make weights): AdamW (Loshchilov & Hutter 2019) with
#: GPT-style settings, 1,500 steps of 16 x 128 characters (3.07M characters, ~7.3 epochs)
GPT_RECIPE = {"steps": 1500, "batch_size": 16, "context": 128, "lr": 2e-3, "min_lr": 2e-4,
              "warmup": 50, "weight_decay": 0.1, "betas": (0.9, 0.95), "grad_clip": 1.0, "seed": 0}


def gpt_lr(step: int, recipe: dict = GPT_RECIPE) -> float:
    """The learning rate at ``step`` (0-based): linear warm-up to ``lr`` over ``warmup`` steps,
    then a cosine from ``lr`` down to ``min_lr`` at the last step."""
    lr, min_lr, warmup, steps = recipe["lr"], recipe["min_lr"], recipe["warmup"], recipe["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def train_gpt(model: nn.Module, train_ids: torch.Tensor, recipe: dict | None = None,
              progress: bool = True) -> dict:
    """Train a language model on random windows of ``train_ids`` with ``recipe``
    (:data:`GPT_RECIPE` when None); return ``{"loss": [...], "lr": [...]}`` per step.

    AdamW with weight decay on the Linear weights only (not on embeddings, LayerNorms, biases),
    gradients clipped to norm ``grad_clip``, batches drawn by a generator seeded with ``seed``
    (torch is seeded too): training twice gives the same weights on one machine.
    """
    from .text import random_batch
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    recipe = {**GPT_RECIPE, **(recipe or {})}
    unknown = sorted(set(recipe) - set(GPT_RECIPE))
    if unknown:
        raise ValueError(f"recipe has unknown keys {unknown}; accepted: {sorted(GPT_RECIPE)}")
    steps = check_int(recipe["steps"], "recipe['steps']", 1)
    progress = check_bool(progress, "progress")
    torch.manual_seed(recipe["seed"])
    g = torch.Generator().manual_seed(recipe["seed"])
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=recipe["lr"], betas=tuple(recipe["betas"]))
    history = {"loss": [], "lr": []}
    bar = tqdm(total=steps, desc="steps", disable=not progress, leave=True, mininterval=1.0)
    model.train()
    for step in range(steps):
        lr = gpt_lr(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = random_batch(train_ids, recipe["batch_size"], recipe["context"], g)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        opt.step()
        history["loss"].append(loss.item())
        history["lr"].append(lr)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    return history


class LMScore(NamedTuple):
    """A language model's score on non-overlapping windows: ``nll`` (mean nats per predicted
    character), ``ppl = exp(nll)``, ``bits_per_char = nll / ln 2``, ``chunk_nll`` (float64, the
    mean NLL of each of the contiguous chunks of windows, for paired comparisons) and
    ``n_predicted`` (characters scored)."""
    nll: float
    ppl: float
    bits_per_char: float
    chunk_nll: torch.Tensor
    n_predicted: int


@torch.no_grad()
def perplexity(model: nn.Module | Callable, ids: torch.Tensor, context: int = 128,
               max_windows: int | None = None, chunks: int = 8, batch_size: int = 64,
               every: int = 1) -> LMScore:
    """Score ``model`` on the non-overlapping ``context``-character windows of ``ids``
    (:func:`quantlab.text.windows`; 363 windows, 46,464 characters of the val split).

    ``every=k`` keeps every k-th window (a faster, noisier estimate spread over the whole split);
    ``max_windows`` then keeps only the first ones. The NLL is summed in
    float64; the windows are split into ``chunks`` contiguous chunks whose mean NLLs are returned
    too: two models scored on the same windows are compared by their per-chunk differences.
    """
    from .text import windows
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable; got {type(model).__name__}")
    context = check_int(context, "context", 1)
    w = windows(ids, context)[::check_int(every, "every", 1)]
    if max_windows is not None:
        w = w[:check_int(max_windows, "max_windows", 1)]
    chunks = check_int(chunks, "chunks", 1, len(w))
    batch_size = check_int(batch_size, "batch_size", 1)
    if isinstance(model, nn.Module):
        model.eval()
    per_window = []
    for batch in w.split(batch_size):
        logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="none")
        per_window.append(nll.view(len(batch), -1).double().sum(1))
    per_window = torch.cat(per_window)
    chunk_nll = torch.stack([c.sum() / (len(c) * context)
                             for c in per_window.tensor_split(chunks)])
    nll = per_window.sum().item() / (len(w) * context)
    return LMScore(nll, math.exp(nll), nll / math.log(2), chunk_nll, len(w) * context)


def pretrained_tinygpt() -> nn.Module:
    """The trained :class:`~quantlab.models.TinyGPT` shipped inside the package (``tinygpt.pt``,
    trained by ``make weights`` with :data:`GPT_RECIPE`), verified by checksum, in eval mode.
    What it was trained with and measured: ``_checksums()["tinygpt"]``."""
    from .models import TinyGPT
    info = _checksums().get("tinygpt")
    if info is None:
        raise FileNotFoundError(f"no tinygpt.pt is shipped in {WEIGHTS_DIR}: train it with "
                                "`python scripts/train_pretrained.py tinygpt`")
    model = TinyGPT(**info["config"])
    load_checkpoint(model, WEIGHTS_DIR / "tinygpt.pt", sha256=info["sha256"])
    return model.eval()


def tinygpt_info() -> dict:
    """What the shipped tiny GPT was trained with and what it measured (see ``make weights``)."""
    return _checksums()["tinygpt"]
