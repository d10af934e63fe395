"""The package's architecture as a test: layers in one order, no import circle, no upward import, small modules,
subpackages without re-exports (docs/architecture.md draws the same picture)."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "shadowlab"
# lowest first: a module may import from its own layer and the layers before it, never from a later one
LAYERS = ["base", "certify", "defenses", "shadow", "experiments", "lab", "bench", "cli"]
MAX_LINES = 450   # a longer module says why in its docstring ("Why this module is long: ...")


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    if module == "shadowlab.__main__":
        return LAYERS.index("cli")
    return LAYERS.index(parts[1]) if len(parts) > 2 else 0


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the shadowlab modules it imports (anywhere in the file, lazy imports included)."""
    graph = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for target in [base, *(f"{base}.{a.name}" for a in node.names)]:
                    if target in mods and target != name and target != "shadowlab":
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in mods and a.name != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


MODS = modules()
GRAPH = imports(MODS)


def test_no_import_circle():
    assert cycles(GRAPH) == []


def test_no_upward_import():
    upward = [f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
              for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_every_subpackage_is_a_layer_and_its_init_holds_only_a_docstring():
    for path in PKG.rglob("__init__.py"):
        if path.parent != PKG:
            assert path.relative_to(PKG).parts[0] in LAYERS, path
        body = ast.parse(path.read_text()).body
        assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), \
            f"{path} needs a docstring saying what the subpackage holds"
        assert len(body) == 1, f"{path} re-exports or runs code: import from the defining module instead"


@pytest.mark.parametrize("name", sorted(MODS))
def test_modules_are_small_or_say_why(name):
    text = MODS[name].read_text()
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or "Why this module is long:" in doc, f"{name}: {lines} lines"


def test_the_layer_checker_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a made-up graph with both faults is caught."""
    fake = {"shadowlab.certify.a": {"shadowlab.lab.b"}, "shadowlab.lab.b": {"shadowlab.certify.a"}}
    assert cycles(fake) == [["shadowlab.certify.a", "shadowlab.lab.b"]]
    assert layer("shadowlab.lab.b") > layer("shadowlab.certify.a") > layer("shadowlab.models")


def test_pyproject_installs_every_subpackage():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+

    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert listed == found
