"""The exercise checker: grade the functions of ``exercises/*.ipynb`` against quantlab and PyTorch.

From a shell (each notebook is imported with import-ipynb in a process of its own, in its own
folder, and graded from another process its code cannot reach: see ``quantlab.sandbox``)::

    python -m quantlab.check exercises/a_exercises.ipynb          # one notebook: every exercise
    python -m quantlab.check submissions/*.ipynb --strict         # many: one line each and a table

From a notebook cell: ``quantlab.check.run("a")`` checks the lesson-a functions defined so far in
that notebook; ``quantlab.check.run("a", "quantize")`` checks one of them.

Each exercise is passed, failed (with the smallest failing input found, expected vs got and a
one-line hint) or not attempted (its stub still raises ``NotImplementedError``). The exit status is
0 only when every attempted exercise passes; ``--strict`` also fails unattempted ones.

The lesson of a notebook is read from its metadata ``{"quantlab": {"lesson": "a"}}`` or else from
its file name (``a_exercises.ipynb``, ``alice_e_exercises.ipynb`` -> ``a``, ``e``).
The checks themselves (oracles, tricky cases, random inputs) are in ``quantlab.exercise_checks``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .calls import (  # noqa: F401  (check's API)
    Raised,
    Returned,
    call_function,
    exercise_calls,
    imported_exercises,
    library_functions,
)
from .notebook_import import import_notebook, lesson_of  # noqa: F401  (check's API)

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
#: the note of an exercise whose function is quantlab's own (it passes, but the learner did not write it)
LIBRARY_NOTE = "quantlab's own function, not written in the notebook"
_EXERCISES = None


def exercises() -> dict:
    """The exercises of every lesson (built once; importing hypothesis and torch is not free)."""
    global _EXERCISES
    if _EXERCISES is None:
        from .exercise_checks import all_exercises

        _EXERCISES = all_exercises()
    return _EXERCISES


@dataclass
class Result:
    id: str
    name: str
    status: str
    input: str = ""
    expected: str = ""
    got: str = ""
    hint: str = ""
    note: str = ""


class _Failure(Exception):
    def __init__(self, result: Result):
        super().__init__(result.got)
        self.result = result


class _NotAttempted(Exception):
    pass


def _clone(v):
    import torch

    return v.clone() if isinstance(v, torch.Tensor) else v


def _try_case(ex, runner, case, first: bool):
    """Run one case through ``runner(ex, args)``; raise _NotAttempted or _Failure, return None
    when it passes. The oracle and the comparison run here, never in the learner's process."""
    from .exercise_checks import Mismatch, describe, show

    expected = ex.oracle(**{k: _clone(v) for k, v in case.kwargs.items()})
    outcome = runner(ex, [_clone(v) for v in case.kwargs.values()])
    if isinstance(outcome, Raised):
        if outcome.type == "NotImplementedError":
            if first and outcome.in_function:
                raise _NotAttempted from None
            if outcome.where == ex.name:
                msg, hint = "raised NotImplementedError", "part of the function is still a stub"
            else:
                msg = f"calls {outcome.where}(), which still raises NotImplementedError"
                hint = f"finish {outcome.where} first" + (
                    f" (in {outcome.module}.ipynb)" if outcome.module.endswith("_exercises") else "")
            raise _Failure(Result(ex.id, ex.name, FAILED, describe(case), show(expected), msg,
                                  hint))
        raise _Failure(Result(ex.id, ex.name, FAILED, describe(case), show(expected),
                              f"raised {outcome.type}: {outcome.message}", case.hint or ex.hint))
    m = ex.compare(expected, outcome.value)
    if isinstance(m, Mismatch):
        raise _Failure(Result(ex.id, ex.name, FAILED, describe(case), m.expected, m.got,
                              m.hint or case.hint or ex.hint))


def _local(fn):
    return lambda ex, args: call_function(ex, fn, args)


def check_function(ex, fn) -> Result:
    """Grade one function: the tricky cases first, then random inputs (hypothesis, shrunk).

    ``fn`` is the learner's function, called in this process; :func:`grade_isolated` passes a
    runner that calls it in another process instead (``runner(ex, args)`` -> Returned/Raised).
    """
    return _check(ex, _local(fn))


