"""The book (``make book``, and its Chinese edition ``make book-zh``): built from the stored notebooks,
then checked page by page, both editions, in headless Chromium (Debian's ``chromium`` +
``chromium-driver``, driven by selenium; ``make chromium`` installs them). Every page must load without
console errors, decode every image, resolve every internal link (anchors included), typeset every
formula, and show no traceback; a screenshot of each page is saved under build/book-screenshots/
(build/book-screenshots/zh_CN/ for the Chinese edition). Every page links to the same page of the other
edition, and the Chinese pages' characters are drawn with a real font (no empty boxes).

The site is built only when it is missing or older than its sources (README, notebooks, exercises,
quantlab, docs/conf.py, the build script), so a second run reuses it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_book  # noqa: E402

OUT = ROOT / "build" / "book"
HTML = OUT / "html"
HTML_ZH = OUT / "zh_CN" / "html"
SHOTS = ROOT / "build" / "book-screenshots"
EDITIONS = {"en": (HTML, SHOTS), "zh_CN": (HTML_ZH, SHOTS / "zh_CN")}
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if os.path.exists(p)), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                          else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", "--disable-extensions", "--window-size=1280,900"]


def _sources() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "docs" / "conf.py", ROOT / "scripts" / "build_book.py"]
    files += build_book.lessons() + build_book.exercises() + sorted((ROOT / "quantlab").glob("*.py"))
    files += sorted((ROOT / "docs" / "_templates").glob("*"))
    files += sorted((ROOT / "docs" / "locale").rglob("*.po"))
    return files + [p for p in (ROOT / "docs").glob("*.png")]


@pytest.fixture(scope="session")
def site() -> pathlib.Path:
    """The built English site, with the Chinese one beside it (each built here when missing or stale)."""
    newest = max(p.stat().st_mtime for p in _sources())
    for language, (html, _) in EDITIONS.items():
        index = html / "index.html"
        if index.exists() and index.stat().st_mtime >= newest:
            continue
        try:
            import myst_nb  # noqa: F401
            import sphinx_book_theme  # noqa: F401
        except ImportError as e:
            pytest.fail(f"the book's tools are not installed ({e}): pip install -e '.[docs]'")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--strict",
                              "--language", language], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, f"book build ({language}) failed:\n{run.stdout}\n{run.stderr}"
        print(f"\nbook ({language}) built in {time.perf_counter() - t0:.1f} s")
        index.touch()
    return HTML


@pytest.fixture(scope="session", params=list(EDITIONS))
def edition(request, site, root_url):
    """One edition of the book: its language, its folder, its URL and where its screenshots go."""
    html, shots = EDITIONS[request.param]
    return {"language": request.param, "html": html, "shots": shots,
            "url": root_url + html.relative_to(OUT).as_posix() + "/"}


def pages(html: pathlib.Path) -> list[str]:
    """Every page of the site (the theme's template snippets in _static are not pages)."""
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if p.relative_to(html).parts[0] != "_static")


# --- checks that need no browser -------------------------------------------------------------------

def test_every_lesson_and_module_has_a_page(edition):
    built = set(pages(edition["html"]))
    for nb in build_book.lessons():
        assert f"notebooks/{nb.stem}.html" in built
    for nb in build_book.exercises():
        assert f"exercises/{nb.stem}.html" in built
    for module in build_book.modules():
        assert f"api/{module}.html" in built
    assert {"index.html", "search.html", "genindex.html", "api/index.html"} <= built


def test_every_readme_name_links_to_the_reference(site):
    # the README's notebook table names the quantlab functions of each lesson; each must exist
    table = build_book.readme_functions((ROOT / "README.md").read_text())
    for nb in build_book.lessons():
        assert nb.stem in table, f"README's notebook table has no row for {nb.stem}"
        _, missing = build_book.function_box(table[nb.stem])
        assert not missing, f"{nb.stem}: README names that are not in quantlab: {missing}"
        page = (site / "notebooks" / f"{nb.stem}.html").read_text()
        box = page[page.index("quantlab in this lesson"):]
        box = box[:box.index("</div>")]
        assert box.count('class="reference internal"') >= len(set(table[nb.stem])) + 1, nb.stem


def test_stored_outputs_hold_no_traceback():
    for nb in build_book.lessons() + build_book.exercises():
        cells = json.loads(nb.read_text())["cells"]
        for cell in cells:
            for out in cell.get("outputs", []):
                text = json.dumps(out)
                assert out["output_type"] != "error", f"{nb.name}: error output"
                assert "Traceback (most recent call last)" not in text, f"{nb.name}: traceback in output"


