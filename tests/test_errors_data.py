"""Bad inputs to data, training and checkpoints: TypeError/ValueError naming the argument or the
file; corrupt checkpoints and data files give the documented ValueError."""

import gzip
import pathlib

import pytest
import torch
from bad_input import bad_input_test
from torch.utils.data import DataLoader, TensorDataset

from quantlab import data, training
from quantlab.models import Net, NetBN, quantize_model
from quantlab.training import evaluate, load_checkpoint, predict, save_checkpoint, train

T, V = TypeError, ValueError
IMAGES = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(8) % 10
LOADER = DataLoader(TensorDataset(IMAGES, LABELS), batch_size=4)


def _net():
    torch.manual_seed(0)
    return Net()


CASES = {
    "train": [
        (lambda: train(None, LOADER, 1), T, "model"),
        (lambda: train(_net(), IMAGES, 1), T, "train_loader"),
        (lambda: train(_net(), None, 1), T, "train_loader"),
        (lambda: train(_net(), [], 1), V, "train_loader"),
        (lambda: train(_net(), [IMAGES], 1, progress=False), T, "train_loader"),
        (lambda: train(_net(), [(IMAGES[:2], IMAGES[2:4])], 1, progress=False), T, "train_loader"),
        (lambda: train(_net(), LOADER, 0), V, "epochs"),
        (lambda: train(_net(), LOADER, 1.0), T, "epochs"),
        (lambda: train(_net(), LOADER, True), T, "epochs"),
        (lambda: train(_net(), LOADER, 1, lr=0), V, "lr"),
        (lambda: train(_net(), LOADER, 1, lr="fast"), T, "lr"),
        (lambda: train(_net(), LOADER, 1, lr=float("nan")), V, "lr"),
        (lambda: train(_net(), LOADER, 1, max_shift=-1), V, "max_shift"),
        (lambda: train(_net(), LOADER, 1, max_shift=1.5), T, "max_shift"),
        (lambda: train(_net(), LOADER, 1, weight_decay=-1.0), V, "weight_decay"),
        (lambda: train(_net(), LOADER, 1, seed="0"), T, "seed"),
        (lambda: train(_net(), LOADER, 1, progress="no"), T, "progress"),
        (lambda: train(_net(), LOADER, 1, eval_loader=IMAGES), T, "eval_loader"),
    ],
    "evaluate/predict": [
        (lambda: evaluate(_net(), IMAGES), T, "loader"),
        (lambda: evaluate(_net(), []), V, "loader"),
        (lambda: evaluate(_net(), [IMAGES]), T, "loader"),
        (lambda: evaluate(_net(), [(IMAGES, IMAGES)]), T, "loader"),
        (lambda: evaluate(_net(), [(IMAGES, LABELS[:3])]), V, "loader"),
        (lambda: predict(None, LOADER), T, "model"),
        (lambda: predict(lambda x: x.sum(), LOADER), V, "model"),
        (lambda: training.random_shift(IMAGES, -1, torch.Generator()), V, "max_shift"),
        (lambda: training.random_shift(IMAGES[0], 2, torch.Generator()), V, "x"),
    ],
    "pretrained": [
        (lambda: training.pretrained("resnet"), V, "name"),
        (lambda: training.pretrained(None), V, "name"),
        (lambda: training.pretrained(["net"]), V, "name"),
        (lambda: training.pretrained_info(3), V, "name"),
    ],
    "checkpoints": [
        (lambda: save_checkpoint(None, "x.pt"), T, "model"),
        (lambda: load_checkpoint(None, "x.pt"), T, "model"),
        (lambda: load_checkpoint(Net(), None), T, "path"),
        (lambda: load_checkpoint(Net(), "x.pt", sha256=123), T, "sha256"),
        (lambda: load_checkpoint(Net(), "x.pt", sha256="abc"), V, "sha256"),
        (lambda: load_checkpoint(Net(), "x.pt", strict="yes"), T, "strict"),
    ],
    "data": [
        (lambda: data.mnist_loaders(source="kaggle"), V, "source"),
        (lambda: data.mnist_loaders(source=3), V, "source"),
        (lambda: data.mnist_loaders(batch_size=0), V, "batch_size"),
        (lambda: data.mnist_loaders(batch_size=2.0), V, "batch_size"),
        (lambda: data.mnist_loaders(seed=-1), V, "seed"),
        (lambda: data.full_mnist(root=None), T, "root"),
        (lambda: data.full_mnist(root="nowhere", download="no"), T, "download"),
        (lambda: data.official_test_set(None), T, "root"),
        (lambda: data.official_test_set("/nonexistent/folder"), FileNotFoundError, "root"),
        (lambda: data.normalize(None), T, "pixels"),
        (lambda: data.normalize(torch.zeros(5)), V, "pixels"),
        (lambda: data.resolve_source("full-mnist"), V, "source"),
        (lambda: data.embedded_split(seed=-3), V, "seed"),
    ],
}

