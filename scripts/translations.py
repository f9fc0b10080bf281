"""The Chinese edition from one source (``make translations``): gettext catalogs and generated notebooks.

English is the source. Its prose is cut into messages by Sphinx's own ``gettext`` builder on the sources
the book is built from (scripts/build_book.py stages them), one catalog per document:

    docs/locale/zh_CN/LC_MESSAGES/index.po                    the README (the book's landing page)
    docs/locale/zh_CN/LC_MESSAGES/notebooks/<lesson>.po       every lesson notebooks/*.ipynb
    docs/locale/zh_CN/LC_MESSAGES/exercises/<name>.po         every exercise notebook exercises/*.ipynb
    docs/locale/zh_CN/LC_MESSAGES/exercises/index.po          the book's exercise index page

A message is one block of the markdown (a heading, a paragraph, a list item's paragraph, a table cell,
a display formula), its msgid the block's MyST source with line breaks as spaces: the granularity of
Sphinx's i18n, which applies the same catalogs to the Chinese book by msgid. The Chinese notebooks
``notebooks/zh/*.ipynb`` and ``exercises/zh/*.ipynb`` are made here from the English ones: code cells,
outputs and metadata copied unchanged, each markdown cell cut into the same blocks by the same parser
(myst-parser, the messages taken by Sphinx's ``extract_messages``) and each block replaced by its
translation. Relative links in the prose are pointed at the Chinese notebooks (``../exercises/x.ipynb``
becomes ``../../exercises/zh/x.ipynb``). An entry that is untranslated or fuzzy leaves the English
block in place (tests/test_translations.py fails on such entries once the catalogs are meant to be
complete).

Steps (all by default):
    extract   stage the book's sources, run ``sphinx -b gettext`` into build/i18n/pot, then
              ``sphinx-intl update`` the catalogs (new messages untranslated, changed ones fuzzy, removed
              ones obsolete); messages with nothing to translate (formulas, code, API links) and the
              book's own notes are filled in here
    generate  write notebooks/zh/ and exercises/zh/ from the English notebooks and the catalogs

Usage: python scripts/translations.py [extract] [generate] [--check]
``--check`` writes nothing and exits 1 when a generated notebook is out of date.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LANGUAGE = "zh_CN"
LOCALE = ROOT / "docs" / "locale"
CATALOGS = LOCALE / LANGUAGE / "LC_MESSAGES"
BUILD = ROOT / "build" / "i18n"
ZH = "zh"  # the folder of the generated notebooks, beside the English ones

# the book's own notes (scripts/build_book.py adds them to every lesson and exercise page): filled in here
BOOK_TEXT = {
    "quantlab in this lesson": "本课用到的 quantlab",
    "(links to the [API reference](../api/index.md))": "（链接到 [API 参考](../api/index.md)）",
    "Check your answers": "检查你的答案",
    "Open this notebook in Jupyter (`make lab`), fill in the cells marked for you, run it, then check it "
    "from the repository's folder:":
        "在 Jupyter 中打开本 notebook（`make lab`），填写为你标出的单元格并运行，然后在仓库的根目录下检查：",
    "The checker runs your notebook and compares your answers with the reference named at the top of the "
    "notebook.":
        "检查程序会运行你的 notebook，并把你的答案与 notebook 开头所写的参考实现比较。",
}

MYST_SETTINGS = {  # as docs/conf.py configures myst for the book
    "myst_enable_extensions": {"dollarmath", "amsmath", "colon_fence"},
    "myst_heading_anchors": 3,
    "myst_dmath_double_inline": True,
    "report_level": 5, "halt_level": 5, "warning_stream": False,
    "doctitle_xform": False, "sectsubtitle_xform": False,  # a cell's first heading is a heading, not a title
}


# --- the English sources and their Chinese counterparts ------------------------------------------

def notebooks() -> list[pathlib.Path]:
    """Every English notebook that has a catalog: the lessons and the exercise templates."""
    return sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "exercises").glob("*.ipynb"))


def docname(path: pathlib.Path) -> str:
    """The book's document name of an English source (= its catalog's path in LC_MESSAGES, less .po)."""
    rel = path.resolve().relative_to(ROOT)
    return "index" if rel.as_posix() == "README.md" else rel.with_suffix("").as_posix()


def catalog_path(doc: str) -> pathlib.Path:
    return CATALOGS / f"{doc}.po"


def zh_path(path: pathlib.Path) -> pathlib.Path:
    """notebooks/a.ipynb -> notebooks/zh/a.ipynb (the generated Chinese notebook)."""
    return path.parent / ZH / path.name


# --- segmentation: the messages of a markdown text, as Sphinx's gettext builder cuts them ---------

@functools.lru_cache(maxsize=4096)
def messages(markdown: str) -> tuple[tuple[str, str, int], ...]:
    """``(msgid, node type, line)`` of each translatable block of a MyST markdown text, in order."""
    from docutils.core import publish_doctree
    from myst_parser.parsers.docutils_ import Parser
    from sphinx.util.nodes import extract_messages

    doc = publish_doctree(markdown, parser=Parser(), settings_overrides=MYST_SETTINGS)
    return tuple((msg, type(node).__name__, node.line or 1) for node, msg in extract_messages(doc))


def _pattern(msgid: str) -> re.Pattern:
    # the msgid is the block's source with each line break made a space; in the source a space of the
    # msgid may be a line break followed by the indentation of a list item or a block quote's '>'
    words = msgid.strip().split(" ")
    return re.compile(r"(?:[ \t]*\n[ \t>]*|[ \t]+)".join(re.escape(w) for w in words if w != "")
                      if msgid.strip() else r"(?!)")


def segments(markdown: str) -> list[tuple[int, int, str, str]]:
    """``(start, end, msgid, node type)`` of each message's span in ``markdown``, in order; a message
    inside another one's span (a ``$$ ... $$`` formula within a paragraph: Sphinx extracts both) has
    node type ``"nested"`` and is translated with the message around it.

    Raises ValueError when a message cannot be found where the parser put it (the proof that the
    notebooks and the book cut the text the same way is tests/test_translations.py)."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", markdown)]
    spans, pos = [], 0
    for msgid, kind, line in messages(markdown):
        pattern = _pattern(msgid)
        start = max(pos, line_starts[min(max(line - 1, 0), len(line_starts) - 1)])
        m = pattern.search(markdown, start) or pattern.search(markdown, pos)
        outer = next((s for s in reversed(spans) if s[3] != "nested"), None)
        if m is None and outer is not None:
            inner = pattern.search(markdown, outer[0], outer[1])
            if inner is not None:
                spans.append((inner.start(), inner.end(), msgid, "nested"))
                continue
        if m is None:
            raise ValueError(f"message not found in its markdown: {msgid[:80]!r}")
        spans.append((m.start(), m.end(), msgid, kind))
        pos = m.end()
    return spans


