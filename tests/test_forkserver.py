"""quantlab.forkserver: processes forked from a warm server hold only what a started one would (their
own descriptors, a session of their own, /dev/null in and out, the caller's environment), report
their exit status as subprocess does, and end with the server."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from quantlab import forkserver

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="the fork server is Linux-only")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# a fork server whose entry point is a few test commands instead of the checker's
SERVER = r'''
import json, os, sys, threading, time
from quantlab.forkserver import serve_forever

def main(argv):
    if argv[0] == "report":
        fds = []
        for name in os.listdir("/proc/self/fd"):
            try:
                os.fstat(int(name))
                fds.append(int(name))
            except OSError:   # the descriptor listdir itself used, closed by now
                pass
        info = {"fds": sorted(fds), "own_session": os.getsid(0) == os.getpid(),
                "x": os.environ.get("QL_TEST_X"), "stdin": os.readlink("/proc/self/fd/0"),
                "stdout": os.readlink("/proc/self/fd/1"), "cwd": os.getcwd()}
        os.write(3, json.dumps(info).encode())
        return 0
    if argv[0] == "exit":
        print("a line on stderr", file=sys.stderr)
        return int(argv[1])
    if argv[0] == "sleep":
        time.sleep(600)

def start_a_thread():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()

preload = start_a_thread if os.environ.get("QL_TEST_THREAD") else (lambda: None)
sys.exit(serve_forever(int(sys.argv[1]), main, preload))
'''


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


@pytest.fixture(scope="module")
def server():
    s = forkserver.ForkServer([sys.executable, "-c", SERVER], _env(), timeout=120)
    yield s
    s.close()


def _report(server, cwd=None, **env):
    r, w = os.pipe()
    proc = server.popen(["report"], _env(**env), pass_fds=(w,), cwd=cwd)
    os.close(w)
    assert proc.wait(60) == 0, proc.stderr.read()
    with os.fdopen(r, "rb") as f:
        return json.loads(f.read())


def test_a_forked_process_works_in_the_callers_folder(server, tmp_path, monkeypatch):
    # the server started in another folder: the process works where its caller does now, as a
    # started one would (and a relative notebook path means the same to both)
    monkeypatch.chdir(tmp_path)
    assert _report(server)["cwd"] == str(tmp_path)
    assert _report(server, cwd=tmp_path / "..")["cwd"] == str(tmp_path.parent)


def test_a_forked_process_holds_only_its_own_descriptors(server):
    # another forked process is running, with pipes of its own: the new one holds none of them
    r, w = os.pipe()
    other = server.popen(["sleep"], _env(), pass_fds=(r, w))
    try:
        info = _report(server, QL_TEST_X="seen")
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        assert other.wait(60) == -signal.SIGKILL
        os.close(r)
        os.close(w)
    assert info["fds"] == [0, 1, 2, 3]          # stdin, stdout, stderr and the one passed
    assert info["stdin"] == info["stdout"] == os.devnull
    assert info["own_session"]                   # so killpg(pid) ends its whole group
    assert info["x"] == "seen"                   # the caller's environment, not the server's


def test_exit_status_and_stderr_as_subprocess_gives_them(server):
    proc = server.popen(["exit", "7"], _env())
    assert proc.wait(60) == 7 and proc.poll() == 7 and proc.returncode == 7
    assert proc.stderr.read() == b"a line on stderr\n"
    sleeper = server.popen(["sleep"], _env())
    assert os.getpgid(sleeper.pid) == sleeper.pid   # leads its group when popen returns: killpg works
    assert sleeper.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(0.2)
    os.killpg(sleeper.pid, signal.SIGKILL)
    assert sleeper.wait(60) == -signal.SIGKILL


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_closing_the_server_ends_it_and_its_processes():
    s = forkserver.ForkServer([sys.executable, "-c", SERVER], _env(), timeout=120)
    sleeper = s.popen(["sleep"], _env())
    s.close()
    assert s.proc.returncode == 0 and not s.alive()
    assert sleeper.wait(60) == -signal.SIGKILL   # no status: the server ended without reaping it
    deadline = time.monotonic() + 30
    while _running(sleeper.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(sleeper.pid)
    with pytest.raises(forkserver.ForkServerError):
        s.popen(["exit", "0"], _env())


def test_a_server_whose_imports_start_a_thread_refuses_to_start():
    with pytest.raises(forkserver.ForkServerError, match="started a thread"):
        forkserver.ForkServer([sys.executable, "-c", SERVER], _env(QL_TEST_THREAD="1"), timeout=120)


def test_one_shared_server_per_environment(monkeypatch):
    cmd = [sys.executable, "-c", SERVER]
    try:
        first = forkserver.shared(cmd, _env())
        assert first is not None and first.alive()
        assert forkserver.shared(cmd, _env(PYTEST_CURRENT_TEST="another test")) is first
        assert first in forkserver.servers()
        second = forkserver.shared(cmd, _env(QL_TEST_X="changed"))   # imports may read it: anew
        assert second is not first and not first.alive() and second.alive()
        monkeypatch.setenv("QUANTLAB_FORK_SERVER", "0")
        assert not forkserver.available() and forkserver.shared(cmd, _env()) is None
    finally:
        monkeypatch.delenv("QUANTLAB_FORK_SERVER", raising=False)
        server = forkserver.shared(cmd, _env(QL_TEST_X="changed"))
        if server is not None:
            server.close()


def test_arguments_are_checked(server):
    with pytest.raises(TypeError, match="argv must be a list of strings"):
        server.popen("report", _env())
    with pytest.raises(TypeError, match="env must be a dict of strings"):
        server.popen(["report"], {"X": 1})
    with pytest.raises(TypeError, match="pass_fds must be file descriptors"):
        server.popen(["report"], _env(), pass_fds=("3",))
    with pytest.raises(ValueError, match="cwd must be an existing folder"):
        server.popen(["report"], _env(), cwd="/no/such/folder")
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        forkserver.ForkServer([sys.executable], _env(), timeout=0)
    with pytest.raises(ValueError, match="cmd must name the server's program"):
        forkserver.ForkServer([], _env())
