"""The book (``make book``): built from the stored notebooks, then checked page by page in headless
Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium; ``make chromium`` installs
them). Every page must load without console errors, decode every image, resolve every internal link
(anchors included), typeset every formula, and show no traceback; a screenshot of each page is saved
under build/book-screenshots/.

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
SHOTS = ROOT / "build" / "book-screenshots"
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if os.path.exists(p)), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                          else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", "--disable-extensions", "--window-size=1280,900"]


def _sources() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "docs" / "conf.py", ROOT / "scripts" / "build_book.py"]
    files += build_book.lessons() + build_book.exercises() + sorted((ROOT / "quantlab").glob("*.py"))
    return files + [p for p in (ROOT / "docs").glob("*.png")]


@pytest.fixture(scope="session")
def site() -> pathlib.Path:
    """The built site (built here when missing or stale)."""
    index = HTML / "index.html"
    newest = max(p.stat().st_mtime for p in _sources())
    if not index.exists() or index.stat().st_mtime < newest:
        try:
            import myst_nb  # noqa: F401
            import sphinx_book_theme  # noqa: F401
        except ImportError as e:
            pytest.fail(f"the book's tools are not installed ({e}): pip install -e '.[docs]'")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--strict"],
                             cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, f"book build failed:\n{run.stdout}\n{run.stderr}"
        print(f"\nbook built in {time.perf_counter() - t0:.1f} s")
        index.touch()
    return HTML


def pages(html: pathlib.Path) -> list[str]:
    """Every page of the site (the theme's template snippets in _static are not pages)."""
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if p.relative_to(html).parts[0] != "_static")


# --- checks that need no browser -------------------------------------------------------------------

def test_every_lesson_and_module_has_a_page(site):
    built = set(pages(site))
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
def server(site):
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


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
PAGE_STATE = """
const done = arguments[arguments.length - 1];
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
    prev: (document.querySelector('a.left-prev') || {}).href || null,
    title: document.title,
  };
})().then(done, e => done({failed: String(e)}));
"""


@pytest.fixture(scope="session")
def visits(site, server, browser):
    """Visit every page once: {page: state (see PAGE_STATE) + console errors}; screenshots saved."""
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    results = {}
    t0 = time.perf_counter()
    browser.get_log("browser")  # drop anything logged before the first page
    for page in pages(site):
        browser.set_window_size(1280, 900)  # the page's height is measured at the usual viewport
        browser.get(server + page)
        state = browser.execute_async_script(PAGE_STATE)
        state["console"] = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        # the whole page (up to 8,000 px), not only the first screenful
        height, chrome = browser.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        browser.set_window_size(1280, min(int(height) + int(chrome), 8000))
        browser.save_screenshot(str(SHOTS / (page.replace("/", "__")[:-5] + ".png")))
        results[page] = state
    print(f"\nbrowser: {len(results)} pages checked in {time.perf_counter() - t0:.1f} s; "
          f"screenshots in {SHOTS}")
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


def test_every_internal_link_resolves(visits, server, site):
    bad = []
    for page, state in visits.items():
        for href in state["links"]:
            if not href.startswith(server):
                continue
            url = urllib.parse.urlsplit(href)
            path = urllib.parse.unquote(url.path)[1:] or "index.html"
            target = site / path
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


def test_previous_next_follow_the_teaching_order(visits, server):
    order = ["index.html"] + [f"notebooks/{nb.stem}.html" for nb in build_book.lessons()]
    for here, there in zip(order, order[1:]):
        assert visits[here]["next"] == server + there, (here, visits[here]["next"])
        assert visits[there]["prev"] == server + here, (there, visits[there]["prev"])


def test_search_finds_a_lesson(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "search.html?q=zero+point")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results ul.search li"))
    hits = [a.get_attribute("href") for a in
            browser.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a")]
    assert any("notebooks/a_basic_quant.html" in h for h in hits), hits
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_screenshots_are_saved(visits):
    shots = sorted(SHOTS.glob("*.png"))
    assert len(shots) == len(visits)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shots)
