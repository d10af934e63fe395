"""A static HTML site of the executed lessons: ``make site`` (or ``python -m shadowlab.lab.site``).

Each lesson (and its worked solutions) is executed with papermill into ``OUT/notebooks/`` and rendered with
nbconvert's ``lab`` template into ``OUT/<name>.html``; figures are embedded as PNG data URIs, and the widgets' static
snapshots (``ShadowLab.snapshot()``, ``LiveLossPlot``'s last frame) are ordinary image outputs, so every page shows
its figures without a kernel. ``OUT/index.html`` lists the lessons with their learning goals and links to the page and
the executed notebooks. With the solutions, each exercise's worked solution sits collapsed (an HTML ``<details>``
block) right under its check cell on the lesson page (``with_solutions``). The committed notebooks are never
written (they stay without outputs).

The site needs no network: formulas are typeset by the MathJax 2 copied into ``OUT/mathjax/`` from the
``jupyter-server-mathjax`` package (``requirements.txt``), and the pages load nothing from a CDN (no require.js, no
widget manager, no mermaid). Widgets cannot run without a kernel, so a page with widgets says so at the top and
points to JupyterLab (``make lab``).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib.resources
import json
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from shadowlab.data import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
LESSONS = ("01_adversarial_examples", "02_pgd", "03_certified_defenses", "04_shadow_attack", "05_ablations",
           "06_reproduce_paper", "07_certificates_mislead")
# a few seconds per lesson: for the browser test and a quick look (the defaults take several minutes in all)
SMALL: dict[str, dict[str, Any]] = {
    "01_adversarial_examples": {"N_IMAGES": 20, "EPS_255": [0, 4, 16]},
    "02_pgd": {"N_IMAGES": 8, "STEPS": 3, "EPS_LINF_255": [0, 8], "EPS_L2": [0, 1.0]},
    "03_certified_defenses": {"N_CERTIFY": 4, "N": 64, "N_COUNTS": 64, "N_PREDICT": 16, "N_VERIFY": 8,
                              "EPS_VERIFY_255": [0, 2]},
    "04_shadow_attack": {"N_IMAGES": 1, "STEPS": 4, "NOISE_SAMPLES": 4, "N_SELECT": 32, "N_CERT": 64, "N_CROWN": 1,
                         "CROWN_STEPS": 4, "LAB_STEPS": 4, "LAB_NOISE_SAMPLES": 4},
    "05_ablations": {"STEPS": 3, "NOISE_SAMPLES": 2, "LAMBDA_S_GRID": [0.01, 1.0], "LAMBDA_TV_GRID": [0.03, 0.3],
                     "MAP_LAMBDA_TV": [0.1], "MAP_LAMBDA_C": [1.0], "N_SWEEP": 1},
    "06_reproduce_paper": {"SIGMAS": [0.25], "T1_IMAGES": 1, "T1_STEPS": 2, "T1_NOISE_SAMPLES": 2, "T1_N": 64,
                           "T1_N_SELECT": 32, "T2_MODELS": ["crownibp-cnn-2layer-eps2"], "T2_IMAGES": 1,
                           "T2_STEPS": 2, "OUT_DIR": "outputs/site-run"},
    # lesson 07 asserts claims (bf16 gains certificates, PGD refutes some) that hold at its defaults, not on a
    # handful of images: it runs at its defaults here too (about 3 minutes on 2 cores)
    "07_certificates_mislead": {},
}

STYLE = """body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5}
li{margin:.8rem 0}.goals{font-size:.92rem;color:#333}a{color:#0645ad}code{background:#f3f3f3;padding:0 .2rem}"""

# nbconvert's lab template minus everything it fetches from CDNs (require.js, the unpkg widget manager, mermaid; the
# widget views, empty without that manager, are dropped too), with MathJax set to the web fonts of the local copy
# (jupyter-server-mathjax ships STIX-Web only) and ``resources.lab_note`` at the top of the page.
OFFLINE_BLOCKS = r"""{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block data_widget_view -%}{%- endblock data_widget_view -%}
{%- block html_head_js_mathjax -%}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null}});
</script>
{{ super() }}
{%- endblock html_head_js_mathjax -%}
"""
TEMPLATE = r"""{%- extends 'index.html.j2' -%}
""" + OFFLINE_BLOCKS + r"""{%- block body_header -%}{{ super() }}{{ resources.lab_note }}{%- endblock body_header -%}
{%- block rawcell scoped -%}
{%- if cell.metadata.get("shadowlab_solution") -%}{{ cell.source }}{%- else -%}{{ super() }}{%- endif -%}
{%- endblock rawcell -%}
"""
# relative to the pages, which all sit in OUT/; the package's one combined configuration (TeX input, HTML-CSS output)
MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
# a worked solution on the lesson page: collapsed under its exercise's check cell (``with_solutions``)
CHECK_CALL = re.compile(r"exercises\.check_(\d\d)_(\d+)\(")
SOLUTION = ('<details class="shadowlab-solution" data-exercise="{exercise}" style="margin:.5rem 0 1rem 4rem;'
            'padding:.4rem .8rem;border:1px solid #c8d3e6;border-radius:4px;background:#f8fafd">'
            '<summary style="cursor:pointer;font-family:system-ui,sans-serif;color:#0645ad">Worked solution: exercise '
            '{exercise} (try it first)</summary>{body}</details>')
LAB_NOTE = ('<div class="shadowlab-note" style="margin:1rem 2rem;padding:.6rem 1rem;border-left:4px solid #0645ad;'
            'background:#eef3fb;font-family:system-ui,sans-serif">This page is a static copy of '
            '<code>{notebook}</code>: its interactive widgets show their last state as a still figure. The live lab '
            'needs JupyterLab and a kernel: run <code>make lab</code> in the repository and open the notebook.</div>')


def check_lesson_names(lessons: Sequence[str]) -> list[str]:
    unknown = [n for n in lessons if n not in LESSONS]
    if unknown or not lessons:
        raise ValueError(f"lessons={list(lessons)!r} must be a non-empty subset of {', '.join(LESSONS)}")
    return list(lessons)


def execute(source: Path, target: Path, parameters: Mapping[str, Any] | None = None, timeout: int = 1800,
            progress: bool = False) -> Path:
    """Run ``source`` with papermill (cwd: its folder) into ``target`` with the given parameters; returns target.
    ``progress`` shows papermill's tqdm bar over the notebook's cells."""
    import papermill  # optional dependency (papermill)

    target.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(source), str(target), parameters=dict(parameters or {}), cwd=str(source.parent),
                               kernel_name="python3", progress_bar=progress, execution_timeout=timeout)
    return target


