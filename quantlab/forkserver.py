"""A warm process to start the checker's notebook processes from, by ``fork`` (Linux only).

Every notebook the checker grades runs in a process of its own (:mod:`quantlab.sandbox`). Started
with ``python -m quantlab.check --serve ...``, each such process spends seconds importing torch,
SciPy, hypothesis and IPython before it reads the notebook's first cell; a class of 30 learners
pays that 30 times. A fork server pays it once: it is started with ``python -m quantlab.check
--fork-server FD``, imports what every notebook process needs, runs no other code (no notebook's,
no test's, not even a torch operation), and then only forks. Each forked process starts from that
same untouched state, as a fresh one would, in a few milliseconds.

What a forked process can reach is what a started one could: it begins a session of its own (so
the whole process group can be killed), its standard input and output are ``/dev/null``, its
standard error is the pipe the caller gave, and it holds no other file descriptor than the ones
the caller passed (renumbered 3, 4, ...): not the server's socket, not another notebook's pipes.
The server reaps it and writes its exit status (``Popen.returncode``'s convention) to a pipe the
caller keeps, so :class:`ForkedProcess` answers ``poll``/``wait`` as ``subprocess.Popen`` does.

The caller talks to the server over a private socket pair (one JSON request with its file
descriptors, one JSON reply); nothing the server receives is executed, only an argument list for
the entry point it was started with. Where ``fork`` is missing or unsafe (Windows, macOS) or the
server does not start, :func:`shared` returns None and the caller starts processes as before.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

__all__ = ["ForkServer", "ForkServerError", "ForkedProcess", "available", "serve_forever",
           "servers", "shared"]

#: seconds a fork server may take to import everything before the caller gives up on it
START_TIMEOUT = 300.0
_MAX_MESSAGE = 1 << 16


class ForkServerError(Exception):
    """The fork server did not start, or stopped answering."""


def available() -> bool:
    """True where the checker forks its notebook processes from a fork server: Linux with
    ``socket.send_fds`` (Python 3.9+). ``QUANTLAB_FORK_SERVER=0`` turns it off."""
    return (sys.platform.startswith("linux") and hasattr(socket, "send_fds")
            and os.environ.get("QUANTLAB_FORK_SERVER", "1") != "0")


# -- the server's side ----------------------------------------------------------------------------

def _only_thread() -> bool:
    """True when this process runs one thread (forking a process with others can deadlock it)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


def _become_child(sock, selector, wake_fds, fds: list, stderr_fd: int, started: int) -> None:
    """In the forked process: a session of its own (then ``started`` is closed to say so),
    default signal handling, /dev/null in and out, ``stderr_fd`` as standard error and ``fds`` as
    3, 4, ...; every other descriptor closed."""
    os.setsid()
    os.close(started)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    selector.close()
    sock.close()
    for fd in wake_fds:
        os.close(fd)
    floor = max([2, stderr_fd, *fds]) + 1   # move them above every target first: no collisions
    moved = [os.dup2(fd, floor + i) for i, fd in enumerate([stderr_fd, *fds])]
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(moved[0], 2)
    for i, fd in enumerate(moved[1:]):
        os.dup2(fd, 3 + i)
    os.closerange(3 + len(fds), os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)


def _fork(request: dict, fds: list, sock, selector, wake_fds, main) -> int:
    """Fork one process for ``request`` (``argv``) with ``fds`` = [stderr, status, *passed]; in
    the child, run ``main(argv)`` and exit with its return value (never return to the loop)."""
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid:   # answer only once the child leads its own session, as Popen(start_new_session=True)
        os.close(started_w)
        os.read(started_r, 1)   # its end closes after setsid (or when it dies)
        os.close(started_r)
        return pid
    code = 1
    try:
        os.close(started_r)
        _become_child(sock, selector, wake_fds, fds[2:], fds[0], started_w)
        os.environ.clear()
        os.environ.update(request["env"])
        if sys.path and sys.path[0] == os.getcwd():   # python -m put the server's folder first
            sys.path[0] = request["cwd"]
        os.chdir(request["cwd"])
        code = main(list(request["argv"])) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return 0  # not reached