def _check(ex, runner) -> Result:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis.errors import Flaky, FlakyFailure

    try:
        for i, case in enumerate(ex.cases()):
            _try_case(ex, runner, case, first=(i == 0))
    except _NotAttempted:
        return Result(ex.id, ex.name, NOT_ATTEMPTED, note="the stub raises NotImplementedError")
    except _Failure as f:
        return f.result

    @settings(max_examples=ex.max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
              report_multiple_bugs=False, phases=(Phase.generate, Phase.shrink))
    @given(ex.strategy())
    def prop(case):
        _try_case(ex, runner, case, first=False)

    try:
        prop()
    except _Failure as f:
        return f.result
    except (Flaky, FlakyFailure) as e:  # hypothesis found the function non-deterministic
        return Result(ex.id, ex.name, FAILED, got=f"{type(e).__name__}: {e}"[:500],
                      hint="the function must return the same result for the same input")
    return Result(ex.id, ex.name, PASSED)


def check_namespace(lesson: str, namespace: dict, names=None, missing: str = "skip") -> list[Result]:
    """Grade the functions of ``lesson`` found in ``namespace`` (a module's or notebook's globals).

    Args:
        names: only these exercises (function names or ids such as "a5"); None for all.
        missing: "skip" leaves out exercises whose function is not defined, "report" lists them
            as not attempted.
    """
    all_ex = exercises()
    if lesson not in all_ex:
        raise ValueError(f"lesson must be one of {sorted(all_ex)}; got {lesson!r}")
    chosen = all_ex[lesson]
    if names:
        known = {e.name for e in chosen} | {e.id for e in chosen}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"no exercise {unknown} in lesson {lesson!r}; choose from "
                             f"{[e.name for e in chosen]}")
        chosen = [e for e in chosen if e.name in names or e.id in names]
    results = []
    for ex in chosen:
        fn = namespace.get(ex.name)
        if not callable(fn):
            if missing == "report" or names:
                results.append(Result(ex.id, ex.name, NOT_ATTEMPTED, note="not defined"))
            continue
        results.append(check_function(ex, fn))
    mark_library(results, library_functions(namespace, [e.name for e in chosen]))
    imported = imported_exercises(namespace, {k: [e.name for e in v] for k, v in all_ex.items()})
    uses = exercise_calls(namespace, [e.name for e in chosen] + list(imported))
    blame_dependencies(results, uses)
    blame_other_notebooks(results, uses, imported,
                          lambda ex: check_function(ex, namespace[ex.name]))
    return results


def blame_dependencies(results: list[Result], uses: dict) -> None:
    """An exercise that failed and calls the function of an exercise that failed before it gets
    a hint naming that one ("`quantize` (a5) failed above ...") instead of its own: its own
    hint would send the learner after the wrong bug."""
    failed = {}
    for r in results:
        if r.status != FAILED:
            continue
        before = [failed[n] for n in uses.get(r.name, []) if n in failed]
        if before:
            named = ", ".join(f"`{d.name}` ({d.id})" for d in before)
            r.hint = (f"{named} failed above and `{r.name}` calls it: fix "
                      f"{', '.join(d.id for d in before)} first, then check {r.id} again")
        failed[r.name] = r


def mark_library(results: list[Result], library: list) -> None:
    """Mark the exercises whose function is quantlab's own (``quantize = quantlab.quantize``)."""
    for r in results:
        if r.name in library and r.status != NOT_ATTEMPTED:
            r.note = LIBRARY_NOTE


