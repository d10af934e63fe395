"""The static site (`make site`): index and pages are built from executed lessons, and every lesson page shows its
figures and typeset formulas in headless Chromium with the network blocked (a screenshot per page goes to
outputs/site_<lesson>.png); no built file refers to a CDN.

The browser test builds the site with the tiny ``shadowlab.lab.site.SMALL`` parameters and without the solutions, so it
fits a CPU test budget (a few minutes); `make site` runs the defaults and the solutions.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shadowlab.lab import site
from tests.test_browser import OUTPUTS, _browser_binaries

IMAGES_JS = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
ERRORS_JS = "return document.querySelectorAll('[data-mime-type=\"application/vnd.jupyter.error\"]').length;"
# what a reader sees of the formulas: typeset elements (MathJax 2 / 3, KaTeX), TeX left as text (with its $ or $$
# delimiters: not typeset, or shown as source by MathJax's noErrors) outside code and the other tags MathJax skips
# (`$SHADOWLAB_DATA` in inline code is a shell variable), error boxes, and whether MathJax is still busy
MATH_JS = r"""const q = window.MathJax && MathJax.Hub && MathJax.Hub.queue;
const prose = document.body.cloneNode(true);
prose.querySelectorAll('script, noscript, style, textarea, pre, code').forEach(e => e.remove());
return {typeset: document.querySelectorAll('.MathJax, .MathJax_Display, mjx-container, .katex').length,
        raw: (prose.textContent.match(/\$\$|\$[^$\s][^$]*\$/g) || []).slice(0, 3),
        errors: document.querySelectorAll('.MathJax_Error, .merror, mjx-merror, .katex-error').length,
        busy: !!(q && (q.pending || q.running))};"""
# every URL the page fetched (Resource Timing: http(s) pages only) or names in a src/href attribute, data: URIs aside
URLS_JS = ("return performance.getEntriesByType('resource').map(e => e.name).concat(Array.from("
           "document.querySelectorAll('script[src], link[href], img[src], iframe[src]')).map(e => e.src || e.href))"
           ".filter(u => !u.startsWith('data:'));")
CDN = re.compile(r"https?://cdn|cdnjs|unpkg|jsdelivr", re.I)
# MathJax's speech-rule engine (the accessibility explorer, off unless a reader turns it on in MathJax's menu) names
# jsdelivr as its default source; MathJax's own setup at the end of that file points it at the local copy instead
SRE_DEFAULTS = ('sre.Variables.url="https://cdn.jsdelivr.net/npm/speech-rule-engine@"',
                'sre.Variables.WGXpath="https://cdn.jsdelivr.net/npm/wicked-good-xpath@1.3.0/dist/wgxpath.install.js"')
SRE_LOCAL = 'json:MathJax.Ajax.config.path.SRE+"/mathmaps",xpath:MathJax.Ajax.config.path.SRE+"/wgxpath.install.js"'
# Chromium without a network: no name resolves (but 127.0.0.1) and every other http(s) request, IP literals included,
# goes to a proxy on the discard port, where nothing listens (loopback bypasses proxies by default)
OFFLINE_FLAGS = ("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9")


def offline_chromium(tmp_path: Path, window: str):
    """A headless Chromium WebDriver without a network (OFFLINE_FLAGS), window ``window`` ("W,H"), its profile under
    tmp_path; skips (or fails, see tests/test_browser.py) where Chromium is missing. The caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 f"--window-size={window}", f"--user-data-dir={tmp_path / 'chromium'}", *OFFLINE_FLAGS):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _cdn_references(out: Path) -> dict[str, list[str]]:
    """CDN names in the built .html and .js files under ``out``, by relative path (empty: none)."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.suffix not in (".html", ".js"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.name == "mathjax-sre.js":
            assert SRE_LOCAL in text, "MathJax no longer points its speech-rule engine at the local copy"
            for default in SRE_DEFAULTS:
                text = text.replace(default, "")
        if hits := CDN.findall(text):
            found[str(path.relative_to(out))] = hits
    return found


def test_built_pages_refer_to_no_cdn(tmp_path):
    import nbformat

    executed = tmp_path / "notebooks" / "04_shadow_attack.ipynb"
    executed.parent.mkdir()
    nb = nbformat.read(site.NOTEBOOKS / "04_shadow_attack.ipynb", as_version=4)
    plain = tmp_path / "notebooks" / "plain.ipynb"
    nbformat.write(nb, plain)
    # what papermill leaves after the lab cell: the saved widget state and a widget view next to the snapshot
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"version_major": 2, "version_minor": 0,
                                                                             "state": {}}}
    view = {"model_id": "0" * 32, "version_major": 2, "version_minor": 0}
    cell = next(c for c in reversed(nb.cells) if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("display_data", {"application/vnd.jupyter.widget-view+json": view,
                                                              "text/plain": "VBox()"})]
    nbformat.write(nb, executed)
    site.copy_mathjax(tmp_path)
    page = site.render(executed, tmp_path / "04_shadow_attack.html", "Lesson 4").read_text()
    other = site.render(plain, tmp_path / "plain.html", "plain").read_text()
    assert _cdn_references(tmp_path) == {}
    for text in (page, other):
        scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text)
        assert scripts == [site.MATHJAX_URL], scripts
        assert (tmp_path / site.MATHJAX_URL.split("?")[0]).is_file()
        assert "require.js" not in text and "widget-state+json" not in text and "widget-view+json" not in text
    assert site.has_widgets(nb) and "make lab" in page and "shadowlab-note" not in other


def test_a_widget_shows_its_snapshot_without_its_repr(tmp_path):
    """Lesson 04's lab snapshot was preceded on the page by the widget's repr, ``VBox(children=(VBox(...``."""
    import nbformat

    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    view = {"model_id": "0" * 32, "version_major": 2, "version_minor": 0}
    cell = nbformat.v4.new_code_cell("lab", outputs=[
        nbformat.v4.new_output("display_data", {"application/vnd.jupyter.widget-view+json": view,
                                                "text/plain": "VBox(children=(VBox(children=(Dropdown(",}),
        nbformat.v4.new_output("display_data", {"image/png": png, "text/plain": "<Figure>"})])
    executed = tmp_path / "04.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), executed)
    page = site.render(executed, tmp_path / "04.html", "Lesson 4").read_text()
    assert "VBox(children" not in page and "data:image/png;base64," + png[:20] in page and "make lab" in page


def test_one_execution_serves_every_build(tmp_path, monkeypatch):
    """make site after make slides executes nothing again: execute_cached keys each execution on the notebook, its
    parameters and the package's code."""
    import shutil

    calls = []

    def fake_execute(source, target, parameters=None, timeout=1800, progress=False):
        calls.append((source.name, dict(parameters or {})))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return target

    monkeypatch.setattr(site, "execute", fake_execute)
    lesson = site.NOTEBOOKS / "01_adversarial_examples.ipynb"
    solutions = site.NOTEBOOKS / "solutions" / "01_adversarial_examples.ipynb"
    first, _, cached = site.execute_cached(lesson, {"N_IMAGES": 4}, cache=tmp_path)
    again, _, cached_again = site.execute_cached(lesson, {"N_IMAGES": 4}, cache=tmp_path)
    assert (cached, cached_again) == (False, True) and first == again and len(calls) == 1
    site.execute_cached(lesson, {"N_IMAGES": 8}, cache=tmp_path)                   # other parameters: run again
    sol, _, _ = site.execute_cached(solutions, None, cache=tmp_path)                # same file name, own entry
    assert len(calls) == 3 and sol.name.startswith("solutions-") and sol != first
    package = tmp_path / "package"
    shutil.copytree(site.PROJECT_ROOT / "shadowlab" / "lab", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = site.fingerprint(lesson, None, package)
    (package / "widgets.py").write_text((package / "widgets.py").read_text() + "\n# changed\n")
    assert site.fingerprint(lesson, None, package) != before                       # a code change: run again
    copied, seconds = site.executed_copy(lesson, tmp_path / "out" / "01.ipynb", {"N_IMAGES": 4}, cache=tmp_path)
    assert copied.is_file() and len(calls) == 3 and seconds >= 0


def test_index_lists_every_lesson_with_its_goals_and_links(tmp_path):
    entries = []
    for name in site.LESSONS:
        title, goals = site.lesson_summary(name)
        assert title.startswith("Lesson") and len(goals) > 40, (name, title, goals)
        entries.append({"name": name, "title": title, "goals": goals, "page": f"{name}.html",
                        "notebook": f"notebooks/{name}.ipynb",
                        "solutions_notebook": f"notebooks/solutions/{name}.ipynb"})
    text = site.write_index(tmp_path, entries).read_text()
    assert "_solutions.html" not in text     # solutions sit on the lesson pages, collapsed (no page of their own)
    for e in entries:
        for key in ("page", "notebook", "solutions_notebook"):
            assert f'href="{e[key]}"' in text
        assert html.escape(e["title"]) in text
    with pytest.raises(ValueError, match="lessons="):
        site.build_site(tmp_path, ["07_nope"])


@pytest.mark.parametrize("name", ["02_pgd", "06_reproduce_paper"])
def test_each_solution_sits_collapsed_under_its_exercise(tmp_path, name):
    """The lesson page carries one closed <details> per exercise, right after that exercise's check cell and before
    the next cell, holding the worked solution's code and its explanation; the solutions get no page of their own."""
    import nbformat

    lesson = nbformat.read(site.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    sol_path = site.NOTEBOOKS / "solutions" / f"{name}.ipynb"
    solutions = nbformat.read(sol_path, as_version=4)
    # a printed output in the solution, as papermill leaves it, must show inside the collapsed block too
    cell = next(c for c in solutions.cells if c.cell_type == "code" and site.exercise_id(c.source))
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="exercise 0X.1: RIGHT. printed-by-solution")]
    executed = tmp_path / "solutions.ipynb"
    nbformat.write(solutions, executed)
    page = site.render(site.NOTEBOOKS / f"{name}.ipynb", tmp_path / "page.html", "t", executed).read_text()
    checks = [site.exercise_id(c.source) for c in lesson.cells if c.cell_type == "code" and site.exercise_id(c.source)]
    assert len(checks) >= 5
    pattern = r'<details class="shadowlab-solution" data-exercise="([\d.]+)"[^>]*>(.*?)</details>'
    blocks = re.findall(pattern, page, re.S)
    assert [b[0] for b in blocks] == checks and "<details open" not in page
    for ex, body in blocks:
        fn = f"check_{ex.replace('.', '_')}"
        before, after = page.split(f'data-exercise="{ex}"')
        # the block follows the lesson's check cell (its checker call is the last code before it) ...
        assert fn in before[-20_000:].rsplit("jp-CodeCell", 1)[-1], ex
        # ... and holds the worked solution (its heading, its code with its own checker call)
        assert f"Exercise {ex.split('.')[1].lstrip('0')}" in body and fn in body and "assert" in body, ex
        assert "jp-CodeCell" in after.split("</details>", 1)[1][:3000] or ex == checks[-1], ex
    assert "printed-by-solution" in blocks[0][1]


@pytest.mark.browser
def test_solutions_open_only_on_a_click_in_chromium(tmp_path):
    """In the browser a solution is hidden under its exercise until its summary is clicked (no execution: the
    committed lesson and solutions, rendered as they are)."""
    from selenium.webdriver.common.by import By

    site.copy_mathjax(tmp_path)
    page = site.render(site.NOTEBOOKS / "02_pgd.ipynb", tmp_path / "02_pgd.html", "Lesson 2",
                       site.NOTEBOOKS / "solutions" / "02_pgd.ipynb")
    driver = offline_chromium(tmp_path, "1200,1600")
    try:
        driver.get(page.as_uri())
        blocks = driver.find_elements(By.CSS_SELECTOR, "details.shadowlab-solution")
        assert len(blocks) == 5
        first = blocks[0]
        code = first.find_element(By.CSS_SELECTOR, ".jp-CodeCell")
        assert not code.is_displayed() and "Worked solution: exercise 02.1" in first.text
        driver.execute_script("arguments[0].scrollIntoView();", first)
        first.find_element(By.TAG_NAME, "summary").click()
        assert code.is_displayed() and "check_02_1" in code.text
        assert not blocks[1].find_element(By.CSS_SELECTOR, ".jp-CodeCell").is_displayed()
        driver.execute_script("arguments[0].scrollIntoView();", first)
        driver.save_screenshot(str(OUTPUTS / "site_solution_open.png"))
    finally:
        driver.quit()


def test_small_parameters_are_parameters_of_the_lessons():
    import ast

    import nbformat

    for name, params in site.SMALL.items():
        nb = nbformat.read(site.NOTEBOOKS / f"{name}.ipynb", as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        names = {t.id for stmt in ast.parse(cell.source).body for t in stmt.targets if isinstance(t, ast.Name)} | {
            e.id for stmt in ast.parse(cell.source).body for t in stmt.targets if isinstance(t, ast.Tuple)
            for e in t.elts}
        assert set(params) <= names, (name, set(params) - names)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static file server for ``folder`` on 127.0.0.1 (a free port) in a daemon thread, and its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.mark.browser
@pytest.mark.slow
def test_built_site_shows_every_lesson_offline_in_chromium(tmp_path):
    """Every lesson page, served from 127.0.0.1 and opened as a file, with the network blocked: typeset formulas (no
    TeX source left), loaded figures, no error output, nothing fetched from elsewhere, the JupyterLab note where the
    lesson has widgets."""
    import nbformat
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_binaries()
    t0 = time.time()
    out = tmp_path / "site"
    index = site.build_site(out, parameters=site.SMALL, solutions=False)
    built = time.time() - t0
    assert _cdn_references(out) == {}
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1200,1600", f"--user-data-dir={tmp_path / 'chromium'}",
                 *OFFLINE_FLAGS):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    server, served = _serve(out)
    OUTPUTS.mkdir(exist_ok=True)
    try:
        with pytest.raises(WebDriverException, match="ERR_"):   # the network really is blocked
            driver.get("https://example.org/")
        driver.get(index.as_uri())
        links = driver.execute_script("return Array.from(document.querySelectorAll('a')).map(a => a.href);")
        for name in site.LESSONS:
            assert any(h.endswith(f"{name}.html") for h in links), name
            assert (out / "notebooks" / f"{name}.ipynb").exists()
        driver.save_screenshot(str(OUTPUTS / "site_index.png"))
        with_widgets = []
        for base in (served, out.as_uri() + "/"):
            for name in site.LESSONS:
                driver.get(f"{base}{name}.html")
                deadline = time.time() + 30
                while time.time() < deadline:
                    images, math = driver.execute_script(IMAGES_JS), driver.execute_script(MATH_JS)
                    if images and all(c for c, _, _ in images) and math["typeset"] and not math["busy"]:
                        break
                    time.sleep(0.25)
                where = f"{base}{name}.html"
                assert len(images) >= 2, f"{where}: {len(images)} figures on the page"
                assert all(c and w > 50 and h > 50 for c, w, h in images), f"{where}: figures not rendered: {images}"
                assert driver.execute_script(ERRORS_JS) == 0, f"{where}: an error output on the page"
                assert math["typeset"] > 0 and not math["busy"], f"{where}: formulas not typeset: {math}"
                assert not math["raw"] and not math["errors"], f"{where}: TeX left as text or errors: {math}"
                urls = driver.execute_script(URLS_JS)
                assert all(u.startswith((served, "file:")) for u in urls), f"{where}: fetched {urls}"
                text = driver.execute_script("return document.body.innerText;")
                if site.has_widgets(nbformat.read(out / "notebooks" / f"{name}.ipynb", 4)):
                    with_widgets.append(name)
                    assert "JupyterLab" in text and "make lab" in text, f"{where}: no note on the live lab"
                shot = Path(OUTPUTS / f"site_{name}.png")
                driver.save_screenshot(str(shot))
                assert shot.stat().st_size > 10_000
        assert "04_shadow_attack" in with_widgets, with_widgets
    finally:
        driver.quit()
        server.shutdown()
    print(f"site built in {built:.0f} s, checked in {time.time() - t0 - built:.0f} s: {index}")


@pytest.mark.slow
def test_make_slides_then_make_site_run_as_the_docs_say(tmp_path):
    """The commands ``make slides``, ``make site`` and ``make slides-notes`` run (docs/slides.md, docs/site.md), on one
    lesson at the tiny parameters, with relative --out folders and a cache of their own: the slides execute the
    lesson once, the site reuses that execution, and the notes refuse a record built with --small."""
    lesson = "01_adversarial_examples"
    common = ["--small", "--lessons", lesson, "--cache", "executed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True, env=env)

    made = run("shadowlab.lab.slides", "build", "--out", "slides", *common)
    assert made.returncode == 0, made.stderr[-3000:]
    assert f"{lesson}.ipynb: executed" in made.stdout and "slides written" in made.stdout
    record = json.loads((tmp_path / "slides" / "slides.json").read_text())
    assert list(record["lessons"]) == [lesson] and (tmp_path / "slides" / f"{lesson}.slides.html").is_file()
    built = run("shadowlab.lab.site", "--out", "site", "--no-solutions", *common)
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"{lesson}.ipynb: reused the cached execution" in built.stdout, built.stdout
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / f"{lesson}.html").is_file()
    notes = run("shadowlab.lab.slides", "notes", "slides/slides.json", "--out", "notes.md")
    assert notes.returncode != 0 and "changed parameters" in notes.stderr and not (tmp_path / "notes.md").exists()