def nothing_to_translate(msgid: str, kind: str = "paragraph") -> bool:
    """A display formula, or a block of only code spans, inline math, roles and punctuation."""
    if kind in {"math_block", "literal_block"}:
        return True
    rest = re.sub(r"\{[\w:-]+\}`[^`]*`|`[^`]*`|\$\$.*?\$\$|\$[^$]*\$|\]\([^)]*\)", " ", msgid)
    # identifiers and file names (a_exercises, qparams.py) are not words to translate either
    rest = re.sub(r"\b\w+(?:[_.]\w+)+\b", " ", rest)
    return not re.search(r"[A-Za-z\u4e00-\u9fff]", rest)


def translate(markdown: str, table: dict[str, str]) -> str:
    """``markdown`` with each block replaced by ``table[msgid]``; a block without a translation (or
    whose translation is the msgid itself) keeps its source text, line breaks included."""
    out, pos = [], 0
    for start, end, msgid, kind in segments(markdown):
        if kind == "nested":
            continue
        out.append(markdown[pos:start])
        text = table.get(msgid)
        out.append(markdown[start:end] if not text or text == msgid else text)
        pos = end
    out.append(markdown[pos:])
    return "".join(out)


# --- links in the generated notebooks --------------------------------------------------------------

def _relink_target(target: str, src_dir: str, dst_dir: str) -> str:
    if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):
        return target  # a URL, an anchor in the same page, an absolute path
    path, _, anchor = target.partition("#")
    repo_path = posixpath.normpath(posixpath.join(src_dir, path))
    head, name = posixpath.split(repo_path)
    if repo_path == "README.md":
        repo_path = "README.zh-CN.md"
    elif name.endswith(".ipynb") and head in {"notebooks", "exercises"} and (ROOT / repo_path).exists():
        repo_path = posixpath.join(head, ZH, name)
    new = posixpath.relpath(repo_path, dst_dir)
    return new + ("#" + anchor if anchor else "")


def relink(markdown: str, src_dir: str, dst_dir: str) -> str:
    """Relative link targets ``](...)`` of a markdown text, rewritten from ``src_dir`` to ``dst_dir``
    (both relative to the repository) and pointed at the Chinese notebooks and README."""
    return re.sub(r"(\]\()([^)\s]+)(\))",
                  lambda m: m.group(1) + _relink_target(m.group(2), src_dir, dst_dir) + m.group(3), markdown)


