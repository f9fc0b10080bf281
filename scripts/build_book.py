"""Build the quantlab book: a static HTML site from the stored, executed notebooks (``make book``).

Nothing is executed and nothing is fetched: the notebooks are rendered with the outputs they were
stored with. The sources are staged in ``<out>/src`` from whatever exists at build time:

    index.md              the README (the landing page) and the table of contents
    notebooks/*.ipynb     every lesson, in sorted (= teaching) order, each with a box that links
                          the quantlab functions it teaches (the README's mapping table) to the API
    exercises/*.ipynb     the exercise templates with a note on how to check them (when exercises/ exists)
    api/*.md              one page per quantlab module, generated from the docstrings (autodoc)

then Sphinx (docs/conf.py) writes ``<out>/html``. Staged files are rewritten only when their content
changes, so a second build only re-renders what changed.

The Chinese edition (``make book-zh``: ``--language zh_CN``) is built from the same staged sources by
Sphinx's i18n, which replaces each message by its translation in docs/locale/zh_CN/LC_MESSAGES (see
scripts/translations.py), into ``build/book/zh_CN/html``; every page of either edition links to the
same page of the other.

Usage: python scripts/build_book.py [--out build/book] [--language zh_CN] [--strict]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# the layers, lowest first (modules not listed here follow in sorted order)
MODULE_ORDER = ["qparams", "quantize", "observers", "observer", "learned", "fixed_point", "qmodule",
                "requantize", "qat_simulation", "weighted", "modules", "ops", "graph", "patterns",
                "passes", "convert", "models", "ptq", "export", "onnx_nodes", "npz", "engine",
                "engine_kernels", "reference", "data", "training", "stats", "checkpoints", "text",
                "lm_training", "weight_only", "gptq", "awq", "act_quant", "rotation", "w8a8",
                "ort_dynamic", "minifloat", "block_formats", "plots", "explorer", "check", "calls",
                "notebook_import", "sandbox", "forkserver", "gradebook", "exercise_checks"]


def lessons() -> list[pathlib.Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def exercises() -> list[pathlib.Path]:
    return sorted((ROOT / "exercises").glob("*.ipynb"))


def modules() -> list[str]:
    """quantlab's public modules in layer order; a subpackage (``exercise_checks``) is followed by
    its modules (``exercise_checks.lesson_a``, ...)."""
    pkg = ROOT / "quantlab"
    names = [p.stem for p in sorted(pkg.glob("*.py")) if not p.stem.startswith("_")]
    names += [p.parent.name for p in sorted(pkg.glob("*/__init__.py"))]
    rank = {n: i for i, n in enumerate(MODULE_ORDER)}
    out = []
    for name in sorted(names, key=lambda n: (rank.get(n, len(rank)), n)):
        out.append(name)
        out += [f"{name}.{p.stem}" for p in sorted((pkg / name).glob("*.py"))
                if (pkg / name).is_dir() and not p.stem.startswith("_")]
    return out


# --- the README's mapping table: notebook -> quantlab names -------------------------------------

def readme_functions(readme: str) -> dict[str, list[str]]:
    """``{notebook stem: [names as written]}`` from the README's table rows ``| `stem` | ... | ... |``."""
    table = {}
    for line in readme.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) < 3 or not re.fullmatch(r"`[a-z][a-z0-9_]*`", cols[0]):
            continue
        stem = cols[0].strip("`")
        names = []
        for span in re.findall(r"`([^`]+)`", cols[-1]):
            m = re.match(r"(?:quantlab\.)?([A-Za-z_][\w.]*(?:/[A-Za-z_]\w*)*)", span)
            if not m:
                continue
            first, *siblings = m.group(1).split("/")
            names.append(first)
            prefix = first.rsplit(".", 1)[0] + "." if "." in first else ""
            names += [prefix + s for s in siblings]
        table[stem] = names
    return table


def resolve(name: str) -> str | None:
    """The documented (defining) location of ``quantlab.<name>``, e.g. ``quantlab.qparams.quant_range``;
    None if there is no such object."""
    obj, path = importlib.import_module("quantlab"), ["quantlab"]
    owner = None
    for part in name.split("."):
        try:
            sub = importlib.import_module(".".join(path + [part]))
        except ImportError:
            sub = None
        nxt = sub if sub is not None and not hasattr(obj, part) else getattr(obj, part, sub)
        if nxt is None:
            return None
        owner, obj = obj, nxt
        path.append(part)
    return _location(obj, owner, path[-1])