# one execution of each notebook, shared by make site and make slides (and reused until the notebook, its
# parameters or the package's code change)
EXECUTED = PROJECT_ROOT / "outputs" / "executed"


def fingerprint(source: Path, parameters: Mapping[str, Any] | None = None,
                package: Path = PROJECT_ROOT / "shadowlab") -> str:
    """A hash of what an execution depends on: the notebook, its papermill parameters and every module of the
    package."""
    h = hashlib.sha256(Path(source).read_bytes())
    h.update(json.dumps(dict(parameters or {}), sort_keys=True, default=str).encode())
    for f in sorted(Path(package).rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def execute_cached(source: Path, parameters: Mapping[str, Any] | None = None, timeout: int = 1800,
                   cache: Path = EXECUTED, progress: bool = True) -> tuple[Path, float, bool]:
    """The executed copy of ``source`` at ``parameters`` from ``cache``, executing it first when the cache has no
    copy for this fingerprint: (path, seconds the execution took, whether it came from the cache)."""
    source = Path(source)
    stem = "solutions-" + source.stem if source.parent.name == "solutions" else source.stem
    target = Path(cache) / f"{stem}-{fingerprint(source, parameters)}.ipynb"
    record = target.with_suffix(".json")
    if target.is_file() and record.is_file():
        return target, float(json.loads(record.read_text())["seconds"]), True
    partial = target.with_suffix(".partial.ipynb")
    t0 = time.perf_counter()
    execute(source, partial, parameters, timeout, progress)
    seconds = round(time.perf_counter() - t0, 1)
    partial.replace(target)
    record.write_text(json.dumps({"source": str(source), "parameters": dict(parameters or {}), "seconds": seconds},
                                 default=str) + "\n")
    return target, seconds, False


def executed_copy(source: Path, target: Path, parameters: Mapping[str, Any] | None = None, timeout: int = 1800,
                  cache: Path = EXECUTED) -> tuple[Path, float]:
    """``execute_cached``, copied to ``target``: (target, seconds of the execution, cached or not)."""
    path, seconds, cached = execute_cached(source, parameters, timeout, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
    print(f"{source.name}: {'reused the cached execution' if cached else 'executed'} ({seconds:g} s)", flush=True)
    return target, seconds


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def drop_widget_views(nb: Any) -> Any:
    """Remove the outputs that display a live widget (their only other content is its repr, ``VBox(children=...``):
    without a kernel the page shows the widget's static snapshot, an ordinary image output, instead."""
    for cell in nb.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    return nb


def copy_mathjax(out: Path) -> Path:
    """Copy MathJax 2 as the ``jupyter-server-mathjax`` package ships it into ``out/mathjax/`` (``MATHJAX_URL``)."""
    target = out / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(str(importlib.resources.files("jupyter_server_mathjax") / "static")), target)
    return target


def has_widgets(nb: Any) -> bool:
    """Whether an executed notebook shows ipywidgets (saved widget state or a widget view among its outputs)."""
    views = (o for c in nb.cells for o in c.get("outputs", ()))
    return "widgets" in nb.metadata or any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                                           for o in views)


