"""The sources of the exercise notebooks: one module per lesson (``lesson_<letter>.py``), each with
``LESSON`` (title, goal, setup cell, exercises with statements, stubs and solutions) and ``MISTAKES``
(the plausible mistakes its checks must catch). ``scripts/build_exercises.py`` writes the notebooks;
``tests/test_check.py`` plants every mistake."""

from __future__ import annotations

import importlib
import pkgutil


def lessons() -> dict[str, object]:
    """{letter: module} for every lesson with exercises, in the order the notebooks are built
    (alphabetical, so a and d come before e, which imports them)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("lesson_"))
    return {n.removeprefix("lesson_"): importlib.import_module(f"{__name__}.{n}") for n in names}