def _location(obj, owner, attr: str) -> str | None:
    if inspect.ismodule(obj):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    if inspect.isclass(owner):  # a property or attribute of a class
        return f"{owner.__module__}.{owner.__qualname__}.{attr}"
    return None


def resolve_method(name: str) -> str | None:
    """A bare method name (e.g. ``accumulator_bound``): the first public quantlab class that has it,
    in layer order (inherited methods are documented on each public class)."""
    for module in modules():
        mod = importlib.import_module(f"quantlab.{module}")
        for cls_name, cls in sorted(vars(mod).items()):
            if (inspect.isclass(cls) and not cls_name.startswith("_") and cls.__module__ == mod.__name__
                    and any(name in vars(base) for base in cls.__mro__
                            if base.__module__.startswith("quantlab"))):
                return f"{mod.__name__}.{cls.__qualname__}.{name}"
    return None


def function_box(names: list[str]) -> tuple[str, list[str]]:
    """A MyST admonition linking each name to the API reference; also returns the unresolved names."""
    links, missing = [], []
    for name in dict.fromkeys(names):
        target = resolve(name) or ("." not in name and resolve_method(name)) or None
        if target is None:
            missing.append(name)
            links.append(f"`{name}`")
        else:
            links.append(f"{{py:obj}}`{name} <{target}>`")
    text = ("```{admonition} quantlab in this lesson\n:class: tip\n"
            + ", ".join(links) + "\n\n(links to the [API reference](../api/index.md))\n```")
    return text, missing


# --- staging ---------------------------------------------------------------------------------------

def write_if_changed(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def md_cell(text: str, cell_id: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text}


def stage_notebook(src: pathlib.Path, dst: pathlib.Path, note: str | None) -> None:
    nb = json.loads(src.read_text())
    nb = copy.deepcopy(nb)
    nb["metadata"].pop("widgets", None)  # no widget state: nothing for a widget manager to load
    if note:
        nb["cells"].insert(1, md_cell(note, "quantlab-book-note"))
        if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) < (4, 5):
            nb["cells"][1].pop("id")
    write_if_changed(dst, json.dumps(nb, indent=1, ensure_ascii=False))


def toctree(caption: str, entries: list[str]) -> str:
    return "\n".join(["```{toctree}", f":caption: {caption}", ":hidden:", ":maxdepth: 1", "",
                      *entries, "```", ""])


