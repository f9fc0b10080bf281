"""A teacher's grade book: every exercise notebook under a folder, graded, as a table, CSV and JSON.

``python -m quantlab.check --grade submissions/ --csv grades.csv --json grades.json``

Each learner hands in their exercise notebooks in a folder of their own (``submissions/alice/
a_exercises.ipynb``), or as files named after them (``submissions/alice_a_exercises.ipynb``).
Every notebook is graded as the command line grades one (:func:`quantlab.check.grade_isolated`):
its code in a process of its own, with a time limit (``--timeout``, seconds per notebook) and a
memory limit (``--memory``, MB beyond the checker's own; 2048 by default here), the grade decided
in a process the notebook cannot reach. One point per exercise passed.
"""

from __future__ import annotations

import csv
import json
import pathlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from .check import PASSED, FileResult, exercises, grade_isolated, lesson_of, status_table

#: --memory's default with --grade (MB a notebook's process may allocate beyond the checker's)
DEFAULT_MEMORY_MB = 2048


@dataclass
class Entry:
    """One graded notebook of one learner."""
    learner: str
    file: str
    result: FileResult

    @property
    def lesson(self) -> str | None:
        return self.result.lesson

    @property
    def points(self) -> int:
        return sum(r.status == PASSED for r in self.result.results)

    @property
    def max_points(self) -> int:
        return len(exercises().get(self.lesson, [])) if self.lesson else 0


def find_notebooks(root) -> list[tuple[str, pathlib.Path]]:
    """``(learner, path)`` of every exercise notebook under ``root`` (hidden folders and Jupyter's
    checkpoints skipped): the learner is the first folder below ``root``, or, for a file directly
    in ``root``, its name before ``_<lesson>_exercises``."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"--grade needs a folder of submissions; {root} is not a folder")
    found = []
    for path in sorted(root.rglob("*.ipynb")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        lesson = lesson_of(path)
        if lesson is None:
            continue
        if len(rel.parts) > 1:
            learner = rel.parts[0]
        else:
            stem = path.stem
            cut = stem.rfind(f"{lesson}_exercises")
            learner = stem[:cut].rstrip("_-. ") if cut > 0 else stem
        found.append((learner, path))
    return found


def grade_folder(root, timeout: float = 300.0, memory_mb: float | None = DEFAULT_MEMORY_MB,
                 jobs: int = 2) -> list[Entry]:
    """Grade every exercise notebook under ``root`` (``jobs`` at a time)."""
    found = find_notebooks(root)

    def grade(item):
        learner, path = item
        return Entry(learner, str(path), grade_isolated(path, timeout=timeout, memory_mb=memory_mb))

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(grade, found))


def _exercise_ids() -> list[str]:
    return [ex.id for lesson in sorted(exercises()) for ex in exercises()[lesson]]


def rows(entries: list[Entry]) -> list[dict]:
    """One flat row per notebook: learner, lesson, file, one column per exercise id (passed,
    failed, not attempted; empty for another lesson's exercises), points, max_points, error."""
    out = []
    for e in entries:
        status = {r.id: r.status for r in e.result.results}
        out.append({"learner": e.learner, "lesson": e.lesson or "", "file": e.file,
                    **{i: status.get(i, "") for i in _exercise_ids()},
                    "points": e.points, "max_points": e.max_points,
                    "error": e.result.error or "", "seconds": round(e.result.seconds, 1)})
    return out


def write_csv(entries: list[Entry], path) -> None:
    table = rows(entries)
    fields = ["learner", "lesson", "file", *_exercise_ids(), "points", "max_points", "error",
              "seconds"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


def write_json(entries: list[Entry], path) -> None:
    data = [{"learner": e.learner, "lesson": e.lesson, "file": e.file, "points": e.points,
             "max_points": e.max_points, "error": e.result.error, "seconds": e.result.seconds,
             "results": [asdict(r) for r in e.result.results]} for e in entries]
    pathlib.Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def format_table(entries: list[Entry]) -> list[str]:
    """Per lesson: one line per learner, ok / FAIL / - per exercise, the points and any error."""
    lines = []
    for lesson in sorted({e.lesson for e in entries if e.lesson}):
        chosen = [e for e in entries if e.lesson == lesson]
        ids = [ex.id for ex in exercises()[lesson]]
        rows = [(e.learner, e.result.results, f"  {e.points}/{e.max_points}" + (
            f"  ERROR: {e.result.error[:120]}" if e.result.error else "")) for e in chosen]
        table = status_table("learner", ids, rows)
        lines += ["", f"lesson {lesson}", table[0] + "  points", *table[1:]]
    return lines


def main(args, parser) -> int:
    """``--grade DIR``: grade, print the table, write ``--csv`` / ``--json``; exit 0 when the grade
    book was made (the learners' failures are its content), 2 when there is nothing to grade."""
    try:
        found = find_notebooks(args.grade)
    except ValueError as e:
        parser.error(str(e))
    if not found:
        parser.error(f"no exercise notebook (<lesson>_exercises.ipynb, or one with quantlab lesson "
                     f"metadata) under {args.grade}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds; got {args.timeout}")
    memory = DEFAULT_MEMORY_MB if args.memory is None else args.memory
    if memory < 0:
        parser.error(f"--memory must be >= 0 MB (0: no limit); got {args.memory}")
    entries = grade_folder(args.grade, args.timeout, memory or None, args.jobs)
    print(f"{len(entries)} notebooks of {len({e.learner for e in entries})} learners under "
          f"{args.grade} (time limit {args.timeout:.0f} s, memory limit "
          f"{f'{memory:.0f} MB' if memory else 'none'} per notebook)")
    print("\n".join(format_table(entries)))
    if args.csv:
        write_csv(entries, args.csv)
        print(f"\ngrade book: {args.csv}")
    if args.json:
        write_json(entries, args.json)
        print(f"every result: {args.json}")
    return 0
