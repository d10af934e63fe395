"""The seven lessons as committed: clean (no outputs, no execution counts, no stray metadata), one papermill
`parameters` cell with CPU-sized literal defaults, learning goals first, exercises with check cells, a summary
last, thin code (except up to three cells tagged `from-scratch` per lesson, each writing one core algorithm out and
asserting it equals the shadowlab function). Each lesson has a worked-solutions notebook under notebooks/solutions/ that
asserts every exercise's checker accepts its answer. Slide metadata (RISE / nbconvert slides) is allowed.

Executing them is `pytest --nbval-lax --nbval-current-env notebooks/`; cells marked `# NBVAL_CHECK_OUTPUT` carry the
text they must print (with execution count 1, or nbval skips them), the only output a committed notebook may hold.
"""

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
LESSONS = ("01_adversarial_examples", "02_pgd", "03_certified_defenses", "04_shadow_attack", "05_ablations",
           "06_reproduce_paper", "07_certificates_mislead")
CHECK = "# NBVAL_CHECK_OUTPUT"
SOLUTIONS = tuple(f"solutions/{name}" for name in LESSONS)
SCRATCH = "from-scratch"
TAGS = {"parameters", SCRATCH}


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_lessons_are_there_in_teaching_order():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(LESSONS)
    assert sorted(f"solutions/{p.stem}" for p in (NOTEBOOK_DIR / "solutions").glob("*.ipynb")) == list(SOLUTIONS)


@pytest.mark.parametrize("name", LESSONS + SOLUTIONS)
def test_committed_clean(name):
    nb = load(name)
    nbformat.validate(nb)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, f"stray notebook metadata: {sorted(nb.metadata)}"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        assert set(cell.metadata) <= {"tags", "slideshow"}, f"cell {cell.id}: stray metadata {sorted(cell.metadata)}"
        assert set(cell.metadata.get("tags", [])) <= TAGS, f"cell {cell.id}: tags {cell.metadata['tags']}"
        if "slideshow" in cell.metadata:
            assert cell.metadata["slideshow"].get("slide_type") in {"slide", "subslide", "fragment", "skip", "notes",
                                                                     "-"}
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


@pytest.mark.parametrize("name", LESSONS + SOLUTIONS)
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
def test_learning_goals_first_exercises_with_checks_and_a_summary_last(name):
    nb = load(name)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and first.source.startswith("# Lesson")
    assert "**Learning goals.**" in first.source
    assert last.cell_type == "markdown" and last.source.startswith("## Summary") and len(last.source) < 1500
    index = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## Exercises" in c.source)
    exercises = nb.cells[index].source
    numbered = [k for k in range(1, 10) if f"\n{k}. " in exercises]
    assert numbered == list(range(1, len(numbered) + 1)) and len(numbered) >= 5
    checks = [c for c in nb.cells[index + 1:-1] if c.cell_type == "code"]
    lesson = name[:2]
    assert len(checks) == len(numbered) and all(f"check_{lesson}_{k}(" in c.source for k, c in enumerate(checks, 1)), \
        f"{name}: one check cell per exercise, in order, each calling exercises.check_{lesson}_<k>"
    for k, c in enumerate(checks, 1):
        assert f"check_{lesson}_{k}(answer" in c.source and c.source.startswith("answer = None"), c.source
    assert f"solutions/{name}.ipynb" in exercises, "the exercises cell must point to the worked solutions"
    assert any("$" in c.source for c in nb.cells if c.cell_type == "markdown"), "formulas in LaTeX expected"


@pytest.mark.parametrize("name", LESSONS)
def test_solutions_assert_every_exercise(name):
    lesson = name[:2]
    nb = load(f"solutions/{name}")
    source = "\n".join(c.source for c in code_cells(nb))
    n = len([k for k in range(1, 10) if f"check_{lesson}_{k}(" in "\n".join(c.source for c in code_cells(load(name)))])
    for k in range(1, n + 1):
        assert f"check_{lesson}_{k}(" in source, f"solutions/{name} does not solve exercise {k}"
    assert source.count("assert ") >= n, "every solution must assert its checker's verdict"


@pytest.mark.parametrize("name", LESSONS)
def test_from_scratch_cells_asserted_against_shadowlab(name):
    cells = [c for c in code_cells(load(name)) if SCRATCH in c.metadata.get("tags", [])]
    assert 1 <= len(cells) <= 3, f"{name}: {len(cells)} cells tagged {SCRATCH!r}"
    for cell in cells:
        source = cell.source
        assert source.startswith("# from scratch") and "assert " in source and len(source.splitlines()) <= 16


@pytest.mark.parametrize("name", LESSONS)
def test_thin_notebooks_call_into_shadowlab(name):
    nb = load(name)
    source = "\n".join(c.source for c in code_cells(nb) if SCRATCH not in c.metadata.get("tags", []))
    assert "from shadowlab" in source
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
    defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"{name} defines {defined}: reusable logic belongs in shadowlab (widgets.py / plots.py)"


def test_no_code_duplicated_across_notebooks():
    seen: dict[str, str] = {}
    for name in LESSONS:
        for cell in code_cells(load(name)):
            if "parameters" in cell.metadata.get("tags", []) or cell.source.startswith("answer = None"):
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


def _literals(source: str) -> dict:
    values: dict = {}
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign):
            value = ast.literal_eval(stmt.value)
            for target in stmt.targets:
                names = [target.id] if isinstance(target, ast.Name) else [e.id for e in target.elts]
                vals = [value] if isinstance(target, ast.Name) else list(value)
                values.update(zip(names, vals))
    return values


@pytest.mark.parametrize("name", LESSONS)
def test_documented_papermill_commands_inject_parameters_of_the_default_types(name, tmp_path, monkeypatch):
    """Every `papermill ...` command a lesson documents is run as written (with --prepare-only, so nothing executes):
    it must parse, and each injected value must have the type of the parameter's default (papermill's -p converts
    only numbers, booleans and None, so a list needs -y)."""
    import shlex

    from click.testing import CliRunner
    from papermill.cli import papermill

    nb = load(name)
    source = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source
    defaults = _literals(source)
    comments = {line.split("=")[0].strip(): line.split("#", 1)[1] for line in source.splitlines() if "#" in line}
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    commands = [part.split("`")[0] for part in text.split("`papermill ")[1:]]
    assert commands, f"{name} documents no papermill command"
    monkeypatch.chdir(NOTEBOOK_DIR.parent)
    for k, command in enumerate(commands):
        args = shlex.split(command)
        assert args[0] == f"notebooks/{name}.ipynb", command
        args[1] = str(tmp_path / f"out{k}.ipynb")
        result = CliRunner().invoke(papermill, [*args, "--prepare-only"])
        assert result.exit_code == 0, f"{command}: {result.output}"
        out = nbformat.read(args[1], as_version=4)
        injected = [c for c in out.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1, command
        values = _literals(injected[0].source)
        assert values, command
        for key, value in values.items():
            assert key in defaults, f"{command}: {key} is not a parameter of {name}"
            # None is a value of its own where the parameter's comment names it (e.g. "paper: None, no stop")
            optional = value is None and "None" in comments.get(key, "")
            assert type(value) is type(defaults[key]) or defaults[key] is None or optional, \
                f"{command}: {key} is injected as {value!r} ({type(value).__name__}), its default is " \
                f"{defaults[key]!r} ({type(defaults[key]).__name__})"