def test_readme_names_are_parsed_like_the_table():
    table = build_book.readme_functions(
        "| `x_lesson` | what | `quant_range`, `QuantizedNet.calibrate/freeze`, "
        "`quantize_model(..., qat=True)`, `modules.QConv2d/QLinear` |\n| not a row |")
    assert table == {"x_lesson": ["quant_range", "QuantizedNet.calibrate", "QuantizedNet.freeze",
                                  "quantize_model", "modules.QConv2d", "modules.QLinear"]}
    assert build_book.resolve("quant_range") == "quantlab.qparams.quant_range"
    assert build_book.resolve("QuantizedNet.freeze") == "quantlab.graph.QuantizedNet.freeze"
    assert build_book.resolve("modules.QLinear") == "quantlab.weighted.QLinear"
    assert build_book.resolve("no_such_function") is None


# --- the browser -----------------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def root_url(site):
    """build/book served over HTTP: the English edition under html/, the Chinese under zh_CN/html/."""
    handler = functools.partial(_Quiet, directory=str(OUT))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def server(root_url):
    return root_url + "html/"


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Chromium or its driver is not installed (Debian: apt-get install chromium "
                    "chromium-driver; `make chromium` does it as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: "
                                    "pip install -e '.[docs]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for drivers online
    profile = tempfile.mkdtemp(prefix="quantlab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# what each page reports once loaded, fonts ready and MathJax finished
PAGE_STATE = r"""
const done = arguments[arguments.length - 1];
// Chinese characters drawn in the page's font: each must come out as a glyph of its own, unlike an
// unassigned code point (the empty box, "tofu", a missing glyph is drawn as)
function cjkGlyphs() {
  const el = document.querySelector('article') || document.body;
  const text = el.innerText;
  const chars = [...new Set(text.match(/[\u4e00-\u9fff]/g) || [])].slice(0, 12);
  if (!chars.length) return {chars: 0, distinct: 0, tofu: 0};
  const font = '32px ' + getComputedStyle(el).fontFamily;
  const draw = (ch) => {
    const c = document.createElement('canvas'); c.width = 40; c.height = 40;
    const g = c.getContext('2d'); g.font = font; g.fillText(ch, 2, 32);
    return c.toDataURL();
  };
  const tofu = new Set(['\u0378', '\uffff', '\u{10fffd}'].map(draw));
  const glyphs = chars.map(draw);
  return {chars: chars.length, distinct: new Set(glyphs).size, tofu: glyphs.filter(g => tofu.has(g)).length};
}
(async () => {
  await document.fonts.ready;
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const maths = [...document.querySelectorAll('.math')];
  const typeset = () => maths.filter(m => m.querySelector('mjx-container')).length;
  // MathJax loads deferred and typesets asynchronously: wait (up to 60 s on a loaded machine)
  const t0 = Date.now();
  while (maths.length && Date.now() - t0 < 60000) {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      await MathJax.startup.promise;
      if (typeset() === maths.length) break;
    }
    await new Promise(r => setTimeout(r, 100));
  }
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return {
    images: imgs.map(i => ({src: i.src, width: i.naturalWidth, complete: i.complete})),
    math: maths.length,
    typeset: typeset(),
    mathErrors: document.querySelectorAll('mjx-merror').length,
    mathjax: !!window.MathJax,
    links: links,
    errorOutputs: document.querySelectorAll('.output.error, .output.traceback').length,
    traceback: document.body.innerText.includes('Traceback (most recent call last)'),
    next: (document.querySelector('a.right-next') || {}).href || null,
    otherEdition: (document.querySelector('a.quantlab-language-switch') || {}).href || null,
    cjk: cjkGlyphs(),
    prev: (document.querySelector('a.left-prev') || {}).href || null,
    title: document.title,
  };
})().then(done, e => done({failed: String(e)}));
"""


@pytest.fixture(scope="session")
def visits(edition, browser):
    """Visit every page of an edition once: {page: state (see PAGE_STATE) + console errors};
    screenshots saved."""
    shots = edition["shots"]
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):  # this edition's (the Chinese edition's are in a folder of their own)
        old.unlink()
    results = {}
    t0 = time.perf_counter()
    browser.get_log("browser")  # drop anything logged before the first page
    # the Chinese edition's API reference and source pages are the English ones (docstrings and
    # code are not translated): visiting them twice is repeated work, so that edition visits its
    # translated pages only (the links into the API are still checked, against the files)
    translated_only = edition["language"] != "en"
    for page in pages(edition["html"]):
        if translated_only and page.split("/")[0] in ("api", "_modules"):
            continue
        browser.set_window_size(1280, 900)  # the page's height is measured at the usual viewport
        browser.get(edition["url"] + page)
        state = browser.execute_async_script(PAGE_STATE)
        state["console"] = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        # the whole page (up to 8,000 px), not only the first screenful
        height, chrome = browser.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        browser.set_window_size(1280, min(int(height) + int(chrome), 8000))
        browser.save_screenshot(str(shots / (page.replace("/", "__")[:-5] + ".png")))
        results[page] = state
    print(f"\nbrowser ({edition['language']}): {len(results)} pages checked in "
          f"{time.perf_counter() - t0:.1f} s; screenshots in {shots}")
    return results


def test_pages_load_without_console_errors(visits):
    bad = {p: s.get("console") or s["failed"] for p, s in visits.items() if s.get("console") or "failed" in s}
    assert not bad, bad


def test_every_image_is_decoded(visits):
    bad = {p: [i["src"] for i in s["images"] if not i["complete"] or i["width"] == 0]
           for p, s in visits.items()}
    assert not {p: v for p, v in bad.items() if v}
    lessons = [f"notebooks/{nb.stem}.html" for nb in build_book.lessons()]
    assert sum(len(visits[p]["images"]) for p in lessons) > 0, "no figures in the lessons"


def _ids(path: pathlib.Path, cache={}) -> set[str]:  # noqa: B006 (a cache on purpose)
    if path not in cache:
        cache[path] = set(re.findall(r'\sid="([^"]+)"', path.read_text(errors="replace")))
    return cache[path]


def test_every_internal_link_resolves(visits, root_url):
    # links within an edition and to the other one (both are served from build/book)
    bad = []
    for page, state in visits.items():
        for href in state["links"]:
            if not href.startswith(root_url):
                continue
            url = urllib.parse.urlsplit(href)
            path = urllib.parse.unquote(url.path)[1:] or "index.html"
            target = OUT / path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                bad.append((page, href))
            elif url.fragment and target.suffix == ".html" and \
                    urllib.parse.unquote(url.fragment) not in _ids(target):
                bad.append((page, href))
    assert not bad, bad


def test_math_is_typeset(visits):
    with_math = {p: s for p, s in visits.items() if s["math"]}
    assert any(p.startswith("notebooks/") for p in with_math), "no formulas found in the lessons"
    bad = {p: f"{s['typeset']}/{s['math']} typeset, {s['mathErrors']} TeX errors"
           for p, s in with_math.items() if s["typeset"] != s["math"] or s["mathErrors"] or not s["mathjax"]}
    assert not bad, bad


def test_no_page_shows_a_traceback(visits):
    bad = [p for p, s in visits.items() if s["errorOutputs"] or s["traceback"]]
    assert not bad, bad


def test_previous_next_follow_the_teaching_order(visits, edition):
    server = edition["url"]
    order = ["index.html"] + [f"notebooks/{nb.stem}.html" for nb in build_book.lessons()]
    for here, there in zip(order, order[1:]):
        assert visits[here]["next"] == server + there, (here, visits[here]["next"])
        assert visits[there]["prev"] == server + here, (there, visits[there]["prev"])


def test_search_finds_a_lesson(browser, edition):
    server = edition["url"]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # the Chinese edition's index splits words as English does (conf.py): Chinese runs are not words
    query = "zero+point" if edition["language"] == "en" else "quantize_per_tensor"
    browser.get(server + "search.html?q=" + query)
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results ul.search li"))
    hits = [a.get_attribute("href") for a in
            browser.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a")]
    assert any("notebooks/a_basic_quant.html" in h for h in hits), hits
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_every_page_links_to_the_same_page_in_the_other_edition(visits, edition, root_url):
    other = root_url + ("zh_CN/html/" if edition["language"] == "en" else "html/")
    bad = {p: s["otherEdition"] for p, s in visits.items() if s["otherEdition"] != other + p}
    assert not bad, bad


def test_chinese_pages_show_chinese_characters_not_empty_boxes(visits, edition):
    if edition["language"] != "zh_CN":
        pytest.skip("the English edition")
    translated = ["index.html", "notebooks/a_basic_quant.html"]
    for page in translated:
        cjk = visits[page]["cjk"]
        assert cjk["chars"] >= 10, (page, cjk)                 # the page is in Chinese
        # each character is drawn as a glyph of its own, none as the missing-glyph box
        assert cjk["distinct"] == cjk["chars"] and cjk["tofu"] == 0, (page, cjk)
    bad = {p: s["cjk"] for p, s in visits.items()
           if s["cjk"]["tofu"] or s["cjk"]["distinct"] != s["cjk"]["chars"]}
    assert not bad, bad


def test_screenshots_are_saved(visits, edition):
    shots = sorted(edition["shots"].glob("*.png"))
    assert len(shots) == len(visits)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shots)
