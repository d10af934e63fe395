"""Lecture mode: reveal.js slides of the executed lessons that work offline (``make slides``).

Each lesson is executed with papermill (``site.execute``), its cells get slide metadata from ``slide_types`` (the
committed notebooks are never written) and nbconvert's ``reveal`` exporter renders it into ``OUT/<lesson>.slides.html``
with a template (``TEMPLATE``) that loads nothing from a CDN: reveal.js comes from the ``sphinx-revealjs`` package
(``requirements.txt``; it ships reveal.js's ``dist/`` and ``plugin/`` files), copied to ``OUT/reveal/``, and MathJax
from ``jupyter-server-mathjax``, copied to ``OUT/mathjax/`` (``site.copy_mathjax``). No require.js, jQuery, widget
manager or mermaid is loaded.

The slide rules: the title cell opens the deck; the parameters cell, the note about it and the setup (code) cells
before the first section heading are skipped, other introductory text gets a sub-slide; every ``## `` heading starts
a slide; a slide holds at most ``MAX_CODE_LINES`` lines of code and output, so a cell that would pass that starts a
sub-slide. Lines are counted as the slide shows them (``slide_lines``): a code line longer than ``WRAP_COLUMNS``
characters wraps onto several, and a figure counts the lines of its height on the slide. Before that,
``fit_cells`` splits what cannot fit one slide: a code cell longer than ``MAX_CODE_LINES`` into continuation cells
(``# ... continued``), and the outputs of a cell whose code and outputs together do not fit into a cell of their
own (its code hidden, ``OUTPUTS_ONLY``), each then on its own sub-slide. Only the rendered deck is split; the
notebooks are not.

``OUT/slides.json`` records how many seconds each lesson took to execute and how many slides it has;
``write_notes`` turns it into the instructor notes (``docs/lecture-notes.md``: timings and discussion prompts).
"""

from __future__ import annotations

import argparse
import base64
import importlib.resources
import json
import math
import shutil
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from shadowlab.data import PROJECT_ROOT
from shadowlab.lab.site import (
    EXECUTED,
    LESSONS,
    MATHJAX_URL,
    NOTEBOOKS,
    OFFLINE_BLOCKS,
    SMALL,
    check_lesson_names,
    copy_mathjax,
    drop_widget_views,
    executed_copy,
    lesson_summary,
)

MAX_CODE_LINES = 25
# measured in headless Chromium on a 1100 x 760 deck (TEMPLATE): code at 19 px in lines of 23.75 px, about 90
# characters to a line before it wraps, figures at most 520 px high; a heading leaves room for 25 such lines
WRAP_COLUMNS = 90
LINE_PX = 23.75
FIGURE_MAX_PX = 520
SLIDE_WIDTH_PX = 1040
CONTINUED = "# ... continued"
# the tag of a cell that shows only its outputs on the slides (its code is on the slide before)
OUTPUTS_ONLY = "slides-outputs-only"
REVEAL_DIR = "reveal"
NOTES = PROJECT_ROOT / "docs" / "lecture-notes.md"

# nbconvert's reveal template with reveal.js from OUT/reveal/ (initialised without require.js), without jQuery, and
# the site's offline blocks (no CDN, the local MathJax)
TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_jquery -%}{%- endblock html_head_js_jquery -%}
""" + OFFLINE_BLOCKS + r"""{% block footer_js %}
<style>
/* code wraps instead of running off the right edge; figures shrink to fit the slide's height */
.reveal pre, .reveal .jp-OutputArea-output pre, .reveal .highlight pre {white-space: pre-wrap; word-break: break-word;}
.reveal .jp-InputArea-editor pre, .reveal .jp-OutputArea-output pre {font-size: 0.8em; line-height: 1.25;}
.reveal .jp-OutputArea-output img {max-height: 520px; max-width: 100%; width: auto; height: auto;
                                    object-fit: contain;}
