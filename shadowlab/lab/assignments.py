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

Both notebooks start with ``grader = Checks("<lesson>")`` in place of otter's ``otter.Notebook("<lesson>.ipynb")``
(which fails once a submission is renamed): its public checks say what they checked ("answered with the right
type"), never "All test cases passed". The student notebook also turns on student mode (``grading.student_mode``: no
expected answers), and ``student_package`` writes ``OUT/student-package/`` (and a zip): the student notebooks, a
copy of the package and its data marked as the students', and a README saying how to install it.

``grade`` runs ``otter run`` on a submitted notebook: it executes the submission top to bottom in this
environment (no Docker, no network) and returns the score (one point per exercise, all of it from the hidden test;
``Grade.by_exercise``, one CSV column per exercise from the CLI).
The public tests carry no points, so an untouched student notebook scores 0 and the worked solutions score full
marks (``tests/test_assignments.py`` grades both).

Why this module is long: the build, the notebooks' ``Checks``, the student package and grading all rest on the
same question names and test templates (``PUBLIC_TEST``, ``HIDDEN_TEST``, ``ex02_1``); kept together, a change of
one cannot drift from the others.
"""

from __future__ import annotations

import argparse
import ast
import csv
import html
import inspect
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
from shadowlab.lab.grading import STUDENT_MARKER
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
PUBLIC_SUCCESS = "exercise {ex}: answered with the right type (the check cell accepted the answer and its evidence)"
PUBLIC_FAILURE = "exercise {ex}: no answer yet, or the check cell raised an error: run it and read its message"
PUBLIC_TEST = '''""" # BEGIN TEST CONFIG
points: 0
success_message: "''' + PUBLIC_SUCCESS + '''"
failure_message: "''' + PUBLIC_FAILURE + '''"
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
    import nbformat  # optional dependency (nbformat)

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
    import nbformat  # optional dependency (nbformat)

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
    import nbformat  # optional dependency (nbformat)

    if name not in LESSONS:
        raise ValueError(f"name={name!r} must be one of {', '.join(LESSONS)}")
    # otter runs in a temporary folder: a relative ``out`` must mean the caller's folder, not that one
    target = Path(out).resolve() / name
    notebooks = Path(notebooks).resolve()
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        master = Path(tmp) / f"{name}.ipynb"
        nbformat.write(master_notebook(name, notebooks), master)
        done = subprocess.run([sys.executable, "-m", "otter", "assign", "--no-pdfs", str(master), str(target)],
                              capture_output=True, text=True, cwd=tmp)
    zips = sorted((target / "autograder").glob("*.zip"))
    if done.returncode or not zips:
        raise RuntimeError(f"otter assign wrote no autograder zip into {target / 'autograder'} (exit code "
                           f"{done.returncode}): {done.stderr.strip()[-2000:]}")
    built = Built(target / "student" / f"{name}.ipynb", target / "autograder" / f"{name}.ipynb", zips[-1])
    _set_up_checks(built.student, name, student=True)
    _set_up_checks(built.instructor, name, student=False)
    return built


INIT_CELL = re.compile(r"^\s*grader\s*=\s*otter\.Notebook\([^)]*\)\s*$", re.M)


def _set_up_checks(path: Path, name: str, student: bool) -> None:
    """Replace otter's first cell (``grader = otter.Notebook("<lesson>.ipynb")``, which fails once the notebook is
    renamed) by ``grader = Checks("<lesson>")``; in the student build, also turn on student mode (no key)."""
    import nbformat  # optional dependency (nbformat)

    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code" and INIT_CELL.search(c.source)), None)
    if cell is None:
        raise RuntimeError(f"{path}: otter's init cell (grader = otter.Notebook(...)) not found")
    lines = ["# the exercises' public checks; they work whatever this notebook's file name",
             "from shadowlab.lab.assignments import Checks", "", f'grader = Checks("{name}")']
    if student:
        lines += ["", "from shadowlab.lab.grading import student_mode", "",
                  "student_mode(True)   # the checkers give verdicts and hints, never the expected answers"]
    cell.source = "\n".join(lines)
    nbformat.write(nb, path)


