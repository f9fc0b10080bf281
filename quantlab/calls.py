"""Calling a learner's function: what it returned or raised, as data (``Returned``,
``Raised``). The exercise checker (:mod:`quantlab.check`) calls it in its own process, the sandbox
(:mod:`quantlab.sandbox`) in the learner's; neither needs the other to do so.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass


def _raised_by(fn, exc: BaseException) -> bool:
    """True when ``exc`` was raised in ``fn``'s own body (not in a function it called)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is getattr(fn, "__code__", None)


def _last_function(exc: BaseException) -> tuple[str, str]:
    """(function name, module name) of the frame that raised ``exc``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?", ""
    return tb.tb_frame.f_code.co_name, str(tb.tb_frame.f_globals.get("__name__", ""))


@dataclass
class Returned:
    """What a learner's function returned."""
    value: object


@dataclass
class Raised:
    """What a learner's function raised: the exception's type and first line, the function and
    module it was raised in, and whether it was raised in the exercise's own body."""
    type: str
    message: str
    where: str
    module: str
    in_function: bool


def call_function(ex, fn, args: list) -> Returned | Raised:
    """Call the learner's ``fn`` for exercise ``ex`` on ``args`` (through the exercise's own
    calling convention, e.g. with autograd for a gradient), its output discarded."""
    call = ex.extra.get("call")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Returned(call(fn, *args) if call else fn(*args))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the learner's code raised (or called sys.exit): a failure here
        where, module = _last_function(e)
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        return Raised(type(e).__name__, first_line, where, module, _raised_by(fn, e))


def _code_names(code) -> set:
    """The global names a code object reads, its nested functions' and lambdas' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def exercise_calls(namespace: dict, names) -> dict:
    """For each function of ``names`` defined in ``namespace``: the other functions of ``names``
    it calls, directly or through helper functions of the same namespace (read from the global
    names their code uses, so a call that is never reached counts too)."""
    names = set(names)
    uses = {}
    for start in names:
        fn = namespace.get(start)
        if not callable(fn) or not hasattr(fn, "__code__"):
            continue
        seen, todo, found = {start}, [fn], set()
        while todo:
            for n in _code_names(todo.pop().__code__):
                obj = namespace.get(n)
                if n in names and n != start:
                    found.add(n)
                elif n not in seen and hasattr(obj, "__code__") and \
                        getattr(obj, "__globals__", None) is namespace:
                    seen.add(n)
                    todo.append(obj)
        uses[start] = sorted(found)
    return uses



def imported_exercises(namespace: dict, lessons: dict) -> dict:
    """Functions of ``namespace`` imported from another exercise notebook (``from a_exercises import
    quantize`` in e's): {name: lesson} for each whose module is ``<lesson>_exercises`` and whose name
    is one of that lesson's exercises (``lessons``: {lesson: [exercise names]})."""
    found = {}
    for name, obj in namespace.items():
        module = str(getattr(obj, "__module__", None) or "")
        if not callable(obj) or not module.endswith("_exercises") or \
                getattr(obj, "__globals__", namespace) is namespace:
            continue
        lesson = module[: -len("_exercises")].rsplit("_", 1)[-1]
        if name in lessons.get(lesson, ()):
            found[name] = lesson
    return found


def library_functions(namespace: dict, names) -> list:
    """The functions of ``names`` in ``namespace`` that are quantlab's own (``quantize = quantlab.quantize``):
    a copied function passes its exercise, so the grade marks it."""
    return [n for n in names if callable(namespace.get(n)) and
            str(getattr(namespace[n], "__module__", None) or "").split(".")[0] == "quantlab"]
