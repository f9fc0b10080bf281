"""Build the exercise notebooks from one source: exercises/<lesson>_exercises.ipynb (stubs) and
exercises/solutions/<lesson>_exercises.ipynb (worked solutions), then execute them in place.

Usage: python scripts/build_exercises.py [--no-execute] [--lessons a d e f]
Each exercise is a statement (markdown), a code cell holding the signature and docstring followed by
either ``raise NotImplementedError`` (template) or the solution, and a checking cell. The checks
themselves live in quantlab/exercise_checks/ (one file per lesson); the checker is quantlab/check.py.
The statements and solutions live in scripts/exercise_sources/lesson_<letter>.py, beside the list of
mistakes each exercise's checks must catch.
Notebooks are stored executed top to bottom, without execution timings and widget state.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from exercise_sources import lessons  # noqa: E402  (scripts/ is not a package)

LESSONS = {letter: module.LESSON for letter, module in lessons().items()}
STUB = "    raise NotImplementedError  # replace this line with your code\n"


def build(lesson: str, solution: bool) -> nbformat.NotebookNode:
    spec = LESSONS[lesson]
    up = "../../" if solution else "../"
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "quantlab": {"lesson": lesson}}
    title = spec["title"] + (" · solutions" if solution else "")
    lesson_nb = spec["notebook"]
    # what each lesson's checks compare with (the oracles of quantlab/exercise_checks/lesson_<letter>.py)
    oracle = spec.get("oracle", "a reference implementation")
    how = (f"**Worked solutions.** Every function here passes every check: in this notebook's folder, "
           f"`python -m quantlab.check {lesson}_exercises.ipynb --strict`." if solution else
           "**How to work.** Replace each stub's `raise NotImplementedError` with your code, run the cell, then run the "
           f"check cell under it: it compares your function with {oracle} on tricky and random inputs and "
           "prints `passed`, `not attempted`, or the smallest input it found that fails, with what was expected, what "
           "you returned and a hint. From a shell in this notebook's folder: "
           f"`python -m quantlab.check {lesson}_exercises.ipynb` (from the repository root: "
           f"`python -m quantlab.check exercises/{lesson}_exercises.ipynb`; add `--strict` to fail unattempted exercises "
           "too).")
    nb.cells.append(nbformat.v4.new_markdown_cell(
        f"# {title}\n\nLesson: [{lesson_nb}]({up}notebooks/{lesson_nb}.ipynb). {spec['goal']}\n\n{how}"))
    nb.cells.append(nbformat.v4.new_code_cell(spec["setup"]))
    for e in spec["exercises"]:
        nb.cells.append(nbformat.v4.new_markdown_cell(
            f"## {lesson}{e['number']} · `{e['name']}`: {e['title']}\n\n{e['statement']}"))
        nb.cells.append(nbformat.v4.new_code_cell(
            (e["signature"] + (e["solution"] if solution else STUB)).rstrip("\n")))
        nb.cells.append(nbformat.v4.new_code_cell(
            f'# NBVAL_CHECK_OUTPUT\ncheck.run("{lesson}", "{e["name"]}")'))
    nb.cells.append(nbformat.v4.new_markdown_cell(
        "## All exercises of this notebook\n\nThe same checks for every function defined above, and a summary."))
    nb.cells.append(nbformat.v4.new_code_cell(f'# NBVAL_CHECK_OUTPUT\ncheck.run("{lesson}")'))
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild changes only what changed
        cell.id = f"{lesson}-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, folder: pathlib.Path) -> None:
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            store_widget_state=False, resources={"metadata": {"path": str(folder)}})
    client.execute(stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-execute", action="store_true", help="write the notebooks without outputs")
    p.add_argument("--lessons", nargs="+", default=list(LESSONS), choices=list(LESSONS),
                   help="rebuild only these lessons (default: all)")
    args = p.parse_args()
    for solution in (False, True):
        folder = ROOT / "exercises" / ("solutions" if solution else "")
        folder.mkdir(parents=True, exist_ok=True)
        for lesson in args.lessons:  # a, d before e: e imports them
            nb = build(lesson, solution)
            path = folder / f"{lesson}_exercises.ipynb"
            nbformat.write(nb, path)  # siblings must exist on disk before e imports them
            if not args.no_execute:
                start = time.perf_counter()
                execute(nb, folder)
                nbformat.write(nb, path)
                print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
