import copy
import os
import pathlib
import warnings
from collections.abc import Mapping

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a failure there is then reproducible, not a flake);
# locally hypothesis explores new examples on every run
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL_MNIST = ROOT.parent / "shared" / "data" / "mnist"

# torch.ao's quantized dtypes and engines are deprecated in favour of torchao; they remain the best
# available oracle for bit-exact tests, so their warnings are silenced here explicitly.
for _message in (".*quantized tensor creation functions.*", ".*quantized dtypes are deprecated.*",
                 ".*torch.ao.quantization is deprecated.*"):
    warnings.filterwarnings("ignore", message=_message)

# `make test` runs pytest-xdist with two workers on two cores: one thread each, else two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def official_mnist_root():
    if not (OFFICIAL_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"official MNIST test set not found at {OFFICIAL_MNIST}")
    return OFFICIAL_MNIST


@pytest.fixture(scope="session")
def embedded():
    """The embedded MNIST split (x_train, y_train, x_test, y_test), loaded once per session."""
    from quantlab.data import embedded_split

    return embedded_split()


class LazyNets(Mapping):
    """A read-only mapping that builds each value on first access (a test that needs one model
    does not pay for four)."""

    def __init__(self, keys, build):
        self._keys, self._build, self._cache = tuple(keys), build, {}

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._cache:
            self._cache[key] = self._build(key)
        return self._cache[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


NET_KEYS = [(name, pc) for name in ("net", "netbn") for pc in (False, True)]


@pytest.fixture(scope="session")
def calibrated_nets(embedded):
    """8-bit QuantizedNets of the shipped Net/NetBN checkpoints, calibrated on the embedded training
    digits and not frozen, keyed (name, per_channel). Shared by the session: deep-copy before changing."""
    from quantlab.models import quantize_model
    from quantlab.training import pretrained

    def build(key):
        name, per_channel = key
        return quantize_model(pretrained(name), 8, per_channel=per_channel).calibrate([embedded[0]])

    return LazyNets(NET_KEYS, build)


@pytest.fixture(scope="session")
def frozen_nets(calibrated_nets):
    """`calibrated_nets`, frozen (qnnpack's multiplier formula). Shared by the session: do not change them."""
    return LazyNets(NET_KEYS, lambda key: copy.deepcopy(calibrated_nets[key]).freeze())


@pytest.fixture(scope="module")
def loaders(embedded):
    """(shuffled train loader, test loader) over the embedded split, new for each test module: the
    train loader's generator is seeded here, and train() re-seeds it, so a module's results do not
    depend on what ran before it."""
    from torch.utils.data import DataLoader, TensorDataset

    x_tr, y_tr, x_te, y_te = embedded
    train_loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    return train_loader, DataLoader(TensorDataset(x_te, y_te), batch_size=1000)
