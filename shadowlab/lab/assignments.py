"""Student and instructor builds of the lessons, graded with otter-grader: ``make assignments``.

One source: each lesson notebook (``notebooks/<lesson>.ipynb``) and its worked solutions
(``notebooks/solutions/<lesson>.ipynb``) are merged into an otter-grader *master* notebook (``master_notebook``):
the lesson's cells as they are, and for every check cell (a cell calling ``exercises.check_XX_K``) one otter
question whose solution is the worked solution's code and whose prompt is the lesson's ``answer = None`` line.
Every question's answer gets its own name (``answer_02_1``), because otter's tests read the notebook's variables
after the whole notebook ran, and the check cell keeps the checker's verdict (``fb_02_1``). ``otter assign`` turns the
master into

* ``OUT/<lesson>/student/<lesson>.ipynb``: no solutions, public tests only (``grader.check("ex02_1")`` says whether
  the answer is given and of the right type; the lesson's own check cell still gives hints);
* ``OUT/<lesson>/autograder/``: the notebook with solutions, the hidden tests (the checker's verdict must be right)
  and ``<lesson>-autograder_*.zip``, the grading configuration.

``grade`` runs ``otter run`` on a submitted notebook: it executes the submission top to bottom in this
environment (no Docker, no network) and returns the score (one point per exercise, all of it from the hidden test).
The public tests carry no points, so an untouched student notebook scores 0 and the worked solutions score full
marks (``tests/test_assignments.py`` grades both).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowlab.data import PROJECT_ROOT
from shadowlab.lab.site import CHECK_CALL, LESSONS, NOTEBOOKS, exercise_id

CONFIG = """# ASSIGNMENT CONFIG
name: {name}
init_cell: true
check_all_cell: false
export_cell: false
run_tests: false
generate:
  pdf: false
  filtering: false
tests:
  ok_format: false
  files: false
"""
# the public test: given and accepted by the checker (no TypeError / ValueError); no points, so only right answers score
PUBLIC_TEST = '''""" # BEGIN TEST CONFIG
points: 0
failure_message: "exercise {ex}: no answer yet, or the check cell raised an error: run it and read its message"
""" # END TEST CONFIG
def test_answered_{key}(fb_{key}):
    assert fb_{key} is not None and fb_{key}.correct is not None, "no answer yet"
'''
HIDDEN_TEST = '''""" # BEGIN TEST CONFIG
hidden: true
points: 1
failure_message: "exercise {ex}: not right"
""" # END TEST CONFIG
def test_right_{key}(fb_{key}):
    assert fb_{key} is not None and fb_{key}.exercise == "{ex}" and fb_{key}.correct is True, "not right"
'''


def _code(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _parameter_cell(nb: Any) -> Any:
    cells = [c for c in _code(nb) if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    return cells[0]


def _assigned_names(source: str) -> dict[str, str]:
    """Top-level ``NAME = value`` (and ``A, B = ...``) statements of a cell: {name: statement source}."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                for n in names:
                    if isinstance(n, ast.Name):
                        out[n.id] = ast.get_source_segment(source, node)
    return out


def _prompts(nb: Any) -> dict[int, str]:
    """The numbered items of the lesson's "## Exercises" cell: {k: text}."""
    cells = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    if not cells:
        return {}
    items = re.findall(r"^(\d+)\. (.+?)(?=^\d+\. |\Z)", cells[0], re.S | re.M)
    return {int(k): text.strip() for k, text in items}


def _rename(source: str, key: str) -> str:
    return re.sub(r"\banswer\b", f"answer_{key}", source)


@dataclass
class Exercise:
    """One exercise of a lesson: its id, the lesson's check cell, and the worked solution's code (without its check)."""

    id: str
    check_cell: str
    solution: str

    @property
    def key(self) -> str:
        return self.id.replace(".", "_")


