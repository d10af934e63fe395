"""shadowlab.lab.assignments: the otter-grader master of every lesson, the student and instructor builds, and grading.

The builds come from the CLI run as README says, from another folder with a relative ``--out``. The grading test
executes lesson 01 twice with ``otter run`` through the CLI (a renamed copy of the worked solutions: full marks;
the untouched student notebook: 0), about two minutes of CPU on 2 cores: marked ``slow``.
"""

import json
import os
import shutil
import subprocess
import sys

import nbformat
import pytest

from shadowlab.lab import assignments
from shadowlab.lab.site import LESSONS


@pytest.mark.parametrize("name", LESSONS)
def test_master_has_one_question_per_check_cell(name):
    lesson = nbformat.read(assignments.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    checks = [assignments.exercise_id(c.source) for c in lesson.cells if c.cell_type == "code"
              and assignments.exercise_id(c.source)]
    master = assignments.master_notebook(name)
    questions = [c.source.split("name: ex")[1].split("\n")[0] for c in master.cells
                 if c.cell_type == "raw" and c.source.startswith("# BEGIN QUESTION")]
    assert questions == [e.replace(".", "_") for e in checks] and len(checks) >= 5
    # the master keeps every other lesson cell, and the handout no longer points at the solutions
    assert sum(c.cell_type != "raw" for c in master.cells) == len(lesson.cells) + 3 * len(checks)
    assert not any("notebooks/solutions/" in c.source for c in master.cells if c.cell_type == "markdown")
    # each question's solution cell: the worked code (its own answer name), the lesson's prompt, the checker's verdict
    for ex in checks:
        key = ex.replace(".", "_")
        cell = next(c.source for c in master.cells if c.cell_type == "code" and f"fb_{key} = " in c.source)
        assert cell.startswith("# BEGIN SOLUTION NO PROMPT") and f"answer_{key} = None" in cell
        solution = cell.split("# END SOLUTION")[0]
        assert f"answer_{key} =" in solution and "answer =" not in solution and "assert fb.correct" not in solution


def test_exercises_need_a_worked_solution(tmp_path):
    lesson = nbformat.read(assignments.NOTEBOOKS / "01_adversarial_examples.ipynb", as_version=4)
    sol = nbformat.read(assignments.NOTEBOOKS / "solutions" / "01_adversarial_examples.ipynb", as_version=4)
    sol.cells = [c for c in sol.cells if "check_01_2" not in c.source]
    (tmp_path / "solutions").mkdir()
    nbformat.write(lesson, tmp_path / "01_adversarial_examples.ipynb")
    nbformat.write(sol, tmp_path / "solutions" / "01_adversarial_examples.ipynb")
    with pytest.raises(ValueError, match="01.2 has a check cell but no worked solution"):
        assignments.master_notebook("01_adversarial_examples", tmp_path)


def test_assign_rejects_unknown_lesson(tmp_path):
    with pytest.raises(ValueError, match="name='08_nope' must be one of"):
        assignments.assign("08_nope", tmp_path)


def test_grade_rejects_a_missing_submission(tmp_path):
    with pytest.raises(ValueError, match="submission=.* must be an existing .ipynb file"):
        assignments.grade(tmp_path / "a.zip", tmp_path / "missing.ipynb")


LESSON = "01_adversarial_examples"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Lesson 01 built as README says (``python -m shadowlab.lab.assignments build``), from another folder and with a
    relative ``--out``: otter runs in a temporary folder, which once swallowed the builds (issue 43)."""
    cwd = tmp_path_factory.mktemp("lecturer")
    done = subprocess.run([sys.executable, "-m", "shadowlab.lab.assignments", "build", "--out", "rel/assignments",
                           "--lessons", LESSON], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = cwd / "rel" / "assignments"
    zips = sorted((out / LESSON / "autograder").glob("*.zip"))
    assert len(zips) == 1 and "hand out:" in done.stdout
    return assignments.Built(out / LESSON / "student" / f"{LESSON}.ipynb", out / LESSON / "autograder" /
                             f"{LESSON}.ipynb", zips[0])


def test_the_student_build_turns_on_student_mode_and_needs_no_file_name(built):
    student = nbformat.read(built.student, as_version=4)
    instructor = nbformat.read(built.instructor, as_version=4)
    for nb in (student, instructor):
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "otter.Notebook(" not in code and f'grader = Checks("{LESSON}")' in nb.cells[0].source
    assert "student_mode(True)" in student.cells[0].source and "student_mode" not in instructor.cells[0].source


def test_the_student_package_is_self_contained_and_carries_no_key(built):
    package = built.student.parents[2] / assignments.PACKAGE
    assert (package.parent / f"{assignments.PACKAGE}.zip").is_file()
    files = {str(f.relative_to(package)) for f in package.rglob("*") if f.is_file()}
    assert f"notebooks/{LESSON}.ipynb" in files and "shadowlab/lab/STUDENT_BUILD" in files
    assert "data/cifar10_test_subset.npz" in files and any(f.startswith("data/models/") for f in files)
    assert not any("solutions" in f or f.startswith("tests/") or f.endswith(".zip") for f in files)
    readme = (package / "README.md").read_text()
    assert "pip install -r requirements.txt" in readme and "pip install --no-deps --no-build-isolation -e ." in readme
    # the package's own copy of shadowlab hides the key, whatever the notebook does, and finds its data
    probe = ("from shadowlab.lab.grading import student_mode; from shadowlab.data import PROJECT_ROOT; "
             "from shadowlab.lab.exercises import lesson06; fb = lesson06.check_06_1((0.0, 0.0, 0)); "
             "print(student_mode(), PROJECT_ROOT, fb.expected)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=package, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(package)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", str(package.resolve()), "None"]


def test_public_checks_say_what_they_checked(tmp_path, monkeypatch):
    from shadowlab.lab.grading import Feedback

    monkeypatch.chdir(tmp_path)             # no notebook here: the checks do not need its file
    grader = assignments.Checks(LESSON)
    result = grader.check("ex01_1", {"fb_01_1": None})          # a notebook's globals, as otter reads them
    assert not result.passed and "no answer yet" in str(result)
    result = grader.check("ex01_1", {"fb_01_1": Feedback("01.1", False, "wrong")})
    assert result.passed and "answered with the right type" in str(result) and "passed" not in str(result)
    assert "right type" in result._repr_html_()
    with pytest.raises(ValueError, match="must name an exercise"):
        grader.check("q1")


def test_the_grade_csv_has_one_column_per_exercise(tmp_path):
    tests = lambda points: [{"name": f"ex01_{k + 1}", "score": p, "max_score": 1.0} for k, p in enumerate(points)]
    rows = [("a.ipynb", assignments.Grade(2.0, 3.0, tests([1.0, 0.0, 1.0]))),
            ("b.ipynb", assignments.Grade(0.0, 3.0, tests([0.0, 0.0, 0.0])))]
    assert rows[0][1].by_exercise == {"01.1": 1.0, "01.2": 0.0, "01.3": 1.0}
    assignments.write_csv(rows, tmp_path / "grades.csv")
    assert (tmp_path / "grades.csv").read_text().splitlines() == [
        "submission,01.1,01.2,01.3,score,max_score", "a.ipynb,1,0,1,2,3", "b.ipynb,0,0,0,0,3"]


def test_student_build_has_no_solutions_and_no_hidden_tests(built):
    student = nbformat.read(built.student, as_version=4)
    instructor = nbformat.read(built.instructor, as_version=4)
    code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    assert "BEGIN SOLUTION" not in code and "BEGIN PROMPT" not in code
    assert "accuracy_vs_eps(model, x, y, [e / 255 for e in grid]" not in code     # exercise 1's worked solution
    assert code.count("= None   #") >= 5 and code.count('grader.check("ex01_') == 5
    public = json.dumps(student.metadata["otter"]["tests"])
    hidden = json.dumps(instructor.metadata["otter"]["tests"])
    assert "test_answered_01_1" in public and "test_right_01_1" not in public
    assert "test_right_01_1" in hidden and "hidden=True" in hidden
    assert "accuracy_vs_eps(model, x, y, [e / 255 for e in grid]" in "\n".join(c.source for c in instructor.cells)


@pytest.mark.slow
def test_grading_gives_solutions_full_marks_and_an_untouched_notebook_zero(built, tmp_path, capsys):
    """Through the CLI as README says, on a renamed copy of the worked solutions and the untouched handout: the
    grade of each exercise, on screen and in the CSV."""
    renamed = tmp_path / "submissions" / "Jane Doe lesson 1.ipynb"
    renamed.parent.mkdir()
    shutil.copy(built.instructor, renamed)
    untouched = tmp_path / "submissions" / "untouched.ipynb"
    shutil.copy(built.student, untouched)
    assert assignments.main(["grade", str(built.autograder), str(renamed), str(untouched), "--csv",
                             str(tmp_path / "grades.csv")]) == 0
    shown = capsys.readouterr().out
    assert "lesson 1.ipynb: 5 / 5 (01.1 1, 01.2 1, 01.3 1, 01.4 1, 01.5 1)" in shown
    assert "untouched.ipynb: 0 / 5 (01.1 0, 01.2 0, 01.3 0, 01.4 0, 01.5 0)" in shown
    lines = (tmp_path / "grades.csv").read_text().splitlines()
    assert lines[0] == "submission,01.1,01.2,01.3,01.4,01.5,score,max_score"
    assert lines[1].endswith("lesson 1.ipynb,1,1,1,1,1,5,5") and lines[2].endswith("untouched.ipynb,0,0,0,0,0,0,5")


def _names(source: str, ctx: type) -> set[str]:
    import ast

    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


# reassignments a solution makes on purpose: the later exercises are judged on the run it makes
REASSIGNED = {"06_reproduce_paper": {"t1"}}   # 06.2 reruns Table 1 in both channel modes; 06.3 and 06.5 read it too


@pytest.mark.parametrize("name", LESSONS)
def test_no_worked_solution_changes_what_a_later_check_reads(name):
    """In the instructor build each worked solution runs inside the lesson, before its check cell: one that reassigns
    a name the lesson defined and a later exercise's check reads changes that later verdict (solution 03.4 reloaded
    the lesson's cmodel; the same kind of overwrite, of eps8, once graded lesson 03 at 5/6). A solution may rebuild
    what its own check reads: solutions are standalone notebooks, and their own grading covers that."""
    import ast

    lesson = nbformat.read(assignments.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    defined = set().union(*(_names(c.source, ast.Store) for c in lesson.cells
                            if c.cell_type == "code" and not assignments.exercise_id(c.source)))
    exercises, _ = assignments.exercises_of(name)
    for i, ex in enumerate(exercises):
        later = set().union(set(), *(_names(e.check_cell, ast.Load) for e in exercises[i + 1:]))
        clash = (_names(ex.solution, ast.Store) & defined & later) - REASSIGNED.get(name, set())
        assert not clash, f"solution {ex.id} reassigns {sorted(clash)}: the lesson defines it, a later check reads it"


def test_the_overwrite_check_sees_a_clash():
    import ast

    solution, later_check = "cmodel, cmeta = load(name)", "check_03_5(answer, cmodel, train_eps)"
    assert _names(solution, ast.Store) & {"cmodel", "train_eps"} & _names(later_check, ast.Load) == {"cmodel"}
