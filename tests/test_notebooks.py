"""The six lessons as committed: clean (no outputs, no execution counts, no stray metadata), one papermill
`parameters` cell with CPU-sized literal defaults, learning goals first and exercises last, thin code.

Executing them is `pytest --nbval-lax --nbval-current-env notebooks/`; cells marked `# NBVAL_CHECK_OUTPUT` carry the
text they must print (with execution count 1, or nbval skips them), the only output a committed notebook may hold.
"""

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
LESSONS = ("01_adversarial_examples", "02_pgd", "03_certified_defenses", "04_shadow_attack", "05_ablations",
           "06_reproduce_paper")
CHECK = "# NBVAL_CHECK_OUTPUT"


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_six_lessons_are_there_in_teaching_order():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(LESSONS)


@pytest.mark.parametrize("name", LESSONS)
def test_committed_clean(name):
    nb = load(name)
    nbformat.validate(nb)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, f"stray notebook metadata: {sorted(nb.metadata)}"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        assert set(cell.metadata) <= {"tags"}, f"cell {cell.id}: stray metadata {sorted(cell.metadata)}"
        assert set(cell.metadata.get("tags", [])) <= {"parameters"}, f"cell {cell.id}: tags {cell.metadata['tags']}"
        if cell.cell_type != "code":
            assert "attachments" not in cell or not cell.attachments
            continue
        if CHECK in cell.source:
            # nbval compares these cells' printed text with the text stored here (and treats a cell without an
            # execution count as never run, so it gets count 1): nothing else may be stored
            assert cell.outputs, f"cell {cell.id} is marked {CHECK} but holds no expected output"
            assert cell.execution_count == 1
            for out in cell.outputs:
                assert out.output_type == "stream" and out.name == "stdout" and set(out) == {"output_type",
                                                                                           "name", "text"}
        else:
            assert cell.outputs == [], f"cell {cell.id} was committed with outputs"
            assert cell.execution_count is None, f"cell {cell.id} has execution_count {cell.execution_count}"


@pytest.mark.parametrize("name", LESSONS)
def test_one_parameters_cell_with_literal_cpu_defaults(name):
    nb = load(name)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'"
    cell = tagged[0]
    assert cell.cell_type == "code"
    assert cell is next(c for c in code_cells(nb)), "the parameters cell must be the first code cell"
    values = {}
    for stmt in ast.parse(cell.source).body:
        assert isinstance(stmt, ast.Assign) and all(isinstance(t, (ast.Name, ast.Tuple)) for t in stmt.targets), \
            f"{name}: parameters cell may only assign literals (papermill -p overrides them): {ast.unparse(stmt)}"
        value = ast.literal_eval(stmt.value)
        for target in stmt.targets:
            names = [target.id] if isinstance(target, ast.Name) else [e.id for e in target.elts]
            vals = [value] if isinstance(target, ast.Name) else list(value)
            values.update(zip(names, vals))
    assert values.get("DEVICE") == "auto", f"{name}: DEVICE must default to 'auto' (CUDA when available)"
    assert isinstance(values.get("SEED"), int)
    assert all(k.isupper() for k in values), "parameters are UPPER_CASE constants"


@pytest.mark.parametrize("name", LESSONS)
def test_learning_goals_first_and_exercises_last(name):
    nb = load(name)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and first.source.startswith("# Lesson")
    assert "**Learning goals.**" in first.source
    assert last.cell_type == "markdown" and "## Exercises" in last.source
    assert last.source.count("\n1. ") + last.source.count("\n2. ") >= 2
    assert any("$" in c.source for c in nb.cells if c.cell_type == "markdown"), "formulas in LaTeX expected"


@pytest.mark.parametrize("name", LESSONS)
def test_thin_notebooks_call_into_shadowlab(name):
    nb = load(name)
    source = "\n".join(c.source for c in code_cells(nb))
    assert "from shadowlab" in source
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
    defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"{name} defines {defined}: reusable logic belongs in shadowlab (widgets.py / plots.py)"


def test_no_code_duplicated_across_notebooks():
    seen: dict[str, str] = {}
    for name in LESSONS:
        for cell in code_cells(load(name)):
            if "parameters" in cell.metadata.get("tags", []):
                continue
            lines = [ln.strip() for ln in cell.source.splitlines() if ln.strip() and not ln.strip().startswith(
                ("import ", "from ", "#"))]
            for k in range(len(lines) - 3):                    # any four consecutive lines
                block = "\n".join(lines[k:k + 4])
                assert seen.setdefault(block, name) == name, f"duplicated in {seen[block]} and {name}:\n{block}"


def test_some_deterministic_output_is_checked_by_nbval():
    checked = [(name, c) for name in LESSONS for c in code_cells(load(name)) if CHECK in c.source]
    assert len(checked) >= 4
    for name, cell in checked:
        text = "".join(o.text for o in cell.outputs)
        assert "e-" not in text and not any(len(tok) > 12 and tok.replace(".", "").isdigit() for tok in text.split()), \
            f"{name} {cell.id}: checked output must not print full-precision floats: {text!r}"
