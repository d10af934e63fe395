"""shadowlab.lab.assignments: the otter-grader master of every lesson, the student and instructor builds, and grading.

The grading test executes lesson 01 twice with ``otter run`` (worked solutions: full marks; untouched student
notebook: 0), about two minutes of CPU on 2 cores: marked ``slow``.
"""

import json

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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return assignments.assign("01_adversarial_examples", tmp_path_factory.mktemp("assignments"))


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
def test_grading_gives_solutions_full_marks_and_an_untouched_notebook_zero(built, tmp_path):
    solved = assignments.grade(built.autograder, built.instructor, tmp_path / "solved")
    assert (solved.score, solved.max_score) == (5.0, 5.0), solved.tests
    untouched = assignments.grade(built.autograder, built.student, tmp_path / "untouched")
    assert (untouched.score, untouched.max_score) == (0.0, 5.0), untouched.tests
    assert all("no answer yet" in t["output"] for t in untouched.tests)


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