# --- catalogs --------------------------------------------------------------------------------------

def read_catalog(doc: str):
    from babel.messages.pofile import read_po
    path = catalog_path(doc)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return read_po(f, locale=LANGUAGE)


def translations(doc: str) -> dict[str, str]:
    """``{msgid: msgstr}`` of the translated, non-fuzzy entries of a document's catalog."""
    catalog = read_catalog(doc)
    if catalog is None:
        return {}
    return {m.id: m.string for m in catalog if m.id and m.string and not m.fuzzy}


def write_catalog(catalog, doc: str) -> None:
    from babel.messages.pofile import write_po
    with open(catalog_path(doc), "wb") as f:
        write_po(f, catalog, width=76, omit_header=False, include_previous=True, sort_output=False)


def wanted_docs() -> list[str]:
    return ["index"] + [docname(p) for p in notebooks()] + ["exercises/index"]


def extract() -> None:
    """Stage the book's sources, extract the messages (gettext builder), update the catalogs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_book

    src, pot, selected = BUILD / "src", BUILD / "pot", BUILD / "pot-selected"
    build_book.stage(src)
    for d in (pot, selected):
        shutil.rmtree(d, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "gettext", "-q", "-E", "-c", str(ROOT / "docs"),
                    "-d", str(BUILD / "doctrees"), str(src), str(pot)], check=True, cwd=ROOT)
    # the lessons, exercises and the README; the API reference stays English (it is the code's docstrings)
    for doc in wanted_docs():
        if (pot / f"{doc}.pot").exists():
            (selected / doc).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pot / f"{doc}.pot", selected / f"{doc}.pot")
    subprocess.run([sys.executable, "-m", "sphinx_intl", "update", "-p", str(selected), "-d", str(LOCALE),
                    "-l", LANGUAGE, "-w", "76"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    # catalogs of documents that no longer exist
    keep = {catalog_path(doc) for doc in wanted_docs()}
    for path in CATALOGS.rglob("*.po"):
        if path not in keep:
            path.unlink()
    prefill()


def kinds(doc: str) -> dict[str, str]:
    """``{msgid: node type}`` of a document's messages as this module cuts them."""
    found = {}
    path = ROOT / "README.md" if doc == "index" else ROOT / f"{doc}.ipynb"
    for text in markdown_cells(path):
        for msgid, kind, _ in messages(text):
            found.setdefault(msgid, kind)
    return found


