"""The text the tiny GPT reads: Python's own documentation, pinned, and its train/val split.

The corpus is ``"".join(pydoc_data.topics.topics.values())`` of CPython 3.11.7: the help topics
(``help("if")``, ``help("BINARY")``, ...) that every Python installs with its standard library,
464,970 characters over a 103-symbol alphabet. ``pydoc_data`` differs between Python releases
(458,917 characters on 3.10.13, 464,970 on 3.11.7, 492,155 on 3.12.1, 510,586 on 3.13.0), so
quantlab ships this one copy, xz-compressed (95 kB), in ``quantlab/corpus/`` and checks its
sha256 when reading it: the split, the vocabulary and every perplexity are the same on every
supported Python and with no download.

The text is Copyright (c) 2001-2023 Python Software Foundation, distributed under the PSF
License Agreement (``quantlab/corpus/LICENSE-PSF.txt``, copied from the same CPython 3.11.7).

Split by position: the first 90% of the characters is train (418,473), the last 10% val
(46,497). Taught in notebook ``i_low_bit_weights``.
"""

from __future__ import annotations

import hashlib
import lzma
import pathlib
from typing import NamedTuple

import torch

from ._validate import check_int, check_real

CORPUS_FILE = pathlib.Path(__file__).resolve().parent / "corpus" / "pydoc_topics_3.11.7.txt.xz"
#: sha256 of the corpus's UTF-8 bytes (after decompression)
CORPUS_SHA256 = "37d06970fc926e60c16dff401e441b84752446a36b6b64516c229fdec77e992c"
CORPUS_SOURCE = "pydoc_data.topics of CPython 3.11.7 (PSF License Agreement)"
#: the fraction of the characters (the last ones) held out for validation
VAL_FRACTION = 0.1


class Corpus(NamedTuple):
    """The encoded corpus: ``vocab`` (sorted characters), ``train`` and ``val`` int64 ids."""
    vocab: list[str]
    train: torch.Tensor
    val: torch.Tensor


def corpus_text() -> str:
    """The pinned corpus as one string (checksum verified)."""
    data = lzma.decompress(CORPUS_FILE.read_bytes())
    actual = hashlib.sha256(data).hexdigest()
    if actual != CORPUS_SHA256:
        raise ValueError(f"{CORPUS_FILE} fails its checksum (sha256 {actual}, expected "
                         f"{CORPUS_SHA256}): the file is corrupt or was replaced")
    return data.decode("utf-8")


def vocabulary(text: str) -> list[str]:
    """The sorted set of the characters of ``text`` (id = position in this list)."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty str")
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """``text`` as int64 ids into ``vocab``; a character not in ``vocab`` is named."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    index = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"text holds characters not in the vocabulary: {missing[:5]}")
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def decode(ids, vocab: list[str]) -> str:
    """The characters of int ``ids`` (a tensor or a list)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(vocab)]
    if bad:
        raise ValueError(f"ids must be ints in 0..{len(vocab) - 1}; got {bad[0]!r}")
    return "".join(vocab[i] for i in ids)


def split(ids: torch.Tensor, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Split by position: ``(ids[:n_train], ids[n_train:])`` with ``n_train = round((1 -
    val_fraction) * len(ids))``."""
    val_fraction = check_real(val_fraction, "val_fraction", 0.0, 1.0, low_open=True, high_open=True)
    n_train = round((1 - val_fraction) * len(ids))
    return ids[:n_train], ids[n_train:]


def load_corpus() -> Corpus:
    """The pinned corpus encoded and split (train 418,473 ids, val 46,497 ids, vocab 103)."""
    text = corpus_text()
    vocab = vocabulary(text)
    train, val = split(encode(text, vocab))
    return Corpus(vocab, train, val)


def random_batch(ids: torch.Tensor, batch_size: int, context: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``ids``: inputs (B, context) and the next characters
    (B, context), the inputs shifted by one."""
    batch_size = check_int(batch_size, "batch_size", 1)
    context = check_int(context, "context", 1, len(ids) - 1)
    start = torch.randint(0, len(ids) - context, (batch_size,), generator=generator)
    rows = start[:, None] + torch.arange(context + 1)[None, :]
    window = ids[rows]
    return window[:, :-1], window[:, 1:]


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows for evaluation, (n, context + 1): window i is
    ``ids[i*context : i*context + context + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), so
    every id after the first is predicted at most once; ``n = (len(ids) - 1) // context``."""
    context = check_int(context, "context", 1)
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"ids holds {len(ids)} ids: too few for one window of context {context}")
    rows = torch.arange(n)[:, None] * context + torch.arange(context + 1)[None, :]
    return ids[rows]