test_bad_input_raises_naming_the_argument = bad_input_test(CASES)


# -- checkpoints --------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    net = _net()
    path = tmp_path / "net.pt"
    sha = save_checkpoint(net, path)
    return net, path, sha


def test_round_trip_and_upper_case_sha256(saved):
    net, path, sha = saved
    loaded = load_checkpoint(Net(), path, sha256=sha.upper())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 loaded.state_dict().values()))


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "half"])
def test_empty_truncated_or_corrupt_file_is_a_value_error(saved, damage):
    _, path, _ = saved
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[:100], "garbage": b"not a checkpoint" * 10,
                      "half": raw[: len(raw) // 2]}[damage])
    with pytest.raises(ValueError, match=str(path.name)):
        load_checkpoint(Net(), path)


def test_a_flipped_byte_without_a_file_checksum_is_caught(saved):
    net, path, _ = saved
    raw = bytearray(path.read_bytes())
    # flip one byte inside conv1.weight's data (found by its value bytes)
    needle = net.conv1.weight.detach().reshape(-1)[:4].numpy().tobytes()
    at = bytes(raw).index(needle) + 1
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256 of its tensors"):
        load_checkpoint(Net(), path)


def test_a_checkpoint_of_another_configuration_is_refused_naming_it(tmp_path):
    q8 = quantize_model(_net(), 8, per_channel=True).calibrate([IMAGES]).freeze()
    save_checkpoint(q8, tmp_path / "q8.pt")
    with pytest.raises(ValueError, match="num_bits=8.*num_bits=4|num_bits=4.*num_bits=8"):
        load_checkpoint(quantize_model(Net(), 4, per_channel=True), tmp_path / "q8.pt")
    with pytest.raises(ValueError, match="per_channel"):
        load_checkpoint(quantize_model(Net(), 8, per_channel=False), tmp_path / "q8.pt")
    with pytest.raises(ValueError, match="fixed_point"):
        load_checkpoint(quantize_model(Net(), 8, fixed_point=True), tmp_path / "q8.pt")
    fresh = load_checkpoint(quantize_model(Net(), 8, per_channel=True), tmp_path / "q8.pt")
    assert fresh.frozen
    assert torch.equal(fresh.quantize_inference(IMAGES), q8.quantize_inference(IMAGES))


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    state = _net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "plain.pt")  # a plain state_dict file (no quantlab wrapper)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['extra.weight'\]"):
        load_checkpoint(Net(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['bn1"):
        load_checkpoint(NetBN(), tmp_path / "plain.pt")
    load_checkpoint(Net(), tmp_path / "plain.pt", strict=False)


# -- data files ---------------------------------------------------------------------------------
def _idx_labels(values) -> bytes:
    return (0x801).to_bytes(4, "big") + len(values).to_bytes(4, "big") + bytes(values)


def _idx_images(n) -> bytes:
    return (0x803).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 \
        + bytes(784 * n)


def _mnist_raw(root: pathlib.Path, labels=(1, 2, 3)) -> pathlib.Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(_idx_images(len(labels)))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    return raw


def test_full_mnist_rejects_labels_outside_0_to_9_naming_the_file(tmp_path):
    _mnist_raw(tmp_path, labels=(1, 12, 3))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds 1 label\(s\) outside"):
        data.full_mnist(tmp_path, download=False)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:10], "shorter than its"),
    (lambda b: b"\x00\x00\x09\x99" + b[4:], "magic number"),
    (lambda b: b[:-5], "truncated or padded"),
])
def test_malformed_idx_names_the_file(tmp_path, damage, match):
    raw = _mnist_raw(tmp_path)
    f = raw / "t10k-images-idx3-ubyte"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=match) as info:
        data.full_mnist(tmp_path, download=False)
    assert "t10k-images-idx3-ubyte" in str(info.value)


def test_corrupt_gz_leaves_no_half_written_file(tmp_path):
    raw = _mnist_raw(tmp_path)
    f = raw / "train-images-idx3-ubyte"
    good = gzip.compress(f.read_bytes())
    f.unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is not a valid gzip"):
        data.full_mnist(tmp_path, download=False)
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte"])  # no half-written train-images-idx3-ubyte, no temp file
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good)
    train_set, test_set = data.full_mnist(tmp_path, download=False)
    assert len(train_set) == len(test_set) == 3


def test_official_test_set_rejects_a_raw_file_with_the_right_size_but_bad_labels(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_images(10000))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_labels([3] * 9999 + [10]))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds 1 label\(s\) outside"):
        data.official_test_set(tmp_path)