def exercise_id(source: str) -> str | None:
    """The exercise a cell checks ("02.1" for a cell calling ``exercises.check_02_1(``), else None."""
    m = CHECK_CALL.search(source)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def solution_cells(solutions: Any) -> dict[str, list[Any]]:
    """{exercise id: the cells of its worked solution}: each solution code cell (the one calling the exercise's
    checker) with the markdown cells right before it (its "## Exercise k" heading and explanation)."""
    found: dict[str, list[Any]] = {}
    pending: list[Any] = []
    for cell in solutions.cells:
        ex = exercise_id(cell.source) if cell.cell_type == "code" else None
        if cell.cell_type == "markdown":
            pending.append(cell)
        elif ex is not None:
            found[ex] = [*pending, cell]
            pending = []
        else:
            pending = []
    return found


def _fragment(cells: Sequence[Any], metadata: Mapping[str, Any]) -> str:
    """Cells rendered with the lab template, as the HTML between the page's ``<main>`` tags."""
    import nbformat  # optional dependency (nbformat)
    from nbconvert import HTMLExporter  # optional dependency (nbconvert)

    nb = nbformat.v4.new_notebook(cells=list(cells), metadata=dict(metadata))
    body, _ = HTMLExporter(template_name="lab", raw_template=TEMPLATE, mathjax_url=MATHJAX_URL).from_notebook_node(
        nb, resources={"lab_note": ""})
    return body.split("<main>", 1)[1].rsplit("</main>", 1)[0]


def with_solutions(lesson: Any, solutions: Any) -> Any:
    """The lesson notebook with each exercise's worked solution (from the executed ``solutions`` notebook) right
    after its check cell, as a collapsed ``<details>`` block (``SOLUTION``); an exercise without a solution gets none.
    """
    import nbformat  # optional dependency (nbformat)

    solved = solution_cells(solutions)
    cells = []
    for cell in lesson.cells:
        cells.append(cell)
        ex = exercise_id(cell.source) if cell.cell_type == "code" else None
        if ex in solved:
            body = _fragment(solved[ex], solutions.metadata)
            cells.append(nbformat.v4.new_raw_cell(SOLUTION.format(exercise=ex, body=body),
                                                  metadata={"shadowlab_solution": ex}))
    merged = nbformat.from_dict(dict(lesson))
    merged.cells = cells
    return merged


def render(executed: Path, page: Path, title: str, solutions: Path | None = None) -> Path:
    """The executed notebook as a standalone HTML page that needs no network (``TEMPLATE``, images embedded).

    Formulas load ``MATHJAX_URL`` (``copy_mathjax`` puts MathJax there); the saved widget state is dropped (no
    widget manager is loaded) and a page with widgets carries ``LAB_NOTE``. With ``solutions`` (the executed
    worked-solutions notebook), each exercise's solution sits collapsed under its check cell (``with_solutions``).
    """
    import nbformat  # optional dependency (nbformat)
    from nbconvert import HTMLExporter  # optional dependency (nbconvert)

    nb = nbformat.read(executed, as_version=4)
    if solutions is not None:
        nb = with_solutions(nb, nbformat.read(solutions, as_version=4))
    note = LAB_NOTE.format(notebook=html.escape(executed.name)) if has_widgets(nb) else ""
    nb.metadata.pop("widgets", None)
    drop_widget_views(nb)
    exporter = HTMLExporter(template_name="lab", raw_template=TEMPLATE, mathjax_url=MATHJAX_URL)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}, "lab_note": note})
    page.write_text(body, encoding="utf-8")
    return page