def exercises_of(name: str, notebooks: Path = NOTEBOOKS) -> tuple[list[Exercise], str]:
    """The exercises of lesson ``name`` and the solutions' preamble (the code their cells need beyond the lesson's:
    solution-only parameters and the setup cells between the parameters and the first exercise)."""
    import nbformat

    lesson = nbformat.read(notebooks / f"{name}.ipynb", as_version=4)
    sol = nbformat.read(notebooks / "solutions" / f"{name}.ipynb", as_version=4)
    solved: dict[str, str] = {}
    preamble: list[str] = []
    lesson_params = _assigned_names(_parameter_cell(lesson).source)
    extra = [stmt for n, stmt in _assigned_names(_parameter_cell(sol).source).items() if n not in lesson_params]
    if extra:
        preamble.append("\n".join(dict.fromkeys(extra)))
    for cell in _code(sol):
        if "parameters" in cell.metadata.get("tags", []):
            continue
        ex = exercise_id(cell.source)
        if ex is None:
            if not solved:
                preamble.append(cell.source)
            continue
        lines = cell.source.splitlines()
        cut = next(i for i, line in enumerate(lines) if CHECK_CALL.search(line))
        while cut > 0 and lines[cut - 1].rstrip().endswith(","):    # a call split over lines
            cut -= 1
        solved[ex] = "\n".join(line for line in lines[:cut]).rstrip()
    found = []
    for cell in _code(lesson):
        ex = exercise_id(cell.source)
        if ex is None:
            continue
        if ex not in solved:
            raise ValueError(f"lesson {name}: exercise {ex} has a check cell but no worked solution")
        found.append(Exercise(ex, cell.source, solved[ex]))
    return found, "\n\n".join(preamble)


def _split_check_cell(source: str) -> tuple[str, str]:
    """(prompt lines before the checker call, the call itself to the end)."""
    lines = source.splitlines()
    at = next(i for i, line in enumerate(lines) if CHECK_CALL.search(line))
    return "\n".join(lines[:at]), "\n".join(lines[at:])


def master_notebook(name: str, notebooks: Path = NOTEBOOKS) -> Any:
    """The otter-grader master notebook of lesson ``name`` (see the module docstring)."""
    import nbformat

    v4 = nbformat.v4
    lesson = nbformat.read(notebooks / f"{name}.ipynb", as_version=4)
    exercises, preamble = exercises_of(name, notebooks)
    by_source = {e.check_cell: e for e in exercises}
    prompts = _prompts(lesson)
    cells = [v4.new_raw_cell(CONFIG.format(name=name))]
    first = True
    for cell in lesson.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## Exercises"):
            cell = v4.new_markdown_cell(re.sub(r"[^\n]*notebooks/solutions/[^\n]*\n*", "", cell.source))
        if cell.cell_type != "code" or cell.source not in by_source:
            cells.append(cell)
            continue
        e = by_source[cell.source]
        prompt, call = _split_check_cell(_rename(cell.source, e.key))
        k = int(e.id.split(".")[1])
        solution = (preamble + "\n\n" if first and preamble else "") + _rename(e.solution, e.key)
        first = False
        source = (f"# BEGIN SOLUTION NO PROMPT\n{solution}\n# END SOLUTION\n"
                  f'""" # BEGIN PROMPT\n{prompt}\n""" # END PROMPT\n'
                  f"fb_{e.key} = {call.strip()}\nfb_{e.key}")
        cells += [v4.new_raw_cell(f"# BEGIN QUESTION\nname: ex{e.key}\npoints: 1"),
                  v4.new_markdown_cell(f"**Exercise {e.id}.** {prompts.get(k, '')}".rstrip()),
                  v4.new_raw_cell("# BEGIN SOLUTION"),
                  v4.new_code_cell(source),
                  v4.new_raw_cell("# END SOLUTION"),
                  v4.new_raw_cell("# BEGIN TESTS"),
                  v4.new_code_cell(PUBLIC_TEST.format(ex=e.id, key=e.key)),
                  v4.new_code_cell(HIDDEN_TEST.format(ex=e.id, key=e.key)),
                  v4.new_raw_cell("# END TESTS"),
                  v4.new_raw_cell("# END QUESTION")]
    master = v4.new_notebook(cells=cells, metadata=lesson.metadata)
    return master


