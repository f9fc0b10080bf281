"""Import a learner's notebook as a module, as the original series did (import-ipynb), for the
exercise checker (:mod:`quantlab.check`, :mod:`quantlab.sandbox`): in its own folder, with an IPython
shell that tolerates magics and shell commands, stopping at the first failing cell.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pathlib
import re
import sys
import types
import warnings


def lesson_of(path: pathlib.Path) -> str | None:
    """The notebook's lesson: metadata ``quantlab.lesson`` first, else its file name."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
        lesson = meta.get("quantlab", {}).get("lesson")
        if lesson:
            return str(lesson)
    except (OSError, ValueError, AttributeError):
        pass
    m = re.search(r"(?:^|[^A-Za-z])([a-z]{1,2})_exercises", path.name)
    return m.group(1) if m else None


def preload() -> None:
    """Import what :func:`import_notebook` needs (IPython, import-ipynb, nbformat) without
    running anything: no shell is made (its history would start a thread)."""
    sys.modules.setdefault("rfc3987_syntax", None)  # jsonschema builds a slow IRI grammar otherwise
    import import_ipynb  # noqa: F401
    import nbformat  # noqa: F401
    from IPython.core.interactiveshell import InteractiveShell  # noqa: F401


def _shell():
    """An IPython shell for the notebook's magics (get_ipython()), tolerant of failing magics."""
    sys.modules.setdefault("rfc3987_syntax", None)  # jsonschema builds a slow IRI grammar otherwise
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    if not getattr(shell, "_quantlab_tolerant", False):
        def tolerant(method):
            def call(*args, **kwargs):
                try:
                    return method(*args, **kwargs)
                except Exception as e:
                    print(f"quantlab.check: skipped magic {args[:1]} ({type(e).__name__}: {e})",
                          file=sys.stderr)
            return call

        shell.run_line_magic = tolerant(shell.run_line_magic)
        shell.run_cell_magic = tolerant(shell.run_cell_magic)
        shell.system = lambda cmd: print(f"quantlab.check: skipped shell command !{cmd}",
                                         file=sys.stderr)
        shell.getoutput = lambda cmd, split=True: []
        shell._quantlab_tolerant = True
    builtins.get_ipython = lambda: shell
    return shell


def import_notebook(path) -> tuple[dict, str | None]:
    """Import a notebook with import-ipynb, in its own folder; return (globals, error or None).

    The notebook's folder is the working directory and first on ``sys.path`` while it runs, so its
    ``import import_ipynb`` / ``from a_exercises import ...`` finds its sibling notebooks. Its
    output is discarded; an exception stops the import (the globals defined so far are returned).
    """
    path = pathlib.Path(path).resolve()
    shell = _shell()
    import import_ipynb  # noqa: F401  (registers its finder: the notebook's own notebook imports)
    from nbformat import read

    stem = path.stem if path.stem.isidentifier() else "learner_notebook"
    mod = types.ModuleType(stem)
    mod.__file__ = str(path)
    old_cwd, old_path, old_modules = os.getcwd(), list(sys.path), set(sys.modules)
    error = None
    os.chdir(path.parent)
    sys.path.insert(0, str(path.parent))
    saved_ns = shell.user_ns
    shell.user_ns = mod.__dict__
    try:
        try:
            with open(path, encoding="utf-8") as f:
                nb = read(f, 4)
            code_cells = [c for c in nb.cells if c.cell_type == "code"]
        except Exception as e:  # not JSON, truncated, not UTF-8, not a notebook ({})
            return {}, (f"cannot read {path.name} as a notebook ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                        "is it a saved .ipynb file?")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, cell in enumerate(code_cells, 1):
                # import-ipynb's own loop (NotebookLoader.exec_module), with the cell number kept
                code = shell.input_transformer_manager.transform_cell(cell.source)
                try:
                    exec(compile(code, f"<{path.name} code cell {i}>", "exec"), mod.__dict__)
                except BaseException as e:
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    error = f"code cell {i} raised {type(e).__name__}: {e}"
                    break
    finally:
        shell.user_ns = saved_ns
        os.chdir(old_cwd)
        sys.path[:] = old_path
        for name in set(sys.modules) - old_modules:  # sibling notebooks: import them afresh next time
            origin = getattr(sys.modules[name], "origin", None) or getattr(
                getattr(sys.modules[name], "__spec__", None), "origin", None)
            if isinstance(origin, str) and origin.endswith(".ipynb"):
                del sys.modules[name]
    return mod.__dict__, error
