"""The pinned corpus of the transformer lessons: checksum, split, encoding, windows."""

import sys

import pytest
import torch

from quantlab import text


def test_corpus_is_pinned_and_split_by_position():
    corpus = text.load_corpus()
    assert len(corpus.vocab) == 103 and corpus.vocab == sorted(corpus.vocab)
    assert (len(corpus.train), len(corpus.val)) == (418_473, 46_497)
    raw = text.corpus_text()
    assert len(raw) == 464_970
    assert text.decode(corpus.val[:50], corpus.vocab) == raw[418_473:418_523]


def test_corpus_equals_pydoc_data_of_python_3_11_7():
    if sys.version_info[:3] != (3, 11, 7):
        pytest.skip("the shipped corpus is pydoc_data.topics of CPython 3.11.7")
    import pydoc_data.topics
    assert text.corpus_text() == "".join(pydoc_data.topics.topics.values())


def test_a_changed_corpus_file_fails_its_checksum(tmp_path, monkeypatch):
    import lzma
    bad = tmp_path / "c.xz"
    bad.write_bytes(lzma.compress(b"not the corpus"))
    monkeypatch.setattr(text, "CORPUS_FILE", bad)
    with pytest.raises(ValueError, match="checksum"):
        text.corpus_text()


def test_encode_decode_round_trip_and_errors():
    vocab = text.vocabulary("hello world")
    ids = text.encode("low", vocab)
    assert text.decode(ids, vocab) == "low"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        text.encode("xyz", vocab)
    with pytest.raises(ValueError, match="ids must be ints"):
        text.decode([99], vocab)


def test_windows_do_not_overlap_and_cover_the_val_split():
    ids = torch.arange(46_497)
    w = text.windows(ids, 128)
    assert w.shape == (363, 129)
    assert torch.equal(w[1:, 0], w[:-1, -1])  # each window starts where the last one's targets end
    targets = w[:, 1:].reshape(-1)
    assert len(targets.unique()) == len(targets) == 46_464


def test_random_batch_is_seeded_and_shifted_by_one():
    ids = torch.arange(1000)
    x, y = text.random_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    x2, _ = text.random_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, x + 1)