def blame_other_notebooks(results: list[Result], uses: dict, imported: dict, grade) -> None:
    """An exercise that failed and calls a function imported from another exercise notebook (e6 calls
    a's ``quantize``) gets a hint naming that function when it fails its own exercise there
    (``grade(exercise)`` checks it): the bug is in the other notebook, not here."""
    verdicts: dict[str, Result] = {}
    for r in results:
        if r.status != FAILED or "failed above" in r.hint:
            continue
        bad = []
        for name in uses.get(r.name, []):
            lesson = imported.get(name)
            if lesson is None:
                continue
            if name not in verdicts:
                ex = next(e for e in exercises()[lesson] if e.name == name)
                verdicts[name] = grade(ex)
            if verdicts[name].status == FAILED:
                bad.append((verdicts[name], lesson))
        # name only the first cause: a7 fails because it calls a5, so a5 alone is named
        failing = {d.name for d, _ in bad}
        bad = [(d, lesson) for d, lesson in bad if not failing & set(uses.get(d.name, []))] or bad
        if bad:
            named = ", ".join(f"`{d.name}` ({d.id}, in {lesson}_exercises.ipynb)" for d, lesson in bad)
            one = len(bad) == 1
            r.hint = (f"{named} {'fails its own check' if one else 'fail their own checks'} and "
                      f"`{r.name}` calls {'it' if one else 'them'}: fix {'it' if one else 'them'} in "
                      f"that notebook first (save it and restart this kernel), then check {r.id} "
                      "again")


def summary(results) -> str:
    n = {s: sum(r.status == s for r in results) for s in (PASSED, FAILED, NOT_ATTEMPTED)}
    return f"{n[PASSED]} passed, {n[FAILED]} failed, {n[NOT_ATTEMPTED]} not attempted"


def format_result(r: Result) -> list[str]:
    head = f"{r.id} {r.name}: {r.status}" + (f" ({r.note})" if r.note else "")
    if r.status != FAILED:
        return [head]
    lines = [head]
    for label, text in (("input", r.input), ("expected", r.expected), ("got", r.got),
                        ("hint", r.hint)):
        if text:
            lines.append(f"    {label + ':':9s} {text}")
    return lines


def run(lesson: str, *names: str) -> None:
    """Check, from a notebook cell, the exercises of ``lesson`` defined so far in this notebook.

    Prints one line per exercise (and the failing input, expected vs got and a hint for a
    failure), then a summary when several were checked. Does nothing while the notebook is being
    imported by another notebook or by ``python -m quantlab.check``.
    """
    caller = sys._getframe(1).f_globals
    if caller.get("__name__") != "__main__":
        return
    results = check_namespace(lesson, caller, names or None)
    for r in results:
        print("\n".join(format_result(r)))
    if not results:
        print(f"no lesson-{lesson} exercise is defined yet")
    elif len(results) > 1:
        print(summary(results))


@dataclass
class FileResult:
    file: str
    lesson: str | None
    results: list
    error: str | None = None
    seconds: float = 0.0


def grade_notebook(path, lesson: str | None = None, names=None) -> FileResult:
    """Import one notebook in this process and grade every exercise of its lesson.

    The notebook's code runs beside the grader here and could change it: for grades use
    :func:`grade_isolated` (what ``python -m quantlab.check`` does); this is for notebooks you
    trust, e.g. the solutions with a planted mistake in the tests.
    """
    start = time.perf_counter()
    path = pathlib.Path(path)
    lesson = lesson or lesson_of(path)
    if lesson is None or lesson not in exercises():
        return FileResult(str(path), lesson, [], f"cannot tell the lesson of {path.name}: name it "
                          "<lesson>_exercises.ipynb or pass --lesson")
    namespace, error = import_notebook(path)
    results = check_namespace(lesson, namespace, names, missing="report")
    if error:
        for r in results:
            if r.note == "not defined":
                r.note = "not reached: the import stopped earlier"
    return FileResult(str(path), lesson, results, error, time.perf_counter() - start)


class _Abort(BaseException):
    """The learner's process timed out or ended: stop this exercise (not a hypothesis failure)."""