def _reap(children: dict) -> None:
    """Write the exit status of every ended child to its status pipe, and close that pipe."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            os.close(fd)


def _answer(sock, selector, wake_fds, children: dict, main) -> bool:
    """Serve one request from ``sock``: False when the caller has gone (the server then ends)."""
    try:
        msg, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 64)
    except OSError:
        return False
    if not msg:
        for fd in fds:
            os.close(fd)
        return False
    try:
        request = json.loads(msg)
        if len(fds) < 2 or not isinstance(request.get("argv"), list) or \
                not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str):
            raise ValueError("a request is {'argv': [...], 'env': {...}, 'cwd': '...'} with stderr, "
                             "status and passed fds")
        if not _only_thread():
            raise RuntimeError("the fork server runs more than one thread: it cannot fork safely")
        pid = _fork(request, fds, sock, selector, wake_fds, main)
        children[pid] = fds[1]
        reply = {"pid": pid}
    except Exception as e:  # a malformed request: answer it, keep serving
        if len(fds) > 1:
            os.close(fds[1])
        reply = {"error": f"{type(e).__name__}: {e}"}
    for fd in fds[:1] + fds[2:]:
        os.close(fd)   # the child holds its copies; the status pipe stays here until it is reaped
    sock.send(json.dumps(reply).encode())
    return True


def serve_forever(fd: int, main, preload) -> int:
    """The server (``python -m quantlab.check --fork-server FD``): call ``preload()``, say ready
    on the socket ``fd``, then fork one process per request, each running ``main(argv)``, until the
    caller closes the socket. Returns the exit status."""
    sock = socket.socket(fileno=fd)
    try:
        preload()
        if not _only_thread():
            raise RuntimeError("importing started a thread: forking would not be safe")
    except BaseException as e:
        sock.send(json.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}).encode())
        return 1
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)   # a handler, so set_wakeup_fd wakes select
    signal.set_wakeup_fd(wake_w)
    children: dict[int, int] = {}
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        sock.send(json.dumps({"ready": os.getpid()}).encode())
        running = True
        while running:
            for key, _ in selector.select():
                if key.fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
                else:
                    running = _answer(sock, selector, (wake_r, wake_w), children, main)
            _reap(children)
    for pid in list(children):   # the caller has gone: its notebooks' processes go too
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


# -- the caller's side ----------------------------------------------------------------------------

def _check_args(name: str, argv, env, timeout: float) -> None:
    """``argv``: a list of strings; ``env``: a dict of strings; ``timeout``: seconds > 0."""
    if not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"{name} must be a list of strings; got {argv!r}")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise TypeError(f"env must be a dict of strings (as os.environ); got {type(env).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0; got {timeout!r}")


class ForkedProcess:
    """A process the fork server started: ``pid``, ``stderr`` (a pipe, binary), ``poll()``,
    ``wait(timeout)`` and ``returncode`` as ``subprocess.Popen`` has them."""

    def __init__(self, pid: int, status_fd: int, stderr):
        self.pid, self.stderr, self.returncode = pid, stderr, None
        self._status, self._text = status_fd, b""

    def _read_status(self, timeout: float | None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if end is None else max(0.0, end - time.monotonic())
            with selectors.DefaultSelector() as sel:
                sel.register(self._status, selectors.EVENT_READ)
                if not sel.select(left):
                    return
            chunk = os.read(self._status, 64)
            self._text += chunk
            if not chunk or b"\n" in self._text:
                text = self._text.decode(errors="replace").strip()
                # no status at all: the server itself was killed; say so with a negative code
                self.returncode = int(text) if text.lstrip("-").isdigit() else -int(signal.SIGKILL)
                os.close(self._status)

    def poll(self) -> int | None:
        """The exit status, or None while the process runs."""
        self._read_status(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end (``subprocess.TimeoutExpired`` after ``timeout`` s)."""
        self._read_status(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
        return self.returncode


class ForkServer:
    """A fork server started by ``cmd + [FD]`` with environment ``env``; :meth:`popen` starts a
    process from it. Thread-safe; :meth:`close` ends it (and it ends when this process does)."""

    def __init__(self, cmd: list, env: dict, timeout: float = START_TIMEOUT):
        _check_args("cmd", cmd, env, timeout)
        if not cmd:
            raise ValueError("cmd must name the server's program; got []")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock, self._lock, self.key = ours, threading.Lock(), None
        self.proc = subprocess.Popen(cmd + [str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        try:
            reply = self._reply(timeout)
        except ForkServerError:
            self.close()
            raise
        if "ready" not in reply:
            self.close()
            raise ForkServerError(f"the fork server did not start: {reply.get('error')}")

    def _reply(self, timeout: float) -> dict:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise ForkServerError(f"the fork server did not answer within {timeout:.0f} s")
        try:
            msg = self._sock.recv(_MAX_MESSAGE)
            reply = json.loads(msg) if msg else None
        except (OSError, ValueError) as e:
            raise ForkServerError(f"the fork server's answer was unreadable ({e})") from None
        if not isinstance(reply, dict):
            raise ForkServerError(f"the fork server has ended (exit code {self.proc.poll()})")
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None and self._sock.fileno() >= 0

    def popen(self, argv: list, env: dict, pass_fds=(), cwd=None,
              timeout: float = 60.0) -> ForkedProcess:
        """Start ``main(argv)`` in a forked process with environment ``env`` (``os.environ``; what
        the server's imports read came from the server's own), working directory ``cwd`` (this
        process's when None, as ``subprocess.Popen``) and file descriptors 3, 4, ... = ``pass_fds``
        (in that order): write ``argv`` with those numbers."""
        _check_args("argv", argv, env, timeout)
        if not all(isinstance(fd, int) and not isinstance(fd, bool) and fd >= 0 for fd in pass_fds):
            raise TypeError(f"pass_fds must be file descriptors (ints >= 0); got {pass_fds!r}")
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        cwd = os.path.abspath(os.fspath(os.getcwd() if cwd is None else cwd))
        if not os.path.isdir(cwd):
            raise ValueError(f"cwd must be an existing folder; got {cwd!r}")
        request = {"argv": list(argv), "env": dict(env), "cwd": cwd}
        try:
            with self._lock:
                socket.send_fds(self._sock, [json.dumps(request).encode()],
                                [err_w, status_w, *pass_fds])
                reply = self._reply(timeout)
        except (OSError, ForkServerError) as e:
            os.close(err_r)
            os.close(status_r)
            raise ForkServerError(str(e)) from None
        finally:
            os.close(err_w)
            os.close(status_w)
        if "pid" not in reply:
            os.close(err_r)
            os.close(status_r)
            raise ForkServerError(f"the fork server could not fork: {reply.get('error')}")
        return ForkedProcess(int(reply["pid"]), status_r, os.fdopen(err_r, "rb", buffering=0))

    def close(self) -> None:
        """End the server (its running children are killed with it)."""
        try:
            self._sock.close()
        finally:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SERVERS: dict = {}
_SERVERS_LOCK = threading.Lock()


#: variables that change while a process runs and that no import reads (pytest's current test)
VOLATILE = ("PYTEST_CURRENT_TEST",)


def shared(cmd: list, env: dict) -> ForkServer | None:
    """This process's fork server for ``cmd`` started with ``env`` (started on first use; started
    anew when it has ended or ``env`` has changed in more than :data:`VOLATILE`), or None where
    there is none: not :func:`available`, or it failed to start (the caller then starts its
    processes itself)."""
    _check_args("cmd", cmd, env, START_TIMEOUT)
    if not available():
        return None
    key = tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE))
    with _SERVERS_LOCK:
        server = _SERVERS.get(tuple(cmd))
        if server is not None and server.alive() and server.key == key:
            return server
        if server is not None:
            server.close()
        _SERVERS.pop(tuple(cmd), None)
        try:
            server = ForkServer(cmd, env)
        except (OSError, ForkServerError):
            return None
        server.key = key
        _SERVERS[tuple(cmd)] = server
        return server


def servers() -> list[ForkServer]:
    """The fork servers this process has started and that still run."""
    with _SERVERS_LOCK:
        return [server for server in _SERVERS.values() if server.alive()]


@atexit.register
def _close_all() -> None:
    with _SERVERS_LOCK:
        for server in _SERVERS.values():
            server.close()
        _SERVERS.clear()