@dataclass
class Built:
    """Paths of one lesson's builds."""

    student: Path
    instructor: Path
    autograder: Path


def assign(name: str, out: str | Path, notebooks: Path = NOTEBOOKS) -> Built:
    """Write the student and instructor builds of lesson ``name`` into ``out/<name>/`` with ``otter assign``."""
    import nbformat

    if name not in LESSONS:
        raise ValueError(f"name={name!r} must be one of {', '.join(LESSONS)}")
    target = Path(out) / name
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        master = Path(tmp) / f"{name}.ipynb"
        nbformat.write(master_notebook(name, notebooks), master)
        subprocess.run([sys.executable, "-m", "otter", "assign", "--no-pdfs", str(master), str(target)],
                       check=True, capture_output=True, text=True, cwd=tmp)
    zips = sorted((target / "autograder").glob("*.zip"))
    if not zips:
        raise RuntimeError(f"otter assign wrote no autograder zip into {target / 'autograder'}")
    return Built(target / "student" / f"{name}.ipynb", target / "autograder" / f"{name}.ipynb", zips[-1])


@dataclass
class Grade:
    """A graded submission: points, the maximum, and otter's per-exercise results."""

    score: float
    max_score: float
    tests: list[dict[str, Any]]

    @property
    def fraction(self) -> float:
        return self.score / self.max_score if self.max_score else 0.0


def grade(autograder: str | Path, submission: str | Path, out_dir: str | Path | None = None,
          timeout: int = 3600) -> Grade:
    """Grade one submitted notebook with ``otter run`` (executes it here, no Docker); returns the ``Grade``.

    The notebook runs with its folder's copies of the lesson data reachable as in the repository: run it from a
    checkout (``notebooks/`` resolves the committed models and images through ``shadowlab.data.PROJECT_ROOT``).
    """
    submission = Path(submission).resolve()
    if submission.suffix != ".ipynb" or not submission.is_file():
        raise ValueError(f"submission={str(submission)!r} must be an existing .ipynb file")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "otter", "run", "--no-logo", "-a", str(Path(autograder).resolve()),
                        "-o", str(out), str(submission)], check=True, capture_output=True, text=True,
                       timeout=timeout, cwd=submission.parent)
        results = json.loads((out / "results.json").read_text())
    tests = [t for t in results["tests"] if "max_score" in t]
    return Grade(sum(float(t.get("score") or 0) for t in tests), sum(float(t["max_score"]) for t in tests), tests)


def build_all(out: str | Path = PROJECT_ROOT / "outputs" / "assignments",
              lessons: Sequence[str] = LESSONS) -> dict[str, Built]:
    """``assign`` every lesson of ``lessons`` into ``out``."""
    return {name: assign(name, out) for name in lessons}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadowlab.lab.assignments", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="student and instructor builds of the lessons")
    b.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "assignments"))
    b.add_argument("--lessons", nargs="*", default=list(LESSONS))
    g = sub.add_parser("grade", help="grade submitted notebooks of one lesson")
    g.add_argument("autograder", help="the lesson's autograder zip (OUT/<lesson>/autograder/*.zip)")
    g.add_argument("submissions", nargs="+", help="submitted .ipynb files")
    g.add_argument("--csv", help="also write the grades to this CSV file")
    args = parser.parse_args(argv)
    if args.command == "build":
        for name, built in build_all(args.out, args.lessons).items():
            print(f"{name}: student {built.student}, instructor {built.instructor}, autograder {built.autograder}")
        return 0
    rows = []
    for sub_path in args.submissions:
        g_ = grade(args.autograder, sub_path)
        rows.append((sub_path, g_.score, g_.max_score))
        print(f"{sub_path}: {g_.score:g} / {g_.max_score:g}")
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([("submission", "score", "max_score"), *rows])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