def public_test_file(question: str) -> str:
    """Exercise ``question``'s public test as an otter test file (what ``otter assign`` writes from ``PUBLIC_TEST``)."""
    key = question.removeprefix("ex")
    ex = key.replace("_", ".")
    return (f'from otter.test_files import test_case\n\nOK_FORMAT = False\n\nname = "{question}"\npoints = 1\n\n'
            f'@test_case(points=0, hidden=False, success_message={PUBLIC_SUCCESS.format(ex=ex)!r}, '
            f'failure_message={PUBLIC_FAILURE.format(ex=ex)!r})\n'
            f"def test_answered_{key}(fb_{key}):\n"
            f"    assert fb_{key} is not None and fb_{key}.correct is not None, 'no answer yet'\n")


class PublicCheck:
    """What ``Checks.check`` returns: otter's result, shown as what the public test checked."""

    def __init__(self, question: str, result: Any):
        self.question, self.result = question, result
        self.exercise = question.removeprefix("ex").replace("_", ".")

    @property
    def passed(self) -> bool:
        r = self.result
        if r is None:
            return False
        return bool(getattr(r, "passed_all_public", getattr(r, "passed_all", False)))

    def __str__(self) -> str:
        if self.passed:
            return (f"exercise {self.exercise}: answered with the right type (the check cell accepted the answer and "
                    "its evidence); whether it is right is the check cell's verdict above, and the grade comes from "
                    "the hidden tests")
        return (f"exercise {self.exercise}: no answer yet, or the check cell raised an error: run it and read its "
                "message")

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return f"<p><strong>{html.escape(str(self))}</strong></p>"


class Checks:
    """The ``grader`` of a student or instructor notebook: ``grader.check("ex02_1")`` runs exercise 02.1's public
    test (``PUBLIC_TEST``) against the notebook's variables and says what it checked. The tests come from this
    module, not from the notebook file, so a renamed notebook still works; under ``otter run`` (grading) it runs
    the autograder's tests, hidden ones included, as ``otter.Notebook`` does."""

    def __init__(self, lesson: str):
        import otter  # optional dependency (otter-grader)

        self.lesson = lesson
        if otter.Notebook._grading_mode:
            self._notebook = otter.Notebook()
            self._dir = None
        else:
            self._dir = Path(tempfile.mkdtemp(prefix=f"shadowlab-{lesson}-checks-"))
            self._notebook = otter.Notebook(tests_dir=str(self._dir))

    def check(self, question: str, global_env: dict[str, Any] | None = None) -> PublicCheck:
        if not re.fullmatch(r"ex\d\d_\d+", question):
            raise ValueError(f"question={question!r} must name an exercise, as 'ex02_1'")
        if global_env is None:
            global_env = inspect.currentframe().f_back.f_globals
        if self._dir is not None:
            (self._dir / f"{question}.py").write_text(public_test_file(question))
        return PublicCheck(question, self._notebook.check(question, global_env))


@dataclass
class Grade:
    """A graded submission: points, the maximum, and otter's per-exercise results."""

    score: float
    max_score: float
    tests: list[dict[str, Any]]

    @property
    def fraction(self) -> float:
        return self.score / self.max_score if self.max_score else 0.0

    @property
    def by_exercise(self) -> dict[str, float]:
        """{exercise id ("02.1"): points} in the notebook's order."""
        return {str(t["name"]).removeprefix("ex").replace("_", "."): float(t.get("score") or 0) for t in self.tests}


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
              lessons: Sequence[str] = LESSONS, package: bool = True) -> dict[str, Built]:
    """``assign`` every lesson of ``lessons`` into ``out``; with ``package``, then ``student_package`` of them."""
    built = {name: assign(name, out) for name in lessons}
    if package:
        student_package(out, lessons)
    return built


PACKAGE = "student-package"
# what the students' copy holds from the repository: the package, its data, how to install it; never notebooks/
PACKAGE_FILES = ("shadowlab", "data", "pyproject.toml", "requirements.txt", "LICENSE")
PACKAGE_README = """# shadowlab coursework: {lessons}

This folder is all a student needs: the exercise notebooks (`notebooks/`, without solutions) and the `shadowlab`
package with the data the lessons load (the committed CIFAR-10 test subset, the trained models and the committed
results). It holds no worked solutions, no hidden tests, and its checkers give verdicts and hints but never the
expected answers (the package is marked as the students' copy: `shadowlab/lab/STUDENT_BUILD`).

## Install (Python 3.10 or later, about 4 minutes from a warm pip cache)

```bash
python3 -m venv .venv
.venv/bin/pip install -r requirements.txt
.venv/bin/pip install --no-deps --no-build-isolation -e .    # editable: the lessons find data/ beside the package
.venv/bin/jupyter lab notebooks
```

On Windows use `.venv\\Scripts\\pip` and `.venv\\Scripts\\jupyter`. A GPU is not needed.

## Work and hand in

Open a notebook, run it top to bottom, and answer each exercise in its check cell (`answer = None`, and where asked
the runs the exercise names). The check cell says RIGHT or NOT YET RIGHT with a hint; the cell after it,
`grader.check("ex..")`, says whether your answer has the right type. Hand in the `.ipynb` file (any file name):
it is graded by running it again from the top, one point per exercise.
"""


