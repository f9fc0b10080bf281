"""The tiny GPT of lessons i and j: its training recipe (AdamW, warm-up and cosine) and perplexity on
non-overlapping windows of the validation text. Taught in notebooks ``i_low_bit_weights`` and
``j_gptq_awq``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._validate import (
    check_bool,
    check_int,
)

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