def grade_isolated(path, lesson: str | None = None, names=None,
                   timeout: float = 300.0, memory_mb: float | None = None) -> FileResult:
    """Grade one notebook with its code in a separate process (see :mod:`quantlab.sandbox`).

    The learner's functions run in a child process that imported the notebook; the oracles, the
    cases, the comparisons and this report stay here, out of its reach. ``timeout`` seconds
    bound the whole notebook (import and every call); an exercise running at the time limit, or
    when the child ends early, fails, and the ones after it are reported as not checked.
    ``memory_mb`` (where the system supports it) bounds what the child may allocate beyond the
    checker's own imports: past it the notebook's code gets a MemoryError.
    """
    from .sandbox import Sandbox, SandboxError

    start = time.perf_counter()
    path = pathlib.Path(path)
    lesson = lesson or lesson_of(path)
    if lesson is None or lesson not in exercises():
        return FileResult(str(path), lesson, [], f"cannot tell the lesson of {path.name}: name it "
                          "<lesson>_exercises.ipynb or pass --lesson")
    chosen = [ex for ex in exercises()[lesson]
              if not names or ex.name in names or ex.id in names]
    results, error = [], None
    try:
        with Sandbox(str(path), lesson, timeout, memory_mb) as box:
            error = box.ready.error

            def runner(ex, args):
                try:
                    return box.call(ex, args)
                except SandboxError as e:
                    raise _Abort(str(e)) from None

            for i, ex in enumerate(chosen):
                if ex.name not in box.ready.defined:
                    note = "not reached: the import stopped earlier" if error else "not defined"
                    results.append(Result(ex.id, ex.name, NOT_ATTEMPTED, note=note))
                    continue
                try:
                    results.append(_check(ex, runner))
                except _Abort as e:
                    results.append(Result(ex.id, ex.name, FAILED, got=str(e),
                                          hint="the function must return within the time limit"
                                          " and must not end its process"))
                    results += [Result(r.id, r.name, NOT_ATTEMPTED, note="not checked: the "
                                       "notebook's process was stopped") for r in chosen[i + 1:]]
                    error = f"{ex.id} {ex.name}: {e}"
                    break
            blame_dependencies(results, box.ready.uses)
            mark_library(results, box.ready.library or [])
            if error is None or error == box.ready.error:  # the child still answers

                def grade_imported(ex):
                    try:
                        return _check(ex, runner)
                    except _Abort:
                        return Result(ex.id, ex.name, NOT_ATTEMPTED)

                blame_other_notebooks(results, box.ready.uses, box.ready.imported or {},
                                      grade_imported)
    except SandboxError as e:  # while importing the notebook
        error = str(e)
    return FileResult(str(path), lesson, results, error, time.perf_counter() - start)


def _status_counts(fr: FileResult) -> str:
    return summary(fr.results) + (f"; ERROR: {fr.error}" if fr.error else "")


def file_ok(fr: FileResult, strict: bool) -> bool:
    bad = {FAILED} | ({NOT_ATTEMPTED} if strict else set())
    return fr.error is None and bool(fr.results) and not any(r.status in bad for r in fr.results)


STATUS_MARKS = {PASSED: "ok", FAILED: "FAIL", NOT_ATTEMPTED: "-"}


def status_table(header: str, ids: list[str], rows: list[tuple[str, list, str]]) -> list[str]:
    """Lines of a grid: one row per ``(label, results, tail)``, one column per exercise id, each
    cell ok / FAIL / - (not attempted) / ? (missing); ``tail`` ends the row."""
    width = max(len(header), *(len(label) for label, _, _ in rows))
    lines = [f"{header:{width}s}  " + " ".join(f"{i:>4s}" for i in ids)]
    for label, results, tail in rows:
        cells = {r.id: STATUS_MARKS.get(r.status, "?") for r in results}
        lines.append(f"{label:{width}s}  " + " ".join(f"{cells.get(i, '?'):>4s}" for i in ids)
                     + tail)
    return lines


def _table(frs: list[FileResult]) -> list[str]:
    """Rows = files, columns = exercises (per lesson): ok / FAIL / - (not attempted)."""
    lines = []
    for lesson in sorted({fr.lesson for fr in frs if fr.results}):
        rows = [fr for fr in frs if fr.lesson == lesson and fr.results]
        lines += ["", f"lesson {lesson}: " + ", ".join(f"{r.id} {r.name}" for r in rows[0].results)]
        lines += status_table("file", [r.id for r in rows[0].results],
                              [(fr.file, fr.results, "") for fr in rows])
    return lines