</style>
<script src="reveal/dist/reveal.js"></script>
<script src="reveal/plugin/notes/notes.js"></script>
<script>
Reveal.initialize({controls: true, progress: true, hash: true, slideNumber: "c/t", transition: "slide",
                   width: 1100, height: 760, plugins: [RevealNotes]});
Reveal.on("slidechanged", function () {
  if (window.MathJax && MathJax.Hub) { MathJax.Hub.Queue(["Rerender", MathJax.Hub, Reveal.getCurrentSlide()]); }
});
</script>
{% endblock footer_js %}
"""

# what to ask the room after each lesson (the instructor notes add the measured timings)
PROMPTS: dict[str, tuple[str, ...]] = {
    "01_adversarial_examples": (
        "Why does FGSM, one linearised step, already break an undefended network at a budget people cannot see?",
        "The random-sign perturbation has the same L-inf size as FGSM yet costs far less accuracy at every budget "
        "(it is not harmless: the table shows what it costs at the largest ones): what does that say about where "
        "the danger lies?",
        "Is a model that resists FGSM robust? What would convince you?"),
    "02_pgd": (
        "When do you call an attack converged: more steps, restarts, a different step size? Who carries the burden "
        "of proof, the attacker or the defender?",
        "L-inf and L2 balls of 'the same size' allow very different perturbations: which threat model fits which "
        "application?"),
    "03_certified_defenses": (
        "A smoothing certificate holds with probability 1 - alpha: for one image, or for a whole test set at once?",
        "Why does the radius stop growing with sigma at a fixed number of samples n?",
        "The committed models are all CROWN-IBP-trained, yet on the eps-8 ones plain IBP certifies more images "
        "than CROWN-IBP (the lesson prints both): what does a bound's tightness depend on besides the method?",
        "The MILP gives the true robust error of the tiny network: which bracket is loose, PGD's or the bounds', "
        "and does the answer change with eps? Why can it not be run on the committed CNNs?",
        "PGD training lowers the error an attack measures, CROWN-IBP training the verified error, at a price in "
        "fit: which model would you deploy, and on what evidence?"),
    "04_shadow_attack": (
        "The Shadow Attack is large in L2 yet looks harmless: what does that say about norm balls as a model of "
        "'imperceptible'?",
        "A certificate for the wrong label is still a true statement about the classifier: where exactly is the "
        "defense broken?"),
    "05_ablations": (
        "Which loss term matters most for a successful and invisible shadow, and how would you show it with "
        "fewer runs?",
        "How would you pick lambda values on a new data set without overfitting them to the test images?"),
    "06_reproduce_paper": (
        "With a handful of images per cell, which of the paper's claims can this run support, and which not?",
        "How many images would you need before a 5-point difference in attack error means something?"),
    "07_certificates_mislead": (
        "Is a certificate computed in bf16 a certificate? Of which network?",
        "What does 'certified accuracy' promise a user of one image, and what for a test set of 10,000?",
        "SSIM, PSNR or L2: who decides what 'imperceptible' means, and how would you test it with people?",
        "An attack's robust accuracy is an upper bound: which of the three checks of section 5 would have exposed a "
        "defense that only masks its gradients, and what would you ask of a paper before believing its numbers?",
        "CERTIFY's radius and SmoothAdv's empirical radius bracket the smoothed classifier's true radius: which "
        "would you report to a user, and what does the gap between them say?"),
}


def _cells_before_first_section(nb: Any) -> int:
    return next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## ")),
                len(nb.cells))


def code_lines(source: str, columns: int = WRAP_COLUMNS) -> int:
    """Lines ``source`` takes on a slide: each line, wrapped at ``columns`` characters, takes at least one."""
    return sum(max(1, math.ceil(len(line.expandtabs(4)) / columns)) for line in source.splitlines())


def _png_height(data: str) -> float:
    """The height in pixels a base64 PNG takes on a slide (scaled to the slide's width, at most FIGURE_MAX_PX)."""
    head = base64.b64decode(data[:64])[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return FIGURE_MAX_PX
    width, height = struct.unpack(">II", head[16:24])
    return min(FIGURE_MAX_PX, height * min(1.0, SLIDE_WIDTH_PX / max(1, width)))


def output_lines(cell: Any) -> int:
    """Lines a code cell's outputs take on a slide: a figure its height in code lines, text its lines (wrapped)."""
    total = 0
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "image/png" in data:
            total += math.ceil(_png_height(data["image/png"]) / LINE_PX)
        elif any(k.startswith("image/") for k in data):
            total += math.ceil(FIGURE_MAX_PX / LINE_PX)
        elif out.get("output_type") == "stream":
            total += code_lines(out.get("text", ""))
        elif "text/plain" in data and not any(k in data for k in ("text/html", "text/markdown")):
            total += code_lines(data["text/plain"])
        elif data:
            total += 1
    return total


def slide_lines(cell: Any) -> int:
    """Lines a cell takes on a slide: its code (``code_lines``, none when ``OUTPUTS_ONLY``) and its outputs; 0 for a
    markdown cell."""
    if cell.cell_type != "code":
        return 0
    code = 0 if OUTPUTS_ONLY in cell.metadata.get("tags", []) else code_lines(cell.source)
    return code + output_lines(cell)


def _chunks(lines: list[str], budget: int) -> list[list[str]]:
    """Consecutive pieces of ``lines`` of at most ``budget`` slide lines each, cut after a blank line or before an
    unindented line where one lies in a piece's second half (a single line longer than the budget is a piece)."""
    pieces: list[list[str]] = []
    start = 0
    while start < len(lines):
        used, end = 0, start
        while end < len(lines) and (end == start or used + code_lines(lines[end]) <= budget):
            used += code_lines(lines[end])
            end += 1
        if end < len(lines):     # cut before an unindented line or after a blank one, in the piece's second half
            end = next((k for k in range(end, start + (end - start) // 2, -1)
                        if not lines[k - 1].strip() or (lines[k].strip() and not lines[k][:1].isspace())), end)
        pieces.append(lines[start:end])
        start = end
    return pieces


def fit_cells(nb: Any, max_code_lines: int = MAX_CODE_LINES) -> Any:
    """A copy of ``nb`` in which every code cell fits a slide: code longer than ``max_code_lines`` slide lines is split
    into continuation cells (each after the first starts with ``CONTINUED``; the outputs stay with the last), and
    outputs that do not fit beside their code move into a cell of their own, tagged ``OUTPUTS_ONLY`` (its code
    hidden on the slides). Markdown cells and cells that fit are kept as they are."""
    import nbformat  # optional dependency (nbformat)

    out = nbformat.from_dict(json.loads(json.dumps(nb)))
    cells = []
    for cell in out.cells:
        if cell.cell_type != "code" or slide_lines(cell) <= max_code_lines:
            cells.append(cell)
            continue
        outputs = cell.get("outputs", [])
        pieces = _chunks(cell.source.splitlines(), max_code_lines - 1)
        parts = []
        for k, piece in enumerate(pieces):
            part = nbformat.from_dict(json.loads(json.dumps(cell)))
            part.source = "\n".join(([CONTINUED] if k else []) + piece)
            part.outputs = []
            if "id" in cell:
                part.id = f"{cell.id}-{k}" if k else cell.id
            parts.append(part)
        parts[-1].outputs = outputs
        if outputs and slide_lines(parts[-1]) > max_code_lines:
            shown = nbformat.from_dict(json.loads(json.dumps(parts[-1])))
            parts[-1].outputs = []
            shown.metadata["tags"] = [*shown.metadata.get("tags", []), OUTPUTS_ONLY]
            if "id" in shown:
                shown.id = f"{cell.id}-outputs"
            parts.append(shown)
        cells += parts
    out.cells = cells
    return out


def slide_types(nb: Any, max_code_lines: int = MAX_CODE_LINES) -> list[str]:
    """The reveal.js slide type of every cell (see the module docstring): "slide", "subslide", "-" or "skip"."""
    first_section = _cells_before_first_section(nb)
    types, lines = [], 0
    for i, cell in enumerate(nb.cells):
        n = slide_lines(cell)
        if i == 0:
            kind, lines = "slide", n
        elif "parameters" in cell.metadata.get("tags", []) or (i < first_section and (
                cell.cell_type == "code" or cell.source.startswith("*Parameters*"))):
            kind = "skip"
        elif i < first_section and not any(t == "subslide" for t in types):
            kind, lines = "subslide", 0
        elif cell.cell_type == "markdown" and cell.source.startswith("## "):
            kind, lines = "slide", 0
        elif n and lines + n > max_code_lines and lines > 0:
            kind, lines = "subslide", n
        else:
            kind, lines = "-", lines + n
        types.append(kind)
    return types


def with_slide_metadata(nb: Any, max_code_lines: int = MAX_CODE_LINES) -> Any:
    """A copy of ``nb``, its long cells split to fit (``fit_cells``), whose cells carry
    ``metadata.slideshow.slide_type`` from ``slide_types``."""
    out = fit_cells(nb, max_code_lines)
    for cell, kind in zip(out.cells, slide_types(out, max_code_lines)):
        cell.metadata["slideshow"] = {"slide_type": kind}
    return out


def code_lines_per_slide(nb: Any) -> list[int]:
    """Lines of code and output (``slide_lines``) on each (sub)slide of a notebook with slide metadata (the skipped
    cells left out)."""
    counts: list[int] = []
    for cell in nb.cells:
        kind = cell.metadata.get("slideshow", {}).get("slide_type", "-")
        if kind == "skip":
            continue
        if kind in ("slide", "subslide") or not counts:
            counts.append(0)
        counts[-1] += slide_lines(cell)
    return counts


# the reveal.js files the decks load (TEMPLATE and nbconvert's reveal template with the "white" theme, whose fonts ship
# beside it); nothing else is copied (the other themes import web fonts, other plugins default to a CDN)
REVEAL_FILES = ("dist/reveal.js", "dist/reveal.css", "dist/theme/white.css", "dist/theme/fonts/source-sans-pro",
                "plugin/notes/notes.js")


def copy_reveal(out: Path) -> Path:
    """Copy the reveal.js files the decks load (``REVEAL_FILES``) from the ``sphinx-revealjs`` package to
    ``out/reveal/``."""
    target = out / REVEAL_DIR
    shutil.rmtree(target, ignore_errors=True)
    source = Path(str(importlib.resources.files("sphinx_revealjs") / "_static" / "revealjs"))
    for part in REVEAL_FILES:
        (target / part).parent.mkdir(parents=True, exist_ok=True)
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part)
        else:
            shutil.copy2(source / part, target / part)
    return target


def render_slides(executed: Path, deck: Path, title: str) -> Path:
    """The executed notebook as a reveal.js deck (slide metadata from ``with_slide_metadata``) in ``deck``."""
    import nbformat  # optional dependency (nbformat)
    from nbconvert import SlidesExporter  # optional dependency (nbconvert)

    nb = with_slide_metadata(nbformat.read(executed, as_version=4))
    nb.metadata.pop("widgets", None)
    drop_widget_views(nb)
    # "white": its fonts ship in reveal/dist/theme/fonts (nbconvert's default "simple" imports Google Fonts)
    from traitlets.config import Config  # optional dependency (traitlets, with nbconvert)

    hide = Config({"TagRemovePreprocessor": {"enabled": True, "remove_input_tags": {OUTPUTS_ONLY}}})
    exporter = SlidesExporter(raw_template=TEMPLATE, reveal_url_prefix=REVEAL_DIR, reveal_theme="white",
                              mathjax_url=MATHJAX_URL, config=hide)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    deck.write_text(body, encoding="utf-8")
    return deck


def build_slides(out: str | Path = PROJECT_ROOT / "outputs" / "slides", lessons: Sequence[str] = LESSONS,
                 parameters: Mapping[str, Mapping[str, Any]] | None = None, timeout: int = 1800,
                 cache: Path = EXECUTED) -> Path:
    """Execute and render every lesson of ``lessons`` as a deck in ``out``; returns ``out/slides.json`` (seconds to
    execute and slide count per lesson, and the parameters). Each lesson is executed once into ``cache``
    (``site.execute_cached``, shared with ``make site``) and reused until it, its parameters or the package change.
    """
    import nbformat  # optional dependency (nbformat)

    names = check_lesson_names(lessons)
    out = Path(out)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    copy_reveal(out)
    copy_mathjax(out)
    record: dict[str, Any] = {"lessons": {}, "parameters": dict(parameters or {}),
                              "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    for name in tqdm(names, desc="slides: lessons", unit="lesson"):
        title, _ = lesson_summary(name)
        executed, seconds = executed_copy(NOTEBOOKS / f"{name}.ipynb", out / "notebooks" / f"{name}.ipynb",
                                          (parameters or {}).get(name), timeout, cache)
        render_slides(executed, out / f"{name}.slides.html", title)
        counts = code_lines_per_slide(with_slide_metadata(nbformat.read(executed, as_version=4)))
        record["lessons"][name] = {"title": title, "seconds": round(seconds, 1), "slides": len(counts),
                                   "max_code_lines": max(counts), "deck": f"{name}.slides.html"}
    path = out / "slides.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def write_notes(record: str | Path, target: str | Path = NOTES) -> Path:
    """The instructor notes from a ``slides.json`` (``build_slides`` at the lessons' defaults): per lesson the
    measured execution time, the number of slides, and the discussion prompts of ``PROMPTS``."""
    data = json.loads(Path(record).read_text())
    if data.get("parameters"):
        raise ValueError(f"record={str(record)!r} was built with changed parameters: the notes need the defaults")
    lines = ["# Lecture notes: presenting the lessons", "",
             "Written by `python -m shadowlab.lab.slides notes` from the last `make slides` "
             f"({data['built']}; the lessons' default parameters, this machine's CPU). `make slides` builds the decks "
             "into `outputs/slides/` (open `<lesson>.slides.html` in a browser, offline; `s` opens the speaker "
             "view). The execution time is how long the lesson's cells ran top to bottom: run the notebook before "
             "the lecture, or run it live only where it is a few seconds.", ""]
    for name, rec in data["lessons"].items():
        lines += [f"## {rec['title']}", "",
                  f"* executes in {rec['seconds']:.0f} s; {rec['slides']} slides and sub-slides, at most "
                  f"{rec['max_code_lines']} lines of code on one",
                  "* discussion:", *(f"  * {p}" for p in PROMPTS.get(name, ())), ""]
    path = Path(target)
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadowlab.lab.slides", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute the lessons and write the decks")
    b.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "slides"))
    b.add_argument("--small", action="store_true", help="tiny lesson parameters (a quick look; no notes from it)")
    b.add_argument("--lessons", nargs="*", default=list(LESSONS))
    b.add_argument("--cache", default=str(EXECUTED), help="the executed lessons, shared with make site")
    n = sub.add_parser("notes", help="write the instructor notes from a slides.json")
    n.add_argument("record", nargs="?", default=str(PROJECT_ROOT / "outputs" / "slides" / "slides.json"))
    n.add_argument("--out", default=str(NOTES))
    args = parser.parse_args(argv)
    if args.command == "build":
        path = build_slides(args.out, args.lessons, SMALL if args.small else None, cache=Path(args.cache))
        print(f"slides written: {path.parent} ({path.name} has the timings)")
    else:
        print(f"notes written: {write_notes(args.record, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
