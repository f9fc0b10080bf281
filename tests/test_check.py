"""The exercise checker (quantlab.check): solutions pass, templates are 'not attempted', and every
mistake this family of tutorials made, planted in a copy of the solutions, is caught by its exercise."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from quantlab import check, forkserver

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "exercises"
SOLUTIONS = ROOT / "exercises" / "solutions"
EXERCISE_NOTEBOOKS = sorted(TEMPLATES.glob("*.ipynb")) + sorted(SOLUTIONS.glob("*.ipynb"))

sys.path.insert(0, str(ROOT / "scripts"))
from exercise_sources import lessons as _sources  # noqa: E402  (scripts/ is not a package)

LESSONS = list(check.exercises())
# every planted mistake of every lesson (scripts/exercise_sources/lesson_<letter>.py, MISTAKES):
# (lesson, Mistake(exercise, text in the solution, the mistake, words its hint must contain, what))
MISTAKES = [(letter, m) for letter, module in _sources().items() for m in module.MISTAKES]


def _copy_solutions(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "submission"
    shutil.copytree(SOLUTIONS, folder)
    return folder


def _substitute(path: pathlib.Path, old: str, new: str) -> None:
    nb = json.loads(path.read_text())
    hits = 0
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and old in src:
            hits += src.count(old)
            cell["source"] = src.replace(old, new)
    assert hits == 1, f"{old!r} occurs {hits} times in {path.name}"
    path.write_text(json.dumps(nb))


@pytest.mark.parametrize("lesson,mistake", MISTAKES,
                         ids=[f"{letter}-{m.exercise}:{m.what or m.new[:30]}" for letter, m in MISTAKES])
def test_every_planted_mistake_fails_its_exercise_with_its_own_hint(tmp_path, lesson, mistake):
    folder = _copy_solutions(tmp_path)
    path = folder / f"{lesson}_exercises.ipynb"
    _substitute(path, mistake.old, mistake.new)
    fr = check.grade_notebook(path, names=[mistake.exercise])
    assert fr.error is None, fr.error
    (r,) = fr.results
    assert (r.name, r.status) == (mistake.exercise, check.FAILED), r
    assert r.expected and r.got and r.hint and r.input, r  # a failing input, both values, a hint
    assert mistake.words in r.hint, (mistake.words, r.hint)  # the hint names this mistake


def test_every_exercise_has_planted_mistakes():
    planted = {(letter, m.exercise) for letter, m in MISTAKES}
    missing = [(letter, e.name) for letter, exs in check.exercises().items() for e in exs
               if (letter, e.name) not in planted]
    assert not missing, f"exercises without a planted mistake: {missing}"


@pytest.mark.parametrize("lesson", LESSONS)
def test_blank_templates_are_not_attempted_and_fail_strict(lesson, capsys):
    path = TEMPLATES / f"{lesson}_exercises.ipynb"
    fr = check.grade_notebook(path)
    n = len(check.exercises()[lesson])
    assert fr.error is None and len(fr.results) == n
    assert all(r.status == check.NOT_ATTEMPTED for r in fr.results), fr.results
    assert check.file_ok(fr, strict=False) and not check.file_ok(fr, strict=True)
    if lesson == "a":  # the command line (the notebook in a process of its own)
        assert check.main([str(path)]) == 0
        assert check.main([str(path), "--strict"]) == 1
        out = capsys.readouterr().out
        assert f"0 passed, 0 failed, {n} not attempted" in out


@pytest.mark.parametrize("lesson", LESSONS)
def test_solutions_pass_every_check_strict(lesson):
    fr = check.grade_notebook(SOLUTIONS / f"{lesson}_exercises.ipynb")
    assert fr.error is None and len(fr.results) == len(check.exercises()[lesson])
    assert check.file_ok(fr, strict=True), [r for r in fr.results if r.status != check.PASSED]


def test_command_line_several_files_one_process_each_and_a_table(tmp_path):
    folder = _copy_solutions(tmp_path)
    _substitute(folder / "a_exercises.ipynb", "torch.round(x * (1.0 / scale))", "torch.round(x / scale)")
    files = [str(SOLUTIONS / "e_exercises.ipynb"), str(folder / "a_exercises.ipynb")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "quantlab.check", *files, "--strict"],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = p.stdout.splitlines()
    assert p.returncode == 1, p.stdout + p.stderr  # the mutant copy fails
    good = next(x for x in lines if "solutions/e_exercises" in x)
    assert good.startswith("ok") and good.endswith("6 passed, 0 failed, 0 not attempted")
    bad = next(x for x in lines if "submission/a_exercises" in x)
    assert bad.startswith("FAIL") and bad.endswith("5 passed, 2 failed, 0 not attempted")
    # the table: one row per file, one column per exercise (a7 reuses a5's quantize, so it fails too)
    row = next(x for x in lines if x.startswith(files[1]))
    assert row.split()[1:] == ["ok", "ok", "ok", "ok", "FAIL", "ok", "FAIL"]


def test_the_first_solution_run_is_reported_with_failing_input_and_hint(tmp_path, capsys):
    folder = _copy_solutions(tmp_path)
    _substitute(folder / "e_exercises.ipynb", "threshold = (mask >> 1) + (x < 0).to(torch.int64)",
                "threshold = (mask >> 1)")
    assert check.main([str(folder / "e_exercises.ipynb")]) == 1
    out = capsys.readouterr().out
    assert "e3 rounding_divide_by_pot: failed" in out
    assert re.search(r"input: +x=\[3, -3, 5, -5, 1, -1, 0\] \(int64\), exponent=1", out)
    assert "ties round away from zero" in out
    assert "e4 requantize_fixed_point: failed" in out  # it uses e3
    assert "4 passed, 2 failed, 0 not attempted" in out


def test_run_from_a_notebook_checks_the_callers_functions(capsys):
    ns = {"__name__": "__main__"}
    exec("import torch\nfrom quantlab import check\n"
         "def quant_range(num_bits=8, signed=False):\n"
         "    return (-(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1) if signed else (0, 2**num_bits - 1)\n"
         "def quantize(x, scale, zero_point, num_bits=8, signed=False):\n"
         "    raise NotImplementedError\n"
         "def dequantize(q, scale, zero_point):\n"
         "    return (q - zero_point) * scale\n"
         "check.run('a')\n", ns)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "a1 quant_range: passed"
    assert out[1] == "a5 quantize: not attempted (the stub raises NotImplementedError)"
    assert out[2] == "a6 dequantize: failed"
    assert out[-1] == "1 passed, 1 failed, 1 not attempted"
    # imported by another notebook (its __name__ is not __main__): silent
    ns["__name__"] = "a_exercises"
    exec("check.run('a')", ns)
    assert capsys.readouterr().out == ""


def test_magics_shell_commands_and_a_crashing_cell_are_tolerated(tmp_path):
    nb = json.loads((SOLUTIONS / "a_exercises.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    code[0]["source"] = "%matplotlib inline\n!echo hello\n" + "".join(code[0]["source"])
    code[1]["source"] = "%%time\n" + "".join(code[1]["source"])
    code[5]["source"] = "undefined_name + 1\n" + "".join(code[5]["source"])  # crashes: a3 not defined
    path = tmp_path / "copy_of_a_exercises.ipynb"
    path.write_text(json.dumps(nb))
    fr = check.grade_notebook(path)
    assert fr.lesson == "a"
    assert fr.error and "code cell 6 raised NameError" in fr.error
    status = {r.name: r.status for r in fr.results}
    assert status["quant_range"] == status["calc_min_max"] == check.PASSED
    assert status["calc_scale_zero_point"] == check.NOT_ATTEMPTED
    assert not check.file_ok(fr, strict=False)


def test_the_lesson_comes_from_metadata_or_file_name(tmp_path):
    nb = json.loads((SOLUTIONS / "d_exercises.ipynb").read_text())
    renamed = tmp_path / "homework 3.ipynb"
    renamed.write_text(json.dumps(nb))
    assert check.lesson_of(renamed) == "d"
    del nb["metadata"]["quantlab"]
    renamed.write_text(json.dumps(nb))
    assert check.lesson_of(renamed) is None
    named = tmp_path / "alice_e_exercises.ipynb"
    named.write_text(json.dumps(nb))
    assert check.lesson_of(named) == "e"
    with pytest.raises(ValueError, match="lesson must be one of"):
        check.check_namespace("z", {})


def test_the_help_lists_every_lesson_with_checks():
    assert check.checked_lessons() == sorted(LESSONS)
    text = " ".join(check._parser().format_help().split())
    assert f"the lesson ({', '.join(sorted(LESSONS))})" in text and len(LESSONS) >= 12


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=lambda p: str(p.relative_to(TEMPLATES)))
def test_exercise_notebooks_are_stored_executed_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert "widgets" not in nb["metadata"]
    outputs = []
    for c in code:
        assert "execution" not in c.get("metadata", {})
        for out in c.get("outputs", []):
            assert out["output_type"] != "error"
            outputs.append("".join(out.get("text", "")))
    text = "".join(outputs)
    lesson = nb["metadata"]["quantlab"]["lesson"]
    expect = "passed" if path.parent == SOLUTIONS else "not attempted"
    for ex in check.exercises()[lesson]:
        assert f"{ex.id} {ex.name}: {expect}" in text


def _notebook(path: pathlib.Path, *cells: str) -> pathlib.Path:
    """A minimal lesson-a exercise notebook with these code cells."""
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                     "source": c} for c in cells],
          "metadata": {"quantlab": {"lesson": "a"}}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def _check_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "quantlab.check", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _check_main(capsys, *args) -> tuple[int, str]:
    """``python -m quantlab.check ARGS`` run as its ``main`` in this process (the notebook still
    in a process of its own): (exit status, printed text). It spares the test a second start of
    Python, torch and the checks; ``_check_cli`` runs the real command line."""
    capsys.readouterr()
    code = check.main([str(a) for a in args])
    printed = capsys.readouterr()
    return code, printed.out + printed.err


#: seconds a notebook may take in the tests that wait for a time limit: forked from the warm fork
#: server, a notebook's process reaches its first cell in a fraction of a second; started afresh
#: (no fork server: not Linux), it first spends seconds importing torch
LIMIT = 6 if forkserver.available() else 20


@pytest.mark.parametrize("kind", ["endless", "os_exit", "sys_exit_in_exercise", "not_json",
                                  "empty_object", "thread"])
def test_the_checker_always_ends_and_reports_one_notebook(tmp_path, capsys, kind):
    # a single notebook runs in its own process too: an endless one is stopped by --timeout, one
    # that exits early is reported (never "passed"), a malformed file is named, and a thread the
    # notebook leaves running does not keep the checker waiting (the endless one through the
    # real command line, the others through its main in this process)
    path = tmp_path / "a_exercises.ipynb"
    solution = (SOLUTIONS / "a_exercises.ipynb").read_text()
    if kind == "endless":
        _notebook(path, "while True:\n    pass")
    elif kind == "os_exit":
        _notebook(path, "import os\nos._exit(0)")
    elif kind == "sys_exit_in_exercise":
        _notebook(path, "import sys\n\ndef quant_range(num_bits, signed=False):\n    sys.exit(0)")
    elif kind == "not_json":
        path.write_text(solution[: len(solution) // 2])          # truncated
    elif kind == "empty_object":
        path.write_text("{}")
    else:
        _notebook(path, "import threading, time\n"
                        "threading.Thread(target=lambda: time.sleep(3600)).start()\n"
                        "def quant_range(num_bits, signed=False):\n"
                        "    return (-2**(num_bits-1), 2**(num_bits-1)-1) if signed else (0, 2**num_bits-1)")
    if kind == "endless":
        p = _check_cli(path, "--timeout", LIMIT)
        code, out = p.returncode, p.stdout + p.stderr
    else:
        code, out = _check_main(capsys, path, "--timeout", LIMIT)
    if kind == "thread":
        assert code == 0 and "a1 quant_range: passed" in out, out
        return
    assert code == 1, out
    assert "passed" not in out.replace("0 passed", ""), out
    want = {"endless": f"timed out after {LIMIT} s", "os_exit": "ended before reporting",
            "sys_exit_in_exercise": "raised SystemExit", "not_json": "cannot read",
            "empty_object": "cannot read"}[kind]
    assert want in out, out


# -- grading from a process the learner's code cannot reach -------------------------------------

WRONG_QUANTIZE = ("import torch\n"
                  "def quantize(x, scale, zero_point, num_bits=8, signed=False):\n"
                  "    return torch.round(x / scale).to(torch.int32)   # no zero point, no clamp\n")


@pytest.mark.parametrize("attack", ["replace_try_case", "patch_the_oracle", "forge_the_report",
                                    "patch_torch"])
def test_a_notebook_cannot_grade_itself(tmp_path, capsys, attack):
    # each attack gets a wrong quantize "passed" when the notebook runs beside the grader (shown
    # for the first two), never when it is graded from another process
    tamper = {
        "replace_try_case": "import quantlab.check\nquantlab.check._try_case = lambda *a, **k: None",
        "patch_the_oracle": "import quantlab.exercise_checks.lesson_a as xc\nxc.quantize = quantize",
        "forge_the_report": "import os\nos.write(1, b'a5 quantize: passed\\n')\n"
                            "print('QUANTLAB_CHECK_RESULT {}', flush=True)",
        "patch_torch": "import torch\ntorch.round = lambda x, **k: x.floor()",
    }[attack]
    path = _notebook(tmp_path / "a_exercises.ipynb", WRONG_QUANTIZE, tamper)
    if attack in ("replace_try_case", "patch_the_oracle"):
        import quantlab.exercise_checks.lesson_a as xc
        saved = (check._try_case, xc.quantize)
        try:
            inside = check.grade_notebook(path, names=["quantize"])
        finally:
            check._try_case, xc.quantize = saved
        assert inside.results[0].status == check.PASSED   # the attack works in one process
    fr = check.grade_isolated(path, names=["quantize"], timeout=120)
    assert fr.error is None, fr.error
    (r,) = fr.results
    assert r.status == check.FAILED and r.expected and r.got, r
    code, out = _check_main(capsys, path, "--timeout", 120)
    assert code == 1 and "a5 quantize: failed" in out, out


@pytest.mark.parametrize("lesson", LESSONS)
def test_grading_in_another_process_gives_the_same_results(tmp_path, lesson):
    # the solutions, and a copy with one planted mistake: the same verdicts, failing inputs,
    # expected and got values and hints as grading in one process (so the mutant tests above,
    # run in one process, speak for the command line too)
    fr = check.grade_isolated(SOLUTIONS / f"{lesson}_exercises.ipynb", timeout=300)
    assert fr.error is None and check.file_ok(fr, strict=True), fr
    name, old, new = next(m[:3] for letter, m in MISTAKES if letter == lesson)
    folder = _copy_solutions(tmp_path)
    path = folder / f"{lesson}_exercises.ipynb"
    _substitute(path, old, new)
    inside = check.grade_notebook(path)
    apart = check.grade_isolated(path, timeout=300)
    assert apart.results == inside.results
    assert any(r.name == name and r.status == check.FAILED for r in apart.results)


@pytest.mark.parametrize("kind", ["os_exit_in_exercise", "endless_exercise"])
def test_an_exercise_that_ends_its_process_or_never_returns_fails(tmp_path, kind):
    body = {"os_exit_in_exercise": "    import os\n    os._exit(0)",
            "endless_exercise": "    while True:\n        pass"}[kind]
    path = _notebook(tmp_path / "a_exercises.ipynb",
                     "def quant_range(num_bits, signed=False):\n" + body)
    fr = check.grade_isolated(path, timeout=LIMIT)
    r = fr.results[0]
    assert r.name == "quant_range" and r.status == check.FAILED, r
    want = "ended before reporting" if kind == "os_exit_in_exercise" else f"timed out after {LIMIT} s"
    assert want in r.got and want in fr.error, (r, fr.error)
    assert all(x.status == check.NOT_ATTEMPTED for x in fr.results[1:])
    assert not check.file_ok(fr, strict=False)


def _processes_serving(path) -> list[int]:
    """PIDs of processes (Linux's /proc) whose command line names ``path`` (a notebook process
    started with ``--serve``) or whose parent is a fork server (a notebook process forked from it:
    its command line is the server's)."""
    from quantlab import forkserver

    servers = {str(s.proc.pid) for s in forkserver.servers()}
    pids = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = next(line.split()[1] for line in (proc / "status").read_text().splitlines()
                        if line.startswith("PPid:"))
        except (OSError, StopIteration):
            continue
        if ("--serve" in cmd and str(path) in cmd) or ppid in servers:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not pathlib.Path("/proc/self/cmdline").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("where", ["import", "exercise"])
def test_a_stopped_notebook_leaves_no_process_behind(tmp_path, where):
    # an endless loop while importing (the child never says "ready") or inside an exercise: after
    # the time limit the child and its process group are killed, not left spinning
    source = ("while True:\n    pass" if where == "import" else
              "def quant_range(num_bits, signed=False):\n    while True:\n        pass")
    path = _notebook(tmp_path / "a_exercises.ipynb", source)
    fr = check.grade_isolated(path, timeout=LIMIT)
    assert f"timed out after {LIMIT} s" in fr.error
    assert _processes_serving(path) == []


def test_a_failure_caused_by_an_earlier_exercise_names_that_one(tmp_path):
    # quantize (a5) without its clamp: quantize_per_channel (a7), which calls it, fails too, and
    # its hint says to fix a5 first instead of a7's own hint (reshape the scales ...)
    folder = _copy_solutions(tmp_path)
    path = folder / "a_exercises.ipynb"
    _substitute(path, "return torch.clamp(q, quant_min, quant_max).to(torch.int32)",
                "return q.to(torch.int32)")
    for fr in (check.grade_notebook(path), check.grade_isolated(path, timeout=300)):
        by_id = {r.id: r for r in fr.results}
        assert by_id["a5"].status == check.FAILED and "a5" not in by_id["a5"].hint
        assert by_id["a7"].status == check.FAILED, by_id["a7"]
        assert by_id["a7"].hint.startswith("`quantize` (a5) failed above and "
                                           "`quantize_per_channel` calls it: fix a5 first")


def test_a_failure_caused_by_another_notebooks_function_names_that_one(tmp_path):
    # quantize (a5) without its clamp, in a_exercises.ipynb: e's quantized_conv2d (e6), which calls
    # it through `from a_exercises import ...`, fails, and its hint names a5 in a_exercises.ipynb
    # (not a7, which fails only because it calls a5) instead of e6's own hint
    folder = _copy_solutions(tmp_path)
    _substitute(folder / "a_exercises.ipynb", "return torch.clamp(q, quant_min, quant_max).to(torch.int32)",
                "return q.to(torch.int32)")
    path = folder / "e_exercises.ipynb"
    for fr in (check.grade_notebook(path, names=["quantized_conv2d"]),
               check.grade_isolated(path, names=["quantized_conv2d"], timeout=300)):
        (r,) = fr.results
        assert r.status == check.FAILED, r
        assert r.hint.startswith("`quantize` (a5, in a_exercises.ipynb) fails its own check and "
                                 "`quantized_conv2d` calls it"), r.hint


def test_a_function_that_is_quantlabs_own_is_marked(tmp_path):
    # quantize = quantlab.quantize passes a5, but the report says it was not written in the notebook
    folder = _copy_solutions(tmp_path)
    path = folder / "a_exercises.ipynb"
    nb = json.loads(path.read_text())
    nb["cells"].insert(len(nb["cells"]) - 1, {"cell_type": "code", "execution_count": None, "id": "copy",
                                              "metadata": {}, "outputs": [],
                                              "source": "import quantlab\nquantize = quantlab.quantize"})
    path.write_text(json.dumps(nb))
    for fr in (check.grade_notebook(path, names=["quantize"]),
               check.grade_isolated(path, names=["quantize"], timeout=300)):
        (r,) = fr.results
        assert (r.status, r.note) == (check.PASSED, check.LIBRARY_NOTE), r


def test_exercise_calls_follows_helpers_and_ignores_other_globals():
    from quantlab.calls import exercise_calls
    ns = {}
    exec("def quantize(x):\n    return x\n"
         "def _helper(x):\n    return quantize(x)\n"
         "def per_channel(x):\n    return [_helper(v) for v in x]\n"
         "def alone(x):\n    return len(x)\n", ns)
    assert exercise_calls(ns, ["quantize", "per_channel", "alone"]) == {
        "quantize": [], "per_channel": ["quantize"], "alone": []}
