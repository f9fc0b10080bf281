"""Sphinx configuration of the quantlab book (``make book``; scripts/build_book.py stages the sources).

Sphinx + myst-nb renders the stored, executed notebooks without re-executing them; the theme
(sphinx-book-theme), the search index and MathJax (the files of the django-static-mathjax wheel, which
has no dependencies) are all served from the build folder, so the site is built and browsed without a
network.
"""

import pathlib
import re
import shutil

import mathjax  # django-static-mathjax: MathJax 3's distribution files inside a wheel

project = "quantlab"
author = "quantlab contributors"
copyright = "quantlab contributors"  # noqa: A001 (Sphinx's name)

extensions = [
    "myst_nb",                  # .md and .ipynb sources (MyST markdown), stored outputs
    "sphinx.ext.autodoc",       # the API reference from quantlab's docstrings
    "sphinx.ext.napoleon",      # Args:/Returns: sections
    "sphinx.ext.viewcode",      # [source] links next to each function
    "sphinx.ext.mathjax",       # MathJax 3, served from _static/mathjax (see setup() below)
]

# --- notebooks: render what is stored, never execute ---------------------------------------------
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # no RequireJS / widget bundle from a CDN (stored notebooks hold no widget state)
nb_merge_streams = True
# a widget without stored state renders nothing: show its text/plain fallback instead
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# --- the Chinese edition (scripts/translations.py; build_book.py --language zh_CN) ----------------
# one catalog per document (docs/locale/zh_CN/LC_MESSAGES/<docname>.po), without source line numbers
# (they would change with every edit of a notebook); the English book reads no catalog
locale_dirs = [str(pathlib.Path(__file__).resolve().parent / "locale")]  # Sphinx: relative to the sources
# the search index of either edition splits words as English does: Sphinx's Chinese splitter needs jieba
# (not installed; Chinese words are then not indexed) and its page script fails (ChineseStemmer undefined)
html_search_language = "en"
gettext_compact = False
gettext_location = False

# The two editions sit side by side: build/book/html (English) and build/book/zh_CN/html (Chinese);
# every page links to the same page of the other one.
EDITIONS = {"en": ("zh_CN/html", "zh-CN", "中文", "本页的中文版"),
            "zh_CN": ("html", "en", "English", "This page in English")}


def _other_edition(app, pagename, templatename, context, doctree):
    folder, lang, label, title = EDITIONS.get(app.config.language, EDITIONS["en"])
    # from this page up to build/book/html (or build/book/zh_CN/html), then to the other edition
    up = "../" * pagename.count("/") + ("../" if app.config.language == "en" else "../../")
    context.update(other_edition_url=f"{up}{folder}/{pagename}.html", other_edition_lang=lang,
                   other_edition_label=label, other_edition_title=title)


# --- API reference --------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# members inherited from quantlab's own base classes are shown; torch.nn.Module's are not
# (nor those of Exception and tuple); a method without a docstring of its own (forward) is not shown
# with torch's generic one
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True,
                           "inherited-members": "Module,BaseException,tuple",
                           "exclude-members": "training"}
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# --- HTML -----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "quantlab: int8 quantization, step by step"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "navigation_with_keys": True,
    # the link to the same page in the other edition (English <-> Chinese), on every page
    "article_header_end": ["article-header-buttons.html", "language-switch.html"],
}
templates_path = ["_templates"]
html_context = {"default_mode": "light"}  # an empty default logs a console error on the first visit
html_favicon = "favicon.png"
html_static_path = ["_static"]
html_css_files = ["quantlab.css"]
html_last_updated_fmt = None
html_copy_source = True
exclude_patterns = ["**.ipynb_checkpoints", "exercises/solutions/**"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# --- MathJax, offline ---------------------------------------------------------------------------
MATHJAX = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
MATHJAX_PARTS = ["tex-chtml.js", "input", "output", "ui", "a11y", "sre"]  # what tex-chtml.js loads
mathjax_path = "mathjax/tex-chtml.js"


def _copy_mathjax(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    dest = pathlib.Path(app.outdir) / "_static" / "mathjax"
    if (dest / "tex-chtml.js").exists() and \
            (dest / "tex-chtml.js").stat().st_size == (MATHJAX / "tex-chtml.js").stat().st_size:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for part in MATHJAX_PARTS:
        src = MATHJAX / part
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dest / part)


def _favicon_at_root(app, exc):
    """Pages without a <link rel=icon> (viewcode's) make browsers ask for /favicon.ico."""
    if exc is None and app.builder.format == "html":
        shutil.copyfile(pathlib.Path(app.confdir) / html_favicon, pathlib.Path(app.outdir) / "favicon.ico")


def _escape_bars(app, what, name, obj, options, lines):
    """quantlab's docstrings are plain text: ``|x|`` means an absolute value, not a reST substitution."""
    for i, line in enumerate(lines):
        parts = re.split(r"(``.*?``)", line)
        lines[i] = "".join(p if p.startswith("``") else p.replace("|", "\\|") for p in parts)


def setup(app):
    app.connect("build-finished", _copy_mathjax)
    app.connect("build-finished", _favicon_at_root)
    app.connect("autodoc-process-docstring", _escape_bars)
    app.connect("html-page-context", _other_edition)
