"""Checkpoints: a model's tensors saved with their SHA-256 and configuration, loaded and verified;
the float models shipped inside the package (``pretrained``), with what they were trained with and
measured. Taught in notebook ``c_train_and_test``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib

import torch
from torch import nn

from ._validate import (
    check_bool,
)
from .models import MODELS
from .modules import QModule
from .observer import QParam

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"

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
    keys (missing and unexpected ones are named), and every tensor's shape (each mismatch is
    named). A refused checkpoint leaves ``model`` unchanged: nothing is copied into it unless every
    check passes (the tensors are first loaded into a copy of the model).

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
    # torch's load_state_dict copies every tensor that fits before it raises for one that does
    # not (a shape mismatch): try a copy of the model first, so a refused file changes nothing
    try:
        copy.deepcopy(model).load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"{str(e).strip()[:600]}") from e
    model.load_state_dict(state, strict=strict)
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
