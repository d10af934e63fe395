"""shadowlab.lab.slides: slide metadata from the builder (setup skipped, at most MAX_CODE_LINES of code per slide),
decks that load nothing from a CDN, the instructor notes, and (browser) one deck opened offline in headless
Chromium."""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import zlib

import nbformat
import pytest

from shadowlab.lab import site, slides
from tests.test_browser import OUTPUTS, _browser_binaries
from tests.test_site import CDN, OFFLINE_FLAGS, _serve, offline_chromium

v4 = nbformat.v4


@pytest.mark.parametrize("name", site.LESSONS)
def test_every_lesson_gets_slides_of_at_most_25_lines_of_code(name):
    nb = nbformat.read(site.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    before = json.dumps(nb)
    marked = slides.with_slide_metadata(nb)
    kinds = [c.metadata["slideshow"]["slide_type"] for c in marked.cells]
    assert kinds[0] == "slide" and kinds.count("slide") >= 4
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert kinds[params] == "skip" and kinds[params + 1] == "skip"          # parameters and setup
    assert json.dumps(nb) == before                                        # the notebook read is not changed
    shown = [c for c, k in zip(marked.cells, kinds) if k != "skip"]
    assert not any("parameters" in c.metadata.get("tags", []) or "lesson_setup(" in c.source for c in shown)
    assert max(slides.code_lines_per_slide(marked)) <= slides.MAX_CODE_LINES         # long cells are split
    assert all(k in ("slide", "subslide", "-", "skip") for k in kinds)


def test_a_long_section_is_split_into_sub_slides():
    cells = [v4.new_markdown_cell("# Title"), v4.new_markdown_cell("*Parameters*: ..."),
             v4.new_code_cell("A = 1", metadata={"tags": ["parameters"]}), v4.new_code_cell("import x"),
             v4.new_markdown_cell("## One"), v4.new_code_cell("\n".join(["a = 1"] * 15)),
             v4.new_code_cell("\n".join(["b = 1"] * 15)), v4.new_code_cell("\n".join(["c = 1"] * 30)),
             v4.new_code_cell("d = 1"), v4.new_markdown_cell("## Two"), v4.new_code_cell("e = 1")]
    nb = v4.new_notebook(cells=cells)
    assert slides.slide_types(nb) == ["slide", "skip", "skip", "skip", "slide", "-", "subslide", "subslide",
                                      "subslide", "slide", "-"]
    # the deck splits the 30-line cell: 24 lines, then "# ... continued" and the other 6 with the next cell
    assert slides.code_lines_per_slide(slides.with_slide_metadata(nb)) == [0, 15, 15, 24, 8, 1]


def _png(width: int, height: int) -> str:
    """A white RGB PNG of this size, base64 as in a notebook's outputs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\xff" * (3 * width) for _ in range(height))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")).decode()


def _long_cells_notebook():
    """A title, then a 40-line cell, a cell of 10 lines of 180 characters, and 12 lines of code under a tall figure."""
    figure = v4.new_code_cell("\n".join(f"fig{i} = {i}" for i in range(12)), outputs=[
        v4.new_output("display_data", {"image/png": _png(400, 900), "text/plain": "<Figure>"})])
    return v4.new_notebook(cells=[
        v4.new_markdown_cell("# Title"), v4.new_markdown_cell("## Long"),
        v4.new_code_cell("\n".join(f"long{i} = {i}" for i in range(40)),
                         outputs=[v4.new_output("stream", name="stdout", text="done\n")]),
        v4.new_markdown_cell("## Wide"),
        v4.new_code_cell("\n".join(f"wide{i} = " + "1 + " * 44 + "1" for i in range(10))),
        v4.new_markdown_cell("## Figure"), figure])


def test_long_cells_and_tall_figures_are_split_to_fit_a_slide():
    nb = _long_cells_notebook()
    before = json.dumps(nb)
    assert slides.code_lines("a = 1\n" + "b" * 181) == 1 + 3                       # a long line wraps onto three
    assert slides.output_lines(nb.cells[-1]) == 22                                   # 900 px high, shown at 520 px
    fitted = slides.fit_cells(nb)
    assert json.dumps(nb) == before                                                  # the notebook is not changed
    sources = [c.source for c in fitted.cells if c.cell_type == "code"]
    # 40 lines: continuation cells, every line kept once, the output with the last part
    long_parts = [c for c in fitted.cells if "long" in c.source]
    assert len(long_parts) == 2 and long_parts[1].source.startswith(slides.CONTINUED)
    kept = [line for c in long_parts for line in c.source.splitlines() if line != slides.CONTINUED]
    assert kept == nb.cells[2].source.splitlines()
    assert [len(c.outputs) for c in long_parts] == [0, 1]
    # 10 wrapped lines of 180 characters are 30 slide lines: split too
    assert len([s for s in sources if "wide" in s]) == 2
    # 12 lines and a figure of 22 lines do not fit one slide: the figure moves to a slide of its own, code hidden
    figure_parts = [c for c in fitted.cells if "fig0" in c.source]
    assert len(figure_parts) == 2 and not figure_parts[0].outputs
    assert slides.OUTPUTS_ONLY in figure_parts[1].metadata["tags"] and figure_parts[1].outputs
    assert len({c.id for c in fitted.cells}) == len(fitted.cells)                   # cell ids stay unique
    marked = slides.with_slide_metadata(nb)
    assert max(slides.code_lines_per_slide(marked)) <= slides.MAX_CODE_LINES


def test_a_split_deck_shows_each_line_once(tmp_path):
    executed = tmp_path / "long.ipynb"
    nbformat.write(_long_cells_notebook(), executed)
    text = slides.render_slides(executed, tmp_path / "long.slides.html", "Long").read_text()
    assert text.count("fig11") == 1 and text.count("long39") == 1 and "continued" in text
    assert text.count('src="data:image/png;base64,') == 1


@pytest.mark.browser
def test_split_slides_fit_the_deck_in_chromium(tmp_path):
    """The made-up notebook's deck in headless Chromium: no (sub)slide is taller than the deck's 760 pixels."""
    executed = tmp_path / "long.ipynb"
    nbformat.write(_long_cells_notebook(), executed)
    slides.copy_reveal(tmp_path)
    deck = slides.render_slides(executed, tmp_path / "long.slides.html", "Long")
    driver = offline_chromium(tmp_path, "1200,900")
    try:
        driver.get(deck.as_uri())
        deadline = time.time() + 30
        while time.time() < deadline and not driver.execute_script(
                "return !!(window.Reveal && Reveal.isReady && Reveal.isReady());"):
            time.sleep(0.25)
        heights = driver.execute_script(
            "return Reveal.getSlides().map(s => { const i = Reveal.getIndices(s); Reveal.slide(i.h, i.v); "
            "return s.scrollHeight; });")
        assert len(heights) >= 7 and max(heights) <= 760, heights
    finally:
        driver.quit()


def test_notes_come_from_measured_timings_and_have_prompts(tmp_path):
    record = {"built": "2026-01-01 00:00 UTC", "parameters": {},
              "lessons": {n: {"title": f"Lesson {k}", "seconds": 10.0 * k, "slides": 5 + k, "max_code_lines": 20,
                              "deck": f"{n}.slides.html"} for k, n in enumerate(site.LESSONS, 1)}}
    path = tmp_path / "slides.json"
    path.write_text(json.dumps(record))
    text = slides.write_notes(path, tmp_path / "notes.md").read_text()
    assert text.count("\n## Lesson ") == len(site.LESSONS) and "executes in 30 s; 8 slides" in text
    assert all(slides.PROMPTS[n][0] in text for n in site.LESSONS)
    record["parameters"] = {"01_adversarial_examples": {"N_IMAGES": 2}}
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="changed parameters"):
        slides.write_notes(path, tmp_path / "notes.md")


def test_a_deck_loads_reveal_from_its_own_folder(tmp_path):
    nb = nbformat.read(site.NOTEBOOKS / "02_pgd.ipynb", as_version=4)
    executed = tmp_path / "02_pgd.ipynb"
    nbformat.write(nb, executed)
    slides.copy_reveal(tmp_path)
    text = slides.render_slides(executed, tmp_path / "02_pgd.slides.html", "Lesson 2").read_text()
    scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text)
    assert scripts == [site.MATHJAX_URL, "reveal/dist/reveal.js", "reveal/plugin/notes/notes.js"], scripts
    assert all((tmp_path / s).is_file() for s in scripts[1:])
    sheets = re.findall(r"<link[^>]*href=\"([^\"]+)\"", text)
    assert sheets and all(not CDN.search(s) and (tmp_path / s).is_file() for s in sheets), sheets
    assert not CDN.search(text) and "require.js" not in text and "lesson_setup(" not in text
    assert text.count("<section") > 5
    assert "white-space: pre-wrap" in text and "max-height: 520px" in text      # code wraps, figures shrink


def test_only_the_files_the_decks_load_are_copied(tmp_path):
    """reveal's other themes import web fonts, and its math plugin defaults to a CDN: none of them is copied."""
    slides.copy_reveal(tmp_path)
    files = {str(f.relative_to(tmp_path / "reveal")) for f in (tmp_path / "reveal").rglob("*") if f.is_file()}
    assert {"dist/reveal.js", "dist/reveal.css", "dist/theme/white.css", "plugin/notes/notes.js"} <= files
    assert any(f.startswith("dist/theme/fonts/source-sans-pro/") and f.endswith(".woff") for f in files)
    assert not any(f.startswith(("plugin/math", "plugin/highlight", "plugin/markdown")) or f.endswith(".map")
                   for f in files)
    assert [f for f in files if f.startswith("dist/theme/") and f.count("/") == 2] == ["dist/theme/white.css"]
    assert CDN.search("".join((tmp_path / "reveal" / f).read_text(errors="ignore") for f in files
                              if f.endswith(".css"))) is None


@pytest.mark.browser
@pytest.mark.slow
def test_a_deck_renders_offline_in_chromium(tmp_path):
    """Lesson 01's deck (tiny parameters), served from 127.0.0.1 with the network blocked: reveal.js initialises,
    the deck has many slides and moves on, and every request the page made stayed on the local server."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_binaries()
    out = tmp_path / "slides"
    record = json.loads(slides.build_slides(out, ["01_adversarial_examples"], site.SMALL).read_text())
    assert record["lessons"]["01_adversarial_examples"]["max_code_lines"] <= slides.MAX_CODE_LINES
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium'}",
                 *OFFLINE_FLAGS):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    server, served = _serve(out)
    try:
        driver.get(f"{served}01_adversarial_examples.slides.html")
        deadline = time.time() + 30
        state = {}
        while time.time() < deadline:
            state = driver.execute_script("return window.Reveal && Reveal.isReady ? {ready: Reveal.isReady(), "
                                          "total: Reveal.getTotalSlides(), index: Reveal.getIndices().h} : {};")
            if state.get("ready"):
                break
            time.sleep(0.25)
        assert state.get("ready") and state["total"] > 5, state
        driver.execute_script("Reveal.slide(2);")
        assert driver.execute_script("return Reveal.getIndices().h;") == 2
        time.sleep(1.5)                                                     # the slide transition's end
        OUTPUTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(OUTPUTS / "slides_01_adversarial_examples.png"))
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        assert any(u.endswith("reveal/dist/reveal.js") for u in urls), urls
        # Chromium's own pages (its new tab page, before the deck loads) are not network requests
        outside = [u for u in urls if not u.startswith((served, "data:", "about:", "chrome://", "chrome-untrusted://"))]
        assert not outside, outside
    finally:
        driver.quit()
        server.shutdown()
