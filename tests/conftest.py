import os
import pathlib
import warnings

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

torch.set_num_threads(2)


@pytest.fixture
def official_mnist_root():
    if not (OFFICIAL_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"official MNIST test set not found at {OFFICIAL_MNIST}")
    return OFFICIAL_MNIST