def lesson_summary(name: str) -> tuple[str, str]:
    """Title (the first heading) and learning goals (as plain text items) of a committed lesson."""
    import nbformat  # optional dependency (nbformat)

    first = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells[0].source
    title = first.splitlines()[0].lstrip("# ").strip()
    goals = re.findall(r"^\d+\. (.+?)(?=\n\d+\. |\n\n|\Z)", first.split("**Learning goals.**")[-1], re.S | re.M)
    return title, "; ".join(" ".join(g.split()).rstrip(";. ") for g in goals)


def write_index(out: Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    """OUT/index.html: one list item per lesson with its goals and links."""
    items = []
    for e in entries:
        links = [f'<a href="{e["page"]}">lesson page</a>', f'<a href="{e["notebook"]}">executed notebook</a>']
        if e.get("solutions_notebook"):
            links += [f'<a href="{e["solutions_notebook"]}">solutions notebook</a>']
        items.append(f'<li><a href="{e["page"]}"><b>{html.escape(e["title"])}</b></a> — {" · ".join(links)}'
                     f'<div class="goals">{html.escape(e["goals"])}</div></li>')
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>shadowlab lessons</title><style>{STYLE}"
            f"</style></head><body><h1>shadowlab: Breaking Certified Defenses, the lessons</h1>"
            f"<p>Executed lessons of the teaching kit for Ghiasi et al., <i>Breaking Certified Defenses</i> "
            f"(ICLR 2020)."
            f" Every page was run top to bottom; the notebooks in the repository carry no outputs. Built {built}.</p>"
            f"<ol>{''.join(items)}</ol></body></html>")
    index = out / "index.html"
    index.write_text(text, encoding="utf-8")
    return index


def build_site(out: str | Path = PROJECT_ROOT / "outputs" / "site", lessons: Sequence[str] = LESSONS,
               parameters: Mapping[str, Mapping[str, Any]] | None = None, solutions: bool = True,
               timeout: int = 1800, cache: Path = EXECUTED) -> Path:
    """Execute and render the lessons (and, with ``solutions``, their worked solutions) into ``out``.

    Each notebook is executed once into ``cache`` (``execute_cached``, shared with ``make slides``) and reused until
    it, its parameters or the package change; a progress bar runs over the lessons and, while one executes, over its
    cells.

    ``parameters`` maps a lesson name to papermill parameters for the lesson (``SMALL`` for a quick build); the
    solutions always run with their own defaults. Returns the path of ``index.html``; ``out/site.json`` records
    what was built and how long each notebook's execution took.
    """
    names = check_lesson_names(lessons)
    out = Path(out)
    (out / "notebooks" / "solutions").mkdir(parents=True, exist_ok=True)
    copy_mathjax(out)
    entries, timings = [], {}

    for name in tqdm(names, desc="site: lessons", unit="lesson"):
        title, goals = lesson_summary(name)
        nb, timings[name] = executed_copy(NOTEBOOKS / f"{name}.ipynb", out / "notebooks" / f"{name}.ipynb",
                                          (parameters or {}).get(name), timeout, cache)
        entry: dict[str, Any] = {"name": name, "title": title, "goals": goals, "page": f"{name}.html",
                                 "notebook": f"notebooks/{name}.ipynb"}
        sol = None
        if solutions:
            sol, timings[f"solutions/{name}"] = executed_copy(
                NOTEBOOKS / "solutions" / f"{name}.ipynb", out / "notebooks" / "solutions" / f"{name}.ipynb", None,
                timeout, cache)
            entry.update(solutions_notebook=f"notebooks/solutions/{name}.ipynb")
        render(nb, out / f"{name}.html", title, sol)
        entries.append(entry)
    index = write_index(out, entries)
    (out / "site.json").write_text(json.dumps({"entries": entries, "seconds": timings,
                                               "parameters": dict(parameters or {})}, indent=2) + "\n")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadowlab.lab.site", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "site"), help="output folder")
    parser.add_argument("--small", action="store_true", help="tiny lesson parameters (a quick look, not for teaching)")
    parser.add_argument("--no-solutions", action="store_true", help="skip the worked-solutions notebooks")
    parser.add_argument("--lessons", nargs="*", default=list(LESSONS), help="a subset of the lessons")
    parser.add_argument("--cache", default=str(EXECUTED), help="the executed lessons, shared with make slides")
    args = parser.parse_args(argv)
    index = build_site(args.out, args.lessons, SMALL if args.small else None, not args.no_solutions,
                       cache=Path(args.cache))
    print(f"site written: {index}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