def _repository_files(root: Path, top: str) -> list[Path]:
    """The files of ``top`` (a folder or file of the repository) that git tracks; without git, every file but caches."""
    done = subprocess.run(["git", "ls-files", "-z", top], cwd=root, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout:
        return [root / f for f in done.stdout.split("\0") if f and (root / f).is_file()]
    path = root / top
    if path.is_file():
        return [path]
    return [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
            and not {"cache", "cifar10"} & set(f.relative_to(root).parts[:2])]


def student_package(out: str | Path, lessons: Sequence[str] = LESSONS, root: Path = PROJECT_ROOT) -> Path:
    """``out/student-package/`` and ``out/student-package.zip``: the student builds of ``lessons`` (already in
    ``out/<lesson>/student/``) with a copy of the package and its data, marked as the students' (``STUDENT_MARKER``:
    checkers hide the key), and a README saying how to install it. No solutions, no hidden tests, no autograder."""
    out = Path(out).resolve()
    target = out / PACKAGE
    shutil.rmtree(target, ignore_errors=True)
    for top in PACKAGE_FILES:
        for f in _repository_files(root, top):
            dest = target / f.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    (target / STUDENT_MARKER.relative_to(root)).write_text("the students' copy: checkers give no expected answers\n")
    (target / "notebooks").mkdir()
    for name in lessons:
        student = out / name / "student" / f"{name}.ipynb"
        if not student.is_file():
            raise FileNotFoundError(f"{student} is missing: build the lesson first (assign({name!r}, {str(out)!r}))")
        shutil.copy2(student, target / "notebooks" / student.name)
    (target / "README.md").write_text(PACKAGE_README.format(lessons=", ".join(lessons)))
    shutil.make_archive(str(out / PACKAGE), "zip", root_dir=out, base_dir=PACKAGE)
    return target


def write_csv(rows: Sequence[tuple[str | Path, Grade]], path: str | Path) -> None:
    """One row per submission: its path, one column of points per exercise ("01.1", ...), the score and maximum."""
    exercises = list(dict.fromkeys(ex for _, g in rows for ex in g.by_exercise))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["submission", *exercises, "score", "max_score"])
        for submission, g in rows:
            w.writerow([str(submission), *(f"{g.by_exercise.get(ex, 0.0):g}" for ex in exercises), f"{g.score:g}",
                        f"{g.max_score:g}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadowlab.lab.assignments", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="student and instructor builds of the lessons")
    b.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "assignments"))
    b.add_argument("--lessons", nargs="*", default=list(LESSONS))
    b.add_argument("--no-package", action="store_true", help=f"skip OUT/{PACKAGE}/ (the students' self-contained "
                   "copy: their notebooks, the package and its data, no solutions)")
    g = sub.add_parser("grade", help="grade submitted notebooks of one lesson")
    g.add_argument("autograder", help="the lesson's autograder zip (OUT/<lesson>/autograder/*.zip)")
    g.add_argument("submissions", nargs="+", help="submitted .ipynb files")
    g.add_argument("--csv", help="also write the grades to this CSV file")
    args = parser.parse_args(argv)
    if args.command == "build":
        for name, built in build_all(args.out, args.lessons, package=not args.no_package).items():
            print(f"{name}: student {built.student}, instructor {built.instructor}, autograder {built.autograder}")
        if not args.no_package:
            print(f"hand out: {Path(args.out).resolve() / PACKAGE}.zip (see its README.md)")
        return 0
    rows = []
    for sub_path in args.submissions:
        g_ = grade(args.autograder, sub_path)
        rows.append((sub_path, g_))
        parts = ", ".join(f"{ex} {pts:g}" for ex, pts in g_.by_exercise.items())
        print(f"{sub_path}: {g_.score:g} / {g_.max_score:g} ({parts})")
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
