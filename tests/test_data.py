import gzip
import shutil
import time

import pytest
import torch

from quantlab import data


@pytest.fixture(scope="module")
def split():
    return data.embedded_split()


def test_embedded_split_is_stratified_normalized_and_fixed(split):
    x_tr, y_tr, x_te, y_te = split
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert torch.equal(torch.bincount(y_tr), torch.full((10,), 400))
    assert torch.equal(torch.bincount(y_te), torch.full((10,), 100))
    assert x_tr.min().item() == pytest.approx(data.BACKGROUND)
    assert x_tr.max().item() == pytest.approx((1 - data.MEAN) / data.STD)
    # train and test are disjoint images
    tr = {hash(r.numpy().tobytes()) for r in x_tr.flatten(1)}
    assert not any(hash(r.numpy().tobytes()) in tr for r in x_te.flatten(1))
    again = data.embedded_split()
    assert torch.equal(again[1], y_tr) and torch.equal(again[2], x_te)
    # classes are interleaved, not sorted
    assert len(set(y_tr[:50].tolist())) > 5


def test_mnist_loaders_default_and_env(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    train, test = data.mnist_loaders(batch_size=32)
    assert train.dataset.source == "embedded" and len(train.dataset) == 4000
    images, labels = next(iter(train))
    assert images.shape == (32, 1, 28, 28)
    monkeypatch.setenv(data.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="source must be one of"):
        data.mnist_loaders()
    with pytest.raises(ValueError, match="batch_size"):
        data.mnist_loaders("embedded", batch_size=0)


def test_full_mnist_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    # no network: the probe says so at once (no download is attempted, so nothing waits)
    monkeypatch.setattr(data, "_network_reachable", lambda timeout=3.0: False)
    with pytest.raises(RuntimeError, match="put the four IDX files") as e:
        data.mnist_loaders("full", root=tmp_path)
    assert "source='embedded'" in str(e.value)
    monkeypatch.setenv(data.ENV_VAR, "full")
    with pytest.raises(RuntimeError, match="cannot be downloaded"):
        data.mnist_loaders(root=tmp_path)


def test_network_probe_is_quick():
    start = time.perf_counter()
    data._network_reachable(timeout=1.0)
    assert time.perf_counter() - start < 1.0 + 10  # the timeout bounds it (slack for a loaded CPU)


def test_official_test_set(official_mnist_root):
    ds = data.official_test_set(official_mnist_root)
    images, labels = ds.tensors
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert torch.equal(torch.bincount(labels), torch.tensor(
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]))
    assert abs(images.mean().item()) < 0.05


def test_official_test_set_raw_files_and_bad_files(official_mnist_root, tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(official_mnist_root / (name + ".gz")) as src, \
                open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    raw = data.official_test_set(tmp_path)
    gz = data.official_test_set(official_mnist_root)
    assert torch.equal(raw.tensors[0], gz.tensors[0])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="bytes, expected 10008"):
        data.official_test_set(tmp_path)
    bad = tmp_path / "gz"
    bad.mkdir()
    shutil.copy(official_mnist_root / "t10k-images-idx3-ubyte.gz", bad)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum"):
        data.official_test_set(bad)


def test_official_test_set_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.official_test_set(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds neither"):
        data.official_test_set(tmp_path)


def test_full_mnist_from_files_in_the_data_folder(official_mnist_root, tmp_path):
    # stand-in files: the official t10k set under both the train and the test names, gzipped
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            shutil.copy(official_mnist_root / f"t10k-{kind}-ubyte.gz",
                        raw / f"{split}-{kind}-ubyte.gz")
    train, test = data.mnist_loaders("full", batch_size=100, root=tmp_path)
    assert train.dataset.source == "full" and len(train.dataset) == len(test.dataset) == 10000
    images, labels = next(iter(test))
    official = data.official_test_set(official_mnist_root)
    torch.testing.assert_close(images, official.tensors[0][:1000])
    assert torch.equal(labels, official.tensors[1][:1000])


def test_portable_random_numbers_are_torchs_and_the_same_under_other_kernels():
    # notebook e's input and conv weights: torch.randn's and Conv2d's numbers (to 1e-6 and, on
    # AVX2/AVX-512, exactly), with the generator left in the same state, and bit-identical when
    # ATen runs its default (non-vector) kernels, where torch's own differ in the last bits
    import subprocess
    import sys

    from quantlab.data import portable_init, portable_randn

    torch.manual_seed(0)
    want_x, want_conv, want_next = torch.randn(64, 16), torch.nn.Conv2d(3, 8, 3), torch.rand(4)
    torch.manual_seed(0)
    x = portable_randn(64, 16)
    with portable_init():
        conv = torch.nn.Conv2d(3, 8, 3)
    assert torch.equal(torch.rand(4), want_next)
    assert (x - want_x).abs().max() < 1e-5
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(conv.weight, want_conv.weight) and torch.equal(conv.bias, want_conv.bias)
    code = ("import torch\nfrom quantlab.data import portable_init, portable_randn\n"
            "torch.manual_seed(0)\nx = portable_randn(64, 16)\n"
            "with portable_init():\n    c = torch.nn.Conv2d(3, 8, 3)\n"
            "print([v.hex() for v in x.flatten().double().tolist() + c.weight.flatten().double().tolist()])")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, **extra}).stdout
            for extra in ({}, {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"})]
    assert runs[0] == runs[1] and len(runs[0]) > 1000
    with pytest.raises(ValueError, match="multiple of 16"):
        portable_randn(3, 5)
