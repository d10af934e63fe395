"""The static site (`make site`): index and pages are built from executed lessons, and every lesson page shows its
figures in headless Chromium (a screenshot per page goes to outputs/site_<lesson>.png).

The browser test builds the site with the tiny ``shadowlab.site.SMALL`` parameters and without the solutions, so it
fits a CPU test budget (a few minutes); `make site` runs the defaults and the solutions.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import pytest

from shadowlab import site
from tests.test_browser import OUTPUTS, _browser_binaries

IMAGES_JS = ("return Array.from(document.querySelectorAll('.jp-OutputArea img, .output img'))"
             ".map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
ERRORS_JS = "return document.querySelectorAll('[data-mime-type=\"application/vnd.jupyter.error\"]').length;"


def test_index_lists_every_lesson_with_its_goals_and_links(tmp_path):
    entries = []
    for name in site.LESSONS:
        title, goals = site._summary(name)
        assert title.startswith("Lesson") and len(goals) > 40, (name, title, goals)
        entries.append({"name": name, "title": title, "goals": goals, "page": f"{name}.html",
                        "notebook": f"notebooks/{name}.ipynb", "solutions_page": f"{name}_solutions.html",
                        "solutions_notebook": f"notebooks/solutions/{name}.ipynb"})
    text = site.write_index(tmp_path, entries).read_text()
    for e in entries:
        for key in ("page", "notebook", "solutions_page", "solutions_notebook"):
            assert f'href="{e[key]}"' in text
        assert html.escape(e["title"]) in text
    with pytest.raises(ValueError, match="lessons="):
        site.build_site(tmp_path, ["07_nope"])


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


@pytest.mark.browser
@pytest.mark.slow
def test_built_site_shows_every_lesson_figure_in_chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_binaries()
    t0 = time.time()
    out = tmp_path / "site"
    index = site.build_site(out, parameters=site.SMALL, solutions=False)
    built = time.time() - t0
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1200,1600", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    OUTPUTS.mkdir(exist_ok=True)
    try:
        driver.get(index.as_uri())
        links = driver.execute_script("return Array.from(document.querySelectorAll('a')).map(a => a.href);")
        for name in site.LESSONS:
            assert any(h.endswith(f"{name}.html") for h in links), name
            assert (out / "notebooks" / f"{name}.ipynb").exists()
        driver.save_screenshot(str(OUTPUTS / "site_index.png"))
        for name in site.LESSONS:
            driver.get((out / f"{name}.html").as_uri())
            deadline = time.time() + 30
            while time.time() < deadline:
                images = driver.execute_script(IMAGES_JS)
                if images and all(c for c, _, _ in images):
                    break
                time.sleep(0.25)
            assert len(images) >= 2, f"{name}: {len(images)} figures on the page"
            assert all(c and w > 50 and h > 50 for c, w, h in images), f"{name}: figures not rendered: {images}"
            assert driver.execute_script(ERRORS_JS) == 0, f"{name}: an error output on the page"
            shot = Path(OUTPUTS / f"site_{name}.png")
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
    print(f"site built in {built:.0f} s, checked in {time.time() - t0 - built:.0f} s: {index}")
