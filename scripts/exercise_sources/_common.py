"""What every lesson's exercise source shares: the record of one exercise and of one planted mistake."""

from __future__ import annotations

import textwrap
from typing import NamedTuple


def ex(number, name, title, statement, signature, solution):
    """One exercise: its number in the lesson, the function's name, a title, the statement (markdown),
    the signature with its docstring, and the worked solution (the function's body)."""
    return dict(number=number, name=name, title=title, statement=textwrap.dedent(statement).strip(),
                signature=textwrap.dedent(signature).strip("\n") + "\n",
                solution=textwrap.indent(textwrap.dedent(solution).strip("\n"), "    ") + "\n")


class Mistake(NamedTuple):
    """A plausible learner mistake: in the solution of `exercise`, `old` (which occurs exactly once in
    that exercise's solution) becomes `new`. The checker must fail the exercise, and its hint must
    contain `words` (the words that name this mistake and no other)."""

    exercise: str
    old: str
    new: str
    words: str
    what: str = ""  # the mistake in a few words, for the test's id and the README's count
