"""Grading in two processes: the learner's code runs in a child the grade cannot be reached from.

``python -m quantlab.check`` grades each notebook like this. The parent process holds everything
that decides a grade: the oracles, the cases (hypothesis draws them), the comparisons and the
report. The child imports the learner's notebook and does one thing: call a function on the
arguments the parent sends and send back what it returned or raised. So a notebook that replaces
the checker's functions, patches torch or quantlab, prints a forged result, or exits early can only
change its own answers; those are still compared with oracles it cannot touch.

The two talk over a pair of pipes (not stdin/stdout, which the learner's code may use), one JSON
message per line, in a data-only encoding (:func:`encode` / :func:`decode`: tensors as dtype,
shape and bytes; no pickle, which would run the child's code in the parent). Every read and write
has the notebook's deadline; at the deadline, or when the child ends early, the child's process
group is killed and the notebook is reported with what happened.

On Linux the child is forked from a fork server that has imported torch and the checks once
(:mod:`quantlab.forkserver`) instead of being started afresh, seconds faster per notebook; the
notebook's time limit starts once its process exists.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import forkserver
from .calls import (
    Raised,
    Returned,
    call_function,
    exercise_calls,
    imported_exercises,
    library_functions,
)

#: the most bytes one message may hold (a tensor of 50M float32 values, base64-encoded)
MAX_MESSAGE = 300_000_000


# -- the data-only encoding ----------------------------------------------------------------------

class Opaque:
    """A value the encoding does not carry (a module, a generator, ...): its type name and repr."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _opaque_type(name: str) -> type:
    safe = name if name.isidentifier() else "object"
    return type(safe, (Opaque,), {})


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def encode(v):
    """A JSON-ready form of ``v``: None, bool, int, float, str, list, tuple, dict, torch tensors,
    NumPy arrays and scalars exactly (dtype, shape and bytes); anything else by type name and
    repr."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, tuple):
        return {"$": "tuple", "items": [encode(x) for x in v]}
    if isinstance(v, dict):
        return {"$": "dict", "items": [[encode(k), encode(x)] for k, x in v.items()]}
    try:
        if isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_quantized:
            return {"$": "tensor", "dtype": str(v.dtype).replace("torch.", ""),
                    "shape": list(v.shape), "data": base64.b64encode(_tensor_bytes(v)).decode()}
        if isinstance(v, (np.ndarray, np.generic)) and v.dtype.kind in "biufc":
            a = np.ascontiguousarray(v).reshape(v.shape) if isinstance(v, np.ndarray) else np.asarray(v)
            return {"$": "ndarray" if isinstance(v, np.ndarray) else "npscalar",
                    "dtype": a.dtype.str, "shape": list(a.shape),
                    "data": base64.b64encode(a.tobytes()).decode()}
    except (RuntimeError, TypeError, ValueError):
        pass
    try:
        text = repr(v)[:300]
    except Exception:  # a learner's object whose repr raises
        text = f"<{type(v).__name__}>"
    return {"$": "object", "type": type(v).__name__, "repr": text}


def decode(v):
    """The value :func:`encode` described (an :class:`Opaque` for what it could not carry).
    Builds only data: nothing in the message is executed."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not isinstance(v, dict) or "$" not in v:
        raise ValueError(f"not a message value: {str(v)[:100]}")
    kind = v["$"]
    if kind == "tuple":
        return tuple(decode(x) for x in v["items"])
    if kind == "dict":
        return {decode(k): decode(x) for k, x in v["items"]}
    if kind == "tensor":
        dtype = getattr(torch, str(v["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {v['dtype']!r}")
        shape = [int(s) for s in v["shape"]]
        data = base64.b64decode(v["data"])
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone()
    if kind in ("ndarray", "npscalar"):
        a = np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(str(v["dtype"])))
        a = a.reshape([int(s) for s in v["shape"]]).copy()
        return a if kind == "ndarray" else a[()]
    if kind == "object":
        return _opaque_type(str(v["type"]))(str(v["repr"]))
    raise ValueError(f"unknown value kind {kind!r}")


# -- the child: import the notebook, then answer calls ------------------------------------------

def _virtual_memory_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def limit_memory(memory_mb: float | None) -> None:
    """Let this process map at most ``memory_mb`` MB more than it has now (RLIMIT_AS, where the
    system has it): a notebook that allocates beyond it gets a MemoryError instead of the machine's
    memory."""
    if not memory_mb:
        return
    try:
        import resource
    except ImportError:  # not on this system (Windows): no limit
        return
    now = _virtual_memory_bytes()
    if now is None:
        return
    limit = now + int(memory_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def preload() -> None:
    """What every notebook's process imports before the notebook (the fork server's imports, see
    :mod:`quantlab.forkserver`): torch on one thread, the exercises, IPython and import-ipynb."""
    from .exercise_checks import all_exercises
    from .notebook_import import preload as preload_notebook_import

    torch.set_num_threads(1)
    all_exercises()
    preload_notebook_import()


def serve(path: str, lesson: str, fds: str, memory_mb: float | None = None) -> int:
    """The child's side (``python -m quantlab.check --serve NB --lesson L --fds R,W``)."""
    from .exercise_checks import all_exercises
    from .notebook_import import import_notebook

    torch.set_num_threads(1)
    read_fd, write_fd = (int(x) for x in fds.split(","))
    requests, replies = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")

    def send(msg: dict) -> None:
        replies.write(json.dumps(msg).encode() + b"\n")
        replies.flush()

    lessons = all_exercises()
    own = [ex.name for ex in lessons.get(lesson, [])]
    exercises = {ex.id: ex for exs in lessons.values() for ex in exs}  # another lesson's too (blame)
    limit_memory(memory_mb)
    namespace, error = import_notebook(path)
    defined = [name for name in own if callable(namespace.get(name))]
    imported = imported_exercises(namespace, {k: [ex.name for ex in v] for k, v in lessons.items()})
    send({"op": "ready", "error": error, "defined": defined, "imported": imported,
          "library": library_functions(namespace, own),
          "uses": exercise_calls(namespace, own + list(imported))})
    for line in requests:
        msg = json.loads(line)
        if msg.get("op") != "call":
            break
        ex = exercises[msg["id"]]
        outcome = call_function(ex, namespace.get(ex.name), decode(msg["args"]))
        if isinstance(outcome, Returned):
            send({"op": "returned", "value": encode(outcome.value)})
        else:
            send({"op": "raised", **outcome.__dict__})
    sys.stdout.flush()
    os._exit(0)  # do not wait for threads the notebook left running


# -- the parent: start the child, send calls, read answers --------------------------------------

def _start(argv: list, env: dict, req_r: int, rep_w: int):
    """The child ``python -m quantlab.check ARGV --fds R,W``: forked from this process's fork server
    where there is one (:mod:`quantlab.forkserver`: it has imported torch and the checks already),
    else started afresh. Either way a process of its own, in a session of its own, with the pipes
    and nothing else of ours; a ``subprocess.Popen`` or a :class:`forkserver.ForkedProcess`."""
    check = [sys.executable, "-m", "quantlab.check"]
    server = forkserver.shared(check + ["--fork-server"], env)
    if server is not None:
        try:
            return server.popen(argv + ["--fds", "3,4"], env, pass_fds=(req_r, rep_w))
        except forkserver.ForkServerError:
            pass
    return subprocess.Popen(check + argv + ["--fds", f"{req_r},{rep_w}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            pass_fds=(req_r, rep_w), env=env, start_new_session=True)


class SandboxError(Exception):
    """The child timed out, ended early or sent something that is not a message."""


@dataclass
class Ready:
    error: str | None
    defined: list
    #: exercise name -> the other exercises' functions it calls (hints only: not trusted for grades)
    uses: dict
    #: function name -> lesson, for functions imported from another exercise notebook (hints only)
    imported: dict = None
    #: exercises whose function is quantlab's own (marked in the report)
    library: list = None


class Sandbox:
    """A child process that imported one notebook; :meth:`call` runs one of its functions there.

    Use as a context manager; every operation raises :class:`SandboxError` after ``timeout``
    seconds from the start (the notebook's time limit) or when the child ends.
    """

    def __init__(self, path: str, lesson: str, timeout: float, memory_mb: float | None = None):
        import pathlib

        self.timeout = timeout
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        env = dict(os.environ)
        root = str(pathlib.Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("MPLBACKEND", "Agg")
        argv = ["--serve", str(path), "--lesson", lesson] + (["--memory", str(memory_mb)]
                                                             if memory_mb else [])
        self.proc = _start(argv, env, req_r, rep_w)
        self.deadline = time.monotonic() + timeout   # from now: the notebook's time, not Python's start
        os.close(req_r)
        os.close(rep_w)
        for fd in (self._req_w, self._rep_r, self.proc.stderr.fileno()):
            os.set_blocking(fd, False)
        self._buffer = b""
        self._stderr_tail = b""
        self._stderr_open = True
        self.ready = None

    def __enter__(self) -> Sandbox:
        try:
            msg = self._receive()
            if msg.get("op") != "ready":
                raise SandboxError(f"the notebook's process sent {str(msg)[:100]} instead of "
                                   "'ready'")
        except BaseException:  # __exit__ does not run when __enter__ raises: stop the child here
            self.close()
            raise
        uses = msg.get("uses") if isinstance(msg.get("uses"), dict) else {}
        imported = msg.get("imported") if isinstance(msg.get("imported"), dict) else {}
        self.ready = Ready(msg.get("error"), list(msg.get("defined", [])),
                           {str(k): [str(n) for n in v] for k, v in uses.items()
                            if isinstance(v, list)},
                           {str(k): str(v) for k, v in imported.items()},
                           [str(n) for n in msg.get("library", []) if isinstance(n, str)])
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for fd in (self._req_w, self._rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.stderr.close()

    def stderr_tail(self) -> str:
        lines = self._stderr_tail.decode(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else "no error output"

    def _ended(self) -> SandboxError:
        try:
            code = self.proc.wait(2)   # its output is closed: it has ended or is ending
        except subprocess.TimeoutExpired:
            code = None
        return SandboxError(f"the notebook's process ended before reporting a result (exit code "
                            f"{code}; did the notebook or a function call sys.exit or os._exit?): "
                            f"{self.stderr_tail()}")

    def _wait(self, fd: int, event) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SandboxError(f"timed out after {self.timeout:.0f} s")
        with selectors.DefaultSelector() as sel:
            sel.register(fd, event)
            if self._stderr_open:
                sel.register(self.proc.stderr.fileno(), selectors.EVENT_READ)
            for key, _ in sel.select(min(left, 1.0)):
                if key.fd == self.proc.stderr.fileno():
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:  # closed: stop watching it (else select would return at once)
                        self._stderr_open = False
                    self._stderr_tail = (self._stderr_tail + chunk)[-4096:]

    def _send(self, msg: dict) -> None:
        data = json.dumps(msg).encode() + b"\n"
        while data:
            self._wait(self._req_w, selectors.EVENT_WRITE)
            try:
                data = data[os.write(self._req_w, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._ended() from None

    def _receive(self) -> dict:
        while b"\n" not in self._buffer:
            self._wait(self._rep_r, selectors.EVENT_READ)
            try:
                chunk = os.read(self._rep_r, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise self._ended()
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE:
                raise SandboxError("the notebook's process sent a message over "
                                   f"{MAX_MESSAGE:,} bytes")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise SandboxError(f"the notebook's process sent a line that is not a message: "
                               f"{line[:100]!r}") from None
        if not isinstance(msg, dict):
            raise SandboxError(f"the notebook's process sent {str(msg)[:100]}")
        return msg

    def call(self, ex, args: list):
        """Run exercise ``ex``'s function in the child on ``args``: a Returned or Raised."""
        self._send({"op": "call", "id": ex.id, "args": encode(list(args))})
        msg = self._receive()
        try:
            if msg.get("op") == "returned":
                return Returned(decode(msg["value"]))
            if msg.get("op") == "raised":
                return Raised(str(msg["type"]), str(msg["message"]), str(msg["where"]),
                              str(msg["module"]), bool(msg["in_function"]))
        except (KeyError, ValueError, TypeError) as e:
            raise SandboxError(f"the notebook's process sent a malformed answer ({e})") from None
        raise SandboxError(f"the notebook's process sent {str(msg)[:100]} instead of an answer")