def checked_lessons() -> list[str]:
    """The lessons that have exercise checks, one module ``exercise_checks/lesson_<x>.py`` each, in
    the series' order (``a``, ``b``, ..., ``da`` after ``d``), read from the folder without
    importing them."""
    folder = pathlib.Path(__file__).with_name("exercise_checks")
    return sorted(p.stem.removeprefix("lesson_") for p in folder.glob("lesson_*.py"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantlab.check", description=(
        "Grade exercise notebooks: each is imported with import-ipynb in a fresh process and its "
        "functions are checked against quantlab and PyTorch."))
    p.add_argument("notebooks", nargs="*", help="exercise notebooks (.ipynb)")
    p.add_argument("--strict", action="store_true", help="unattempted exercises fail too")
    p.add_argument("--lesson", help=f"the lesson ({', '.join(checked_lessons())}) instead of reading "
                   "it from each notebook's metadata or file name")
    p.add_argument("--jobs", "-j", type=int, default=min(2, os.cpu_count() or 1),
                   help="notebooks checked at the same time (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per notebook, one or many (default: %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="with several notebooks, also print every exercise of each")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fds", help=argparse.SUPPRESS)
    p.add_argument("--fork-server", metavar="FD", help=argparse.SUPPRESS)
    p.add_argument("--memory", type=float, default=None, metavar="MB",
                   help="memory each notebook's process may allocate beyond the checker's own, in MB "
                   "(default: no limit; with --grade: 2048)")
    p.add_argument("--grade", metavar="DIR", help="grade every exercise notebook under DIR (one "
                   "folder per learner) into a grade book: a table, and --csv/--json files")
    p.add_argument("--csv", metavar="FILE", help="with --grade: write the grade book as CSV")
    p.add_argument("--json", metavar="FILE", help="with --grade: write every result as JSON")
    return p


def _report(frs: list[FileResult], strict: bool, verbose: bool) -> None:
    """Every exercise of one notebook (or of each, with --verbose); a line each and a table for
    several."""
    if len(frs) == 1 or verbose:
        for fr in frs:
            print(f"{fr.file} (lesson {fr.lesson}, {fr.seconds:.1f} s)")
            if fr.error:
                print(f"  ERROR: {fr.error}")
            for r in fr.results:
                print("\n".join("  " + line for line in format_result(r)))
            print("  " + summary(fr.results))
        if len(frs) > 1:
            print()
    if len(frs) > 1:
        width = max(len(fr.file) for fr in frs)
        for fr in frs:
            mark = "ok  " if file_ok(fr, strict) else "FAIL"
            print(f"{mark} {fr.file:{width}s}  {_status_counts(fr)}")
        print("\n".join(_table(frs)))
    if strict:
        print("(--strict: exercises not attempted count as failures)")


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.serve:
        from .sandbox import serve

        return serve(args.notebooks[0], args.lesson, args.fds, args.memory)
    if args.fork_server:
        from .forkserver import serve_forever
        from .sandbox import preload

        return serve_forever(int(args.fork_server), main, preload)
    if args.grade:
        from .gradebook import main as gradebook_main

        return gradebook_main(args, p)
    if not args.notebooks:
        p.error("give exercise notebooks to check, or --grade DIR")
    paths = [pathlib.Path(n) for n in args.notebooks]
    for path in paths:
        if not path.is_file():
            p.error(f"no such notebook: {path}")
    if args.timeout <= 0:
        p.error(f"--timeout must be a positive number of seconds; got {args.timeout}")
    # each notebook's code runs in a process of its own (also for one notebook), apart from the
    # grading: it cannot reach the oracles or the report, an endless one is stopped after
    # --timeout, and one that exits early is reported, never passed
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        frs = list(pool.map(lambda q: grade_isolated(q, args.lesson, timeout=args.timeout,
                                                     memory_mb=args.memory), paths))
    _report(frs, args.strict, args.verbose)
    return 0 if all(file_ok(fr, args.strict) for fr in frs) else 1


if __name__ == "__main__":  # run as quantlab.check, not as a second copy named __main__
    from quantlab import check as _check_module

    sys.exit(_check_module.main())