def markdown_cells(path: pathlib.Path) -> list[str]:
    """The markdown the book is built from: a notebook's markdown cells; the README as staged."""
    if path.suffix == ".md":
        sys.path.insert(0, str(ROOT / "scripts"))
        import build_book

        return [build_book.readme_text()] if path.exists() else []
    if not path.exists():
        return []
    return [cell_source(c) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


def cell_source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def prefill() -> None:
    """Fill in what needs no translator: formulas, code-only blocks and the book's notes."""
    for doc in wanted_docs():
        catalog = read_catalog(doc)
        if catalog is None:
            continue
        kind = kinds(doc)
        changed = catalog.fuzzy  # the header's "fuzzy" flag of a new catalog
        catalog.fuzzy = False
        for m in catalog:
            if not m.id or (m.string and "fuzzy" not in m.flags):
                continue
            if m.id in BOOK_TEXT:
                m.string = BOOK_TEXT[m.id]
            elif nothing_to_translate(m.id, kind.get(m.id, "paragraph")):
                m.string = m.id
            else:
                continue
            m.flags.discard("fuzzy")
            changed = True
        if changed:
            write_catalog(catalog, doc)


# --- README.zh-CN.md: generated from the catalogs ---------------------------------------------------

README_ZH = """\
<!-- generated by scripts/translations.py (make translations) from the catalogs: do not edit -->
# quantlab 中文版

[English](README.md) · 中文

一套按顺序学习的 Jupyter 教学 notebook：用 PyTorch 在 MNIST 上讲清楚 int8 神经网络推理到底怎样工作，
背后是一个小小的 Python 包 `quantlab`，每个可复用的部分都在里面。本系列源自一套中文 notebook 教程
（基础量化、MNIST 卷积网络、训练与测试、训练后量化、逐步讲解量化的 Conv2d），保留了原教程的结构，
并改正了其中的数学错误。中文版与英文版出自同一来源：代码与输出完全相同，只有文字是翻译的。

## 两条命令

```bash
make run    # 第一次运行：创建 .venv 并安装全部依赖（固定版本的 torch），然后运行每个 notebook
make test   # ruff、单元测试，以及用 nbval 检查每个 notebook（即 CI 运行的 .ci/run）
```

`make lab` 在仓库根目录打开 JupyterLab：中文课程在 `notebooks/zh/`，中文练习在 `exercises/zh/`。
练习的检查方法与英文版完全相同，例如 `python -m quantlab.check exercises/zh/a_exercises.ipynb`。
`make book-zh` 生成中文版 HTML 书（`build/book/zh_CN/html/index.html`），每一页都链接到英文版的同一页。

## 课程地图

| 课程 | 练习 |
|---|---|
{lessons}

术语表：[docs/locale/glossary.md](docs/locale/glossary.md)（英中对照，尽量沿用原教程的术语）。
参与翻译：[docs/locale/README.md](docs/locale/README.md)
（只需填写 `.po` 文件中的 `msgstr`，然后运行 `make translations`）。

## 关于图片

中文 notebook 中保存的图片是运行英文 notebook 时生成的 PNG，因此图中的标题、坐标轴和图例仍是英文：
重新生成它们需要把每个 notebook 再执行一遍。在 Jupyter 中自己运行中文 notebook 时，先执行
`quantlab.plots.set_language("zh_CN")`（或设置环境变量 `QUANTLAB_LANGUAGE=zh_CN`），
quantlab 画的图就会使用中文（需要安装一种中文字体，例如 `fonts-wqy-zenhei`，`make chromium` 会安装它）。

书中完整的项目说明（包、测量结果、测试）见中文版 HTML 书的首页，或英文的 [README.md](README.md)。
"""


def title(path: pathlib.Path) -> str:
    """A notebook's first heading, translated when its catalog has it."""
    for text in markdown_cells(path):
        for msgid, kind, _ in messages(text):
            if kind == "title":
                return translations(docname(path)).get(msgid, msgid)
    return path.stem


def readme_zh() -> str:
    rows = []
    for lesson in sorted((ROOT / "notebooks").glob("*.ipynb")):
        exercise = ROOT / "exercises" / f"{lesson.stem.split('_')[0]}_exercises.ipynb"
        def link(path):
            return f"[{title(path)}]({zh_path(path).relative_to(ROOT).as_posix()})"
        rows.append(f"| {link(lesson)} | {link(exercise) if exercise.exists() else ''} |")
    return README_ZH.replace("{lessons}", "\n".join(rows))


# --- the generated notebooks -----------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def generate_notebook(path: pathlib.Path) -> str:
    """The Chinese notebook of an English one, as the text of its .ipynb file."""
    nb = json.loads(path.read_text())
    table = translations(docname(path))
    src_dir = path.resolve().parent.relative_to(ROOT).as_posix()
    dst_dir = posixpath.join(src_dir, ZH)
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = relink(translate(cell_source(cell), table), src_dir, dst_dir)
            cell["source"] = _lines(text) if isinstance(cell["source"], list) else text
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def generate(check: bool = False) -> list[pathlib.Path]:
    """Write (or with ``check``, compare) every Chinese notebook; return those out of date."""
    stale = []
    wanted = set()
    for path in notebooks():
        dst = zh_path(path)
        wanted.add(dst)
        text = generate_notebook(path)
        if not dst.exists() or dst.read_text() != text:
            stale.append(dst)
            if not check:
                dst.parent.mkdir(exist_ok=True)
                dst.write_text(text)
    readme = ROOT / "README.zh-CN.md"
    if not readme.exists() or readme.read_text() != readme_zh():
        stale.append(readme)
        if not check:
            readme.write_text(readme_zh())
    for folder in {p.parent for p in wanted}:
        for dst in folder.glob("*.ipynb"):
            if dst not in wanted:  # the English notebook was removed or renamed
                stale.append(dst)
                if not check:
                    dst.unlink()
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", help="extract, generate (default: both)")
    parser.add_argument("--check", action="store_true", help="only report generated notebooks out of date")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if set(args.steps) - {"extract", "generate"}:
        parser.error(f"unknown steps: {sorted(set(args.steps) - {'extract', 'generate'})}")
    steps = args.steps or (["generate"] if args.check else ["extract", "generate"])
    if "extract" in steps and not args.check:
        extract()
        print(f"catalogs: {len(list(CATALOGS.rglob('*.po')))} in {CATALOGS.relative_to(ROOT)}")
    if "generate" in steps:
        stale = generate(check=args.check)
        verb = "out of date" if args.check else "written"
        names = "".join(f"\n  {p.relative_to(ROOT)}" for p in stale)
        print(f"generated files (notebooks/zh, exercises/zh, README.zh-CN.md): {len(stale)} {verb}{names}")
        if args.check and stale:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