def local_targets(markdown: str) -> list[str]:
    """Relative link and image targets of a markdown text (no URLs, no anchors)."""
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", markdown)
    targets += re.findall(r"<img[^>]*src=\"([^\"]+)\"", markdown)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def readme_text() -> str:
    """The README as the book's landing page: without the line linking README.zh-CN.md (for readers on
    GitHub; every page of the book links to the same page of the other edition)."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"^.*\(README\.zh-CN\.md\).*\n\n?", "", text, flags=re.M)


def stage(src: pathlib.Path, language: str = "en") -> dict:
    """Write the book's sources into ``src``; return what was staged (for the report). The Chinese
    edition's exercise notes name the Chinese exercise notebooks (exercises/zh/)."""
    readme = readme_text()
    table = readme_functions(readme)
    staged = {"lessons": [], "exercises": [], "modules": modules(), "missing": {}}
    wanted = {"index.md", "api", "notebooks"}

    for path in lessons():
        box, missing = function_box(table.get(path.stem, []))
        if missing:
            staged["missing"][path.stem] = missing
        if path.stem not in table:
            staged["missing"][path.stem] = ["(no row in the README's notebook table)"]
        stage_notebook(path, src / "notebooks" / path.name, box if path.stem in table else None)
        staged["lessons"].append(f"notebooks/{path.stem}")

    if exercises():
        wanted.add("exercises")
        for path in exercises():
            where = f"exercises/{'zh/' if language == 'zh_CN' else ''}{path.name}"
            note = ("```{admonition} Check your answers\n:class: note\n"
                    "Open this notebook in Jupyter (`make lab`), fill in the cells marked for you, "
                    "run it, then check it from the repository's folder:\n\n"
                    f"    python -m quantlab.check {where}\n\n"
                    "The checker runs your notebook and compares your answers with the reference named "
                    "at the top of the notebook.\n```")
            stage_notebook(path, src / "exercises" / path.name, note)
            staged["exercises"].append(path.stem)
        write_if_changed(src / "exercises" / "index.md", "\n".join([
            "# Exercises", "",
            "Exercise notebooks for the lessons "
            + ", ".join(n.split("_")[0] for n in staged["exercises"])
            + " (every lesson also ends with questions of its own):", "",
            *[f"- [{n}]({n}.ipynb)" for n in staged["exercises"]], "",
            "Each is a template: the cells to fill in are marked; "
            "the solutions are in `exercises/solutions/` in the repository (not in this book). "
            "Check a notebook you filled in with", "",
            "```bash", "python -m quantlab.check exercises/<notebook>.ipynb", "```", "",
            toctree("Exercises", staged["exercises"])]))

    package_doc = inspect.getdoc(importlib.import_module("quantlab")) or ""
    api = ["# API reference", "",
           "Generated from the docstrings of the `quantlab` package, lowest layer first.", "",
           "```{eval-rst}", package_doc, "```", "",
           "Modules, lowest layer first:", "",
           *[f"- [quantlab.{n}]({n}.md)" for n in staged["modules"]], "",
           toctree("Modules", staged["modules"])]
    write_if_changed(src / "api" / "index.md", "\n".join(api))
    for name in staged["modules"]:
        # a package's page shows its docstring; its modules' pages document the members (the
        # names it re-exports would otherwise be documented twice, under two paths)
        package = (ROOT / "quantlab" / name.replace(".", "/")).is_dir()
        write_if_changed(src / "api" / f"{name}.md", "\n".join([
            f"# quantlab.{name}", "", "```{eval-rst}", f".. automodule:: quantlab.{name}",
            *(["   :no-members:"] if package else []), "```", ""]))

    # files the README links to or shows (e.g. docs/screenshot.png), at the same relative place
    for target in local_targets(readme):
        path = ROOT / target
        if path.is_file() and path.suffix not in {".md", ".ipynb"}:
            (src / target).parent.mkdir(parents=True, exist_ok=True)
            if not (src / target).exists() or (src / target).read_bytes() != path.read_bytes():
                shutil.copyfile(path, src / target)
            wanted.add(target.split("/")[0])

    index = [readme, "",
             toctree("Lessons", staged["lessons"]),
             toctree("Exercises", ["exercises/index"]) if staged["exercises"] else "",
             toctree("Reference", ["api/index"])]
    write_if_changed(src / "index.md", "\n".join(index))

    # sources of notebooks, exercises or modules that no longer exist
    keep = {f"{p}.ipynb" for p in staged["lessons"]}
    keep |= {f"exercises/{p}.ipynb" for p in staged["exercises"]} | {"exercises/index.md"}
    keep |= {f"api/{m}.md" for m in staged["modules"]} | {"api/index.md"}
    for path in list(src.rglob("*.ipynb")) + list(src.glob("api/*.md")) + list(src.glob("exercises/*.md")):
        if path.relative_to(src).as_posix() not in keep:
            path.unlink()
    for path in src.iterdir():
        if path.name not in wanted:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return staged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: build/book, and build/book/zh_CN for the "
                        "Chinese edition)")
    parser.add_argument("--language", default="en", choices=["en", "zh_CN"],
                        help="the edition: en (the source) or zh_CN (translated by docs/locale/zh_CN)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on any Sphinx warning and on README names that do not resolve")
    args = parser.parse_args(argv)
    default = ROOT / "build" / "book" / ("" if args.language == "en" else args.language)
    out = pathlib.Path(args.out or default).resolve()
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    staged = stage(out / "src", args.language)
    # viewcode rewrites a module's source page only when the module changed, so its links to the
    # API pages can go stale: regenerate them every time (it takes a second)
    shutil.rmtree(out / "html" / "_modules", ignore_errors=True)
    warnings = out / "warnings.txt"
    # -E: read every source afresh (an incremental environment keeps stale API cross-references)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-c", str(ROOT / "docs"),
           "-d", str(out / "doctrees"), "-w", str(warnings), str(out / "src"), str(out / "html")]
    if args.language != "en":
        cmd[3:3] = ["-D", f"language={args.language}"]
    if args.strict:
        cmd[3:3] = ["-W", "--keep-going"]
    rc = subprocess.call(cmd, cwd=ROOT)
    seconds = time.perf_counter() - t0
    pages = len(list((out / "html").rglob("*.html")))
    print(f"book: {len(staged['lessons'])} lessons, {len(staged['exercises'])} exercises, "
          f"{len(staged['modules'])} API pages; {pages} HTML files in {seconds:.1f} s -> "
          f"{out / 'html' / 'index.html'}")
    for stem, names in staged["missing"].items():
        print(f"book: README names for {stem} that are not in quantlab: {', '.join(names)}")
    if rc == 0 and args.strict and staged["missing"]:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
