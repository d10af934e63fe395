"""The package's architecture as a test: layers in one order, no import circle, no upward import, small modules,
subpackages without re-exports, imports at the top of a module unless a comment says why (docs/architecture.md draws
the same picture)."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "shadowlab"
# lowest first: a module may import from its own layer and the layers before it, never from a later one
LAYERS = ["base", "certify", "defenses", "shadow", "experiments", "lab", "bench", "cli"]
MAX_LINES = 450   # a longer module says why in its docstring ("Why this module is long: ...")
# why an import may sit inside a function instead of at the top of its module
LAZY_REASONS = ("optional dependency", "start-up cost", "import cycle")


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package folder ``root`` (a package by the name of its
    ``__init__``'s folder: ``shadowlab/cli/__init__.py`` is ``shadowlab.cli``)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer(module: str) -> int:
    """Index in LAYERS of a dotted module name: its first subpackage's layer (the subpackage itself included, so
    ``shadowlab.cli`` is in cli), ``__main__`` in cli, every other module directly under the package in base."""
    parts = module.split(".")
    if parts[1:] == ["__main__"]:
        return LAYERS.index("cli")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else 0


def _resolve(name: str, level: int, package: str) -> str:
    """The absolute dotted name of ``from <level dots><name>`` written in ``package``."""
    if not level:
        return name
    up = package.split(".")[:len(package.split(".")) - level + 1]
    return ".".join(up + ([name] if name else []))


def _import_module_target(node: ast.Call, package: str) -> str | None:
    """The module named by ``importlib.import_module("...")``, ``import_module("...", package)`` or
    ``__import__("...")`` with a string literal (an f-string counts by its literal start: the package it names
    up to the last full dot); None for any other call."""
    func = node.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.JoinedStr):
        head = arg.values[0] if arg.values else None
        if not (isinstance(head, ast.Constant) and isinstance(head.value, str) and "." in head.value):
            return None
        name = head.value.rsplit(".", 1)[0]
    elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        name = arg.value
    else:
        return None
    level = len(name) - len(name.lstrip("."))
    if level and called == "import_module":
        anchor = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords
                                                                if k.arg == "package"), None)
        package = anchor.value if isinstance(anchor, ast.Constant) and isinstance(anchor.value, str) else package
    return _resolve(name.lstrip("."), level, package)


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package at ``root`` it imports, anywhere in the file (lazy imports included):
    ``import a.b``, ``from a import b`` (b a module or a subpackage: ``from shadowlab import cli`` imports
    ``shadowlab.cli``), relative imports, and ``importlib.import_module`` / ``__import__`` of a string literal.
    The package's own ``__init__`` (the root name) is left out: it holds only its docstring."""
    mods = modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, package)
                targets += [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.Call) and (target := _import_module_target(node, package)):
                # the longest module the string names (an f-string's start may stop inside a module's name)
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                targets.append(target)
        graph[name].update(t for t in targets if t in mods and t != name and t != root.name)
    return graph


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a later layer, as "a (layer) imports b (layer)"."""
    return sorted(f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
                  for a, targets in graph.items() for b in targets if layer(b) > layer(a))


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


def unexplained_lazy_imports(root: Path) -> list[str]:
    """``path:line: statement`` (path from the package's parent folder) of every import inside a function of the
    package at ``root`` (at any depth: a nested block or function counts) that does not say why it is there: a comment
    naming one of LAZY_REASONS on the statement's own lines, on the line right above it, or right above the run of
    imports it belongs to (one comment for ``import a`` / ``from a.b import c`` on consecutive lines)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        lazy = {node.lineno: node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
        starts = {line: node.lineno for node in lazy.values() for line in range(node.lineno, node.end_lineno + 1)}

        def says_why(text: str) -> bool:
            return "#" in text and any(r in text.split("#", 1)[1] for r in LAZY_REASONS)

        for first, node in sorted(lazy.items()):
            above = first - 1
            while above in starts:                      # up past the imports of the same run
                above = starts[above] - 1
            own = lines[first - 1:node.end_lineno]
            if not (any(says_why(t) for t in own) or says_why(lines[first - 2] if first > 1 else "")
                    or (above >= 1 and lines[above - 1].lstrip().startswith("#") and says_why(lines[above - 1]))):
                out.append(f"{path.relative_to(root.parent)}:{first}: {lines[first - 1].strip()}")
    return out


MODS = modules(PKG)
GRAPH = imports(PKG)


def test_no_import_circle():
    assert cycles(GRAPH) == []


def test_no_upward_import():
    assert upward(GRAPH) == []


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


FAKE = {  # a small package with every fault the checks look for, written to disk and read by the real parser
    "__init__.py": '"""Fake."""',
    "models.py": "from shadowlab import cli\n",                                  # base -> cli, by the subpackage
    "data.py": "from . import lab as the_lab\n",                                 # base -> lab, relative
    "validate.py": "import shadowlab\nfrom shadowlab import models\n",            # base -> base: allowed
    "cli/__init__.py": '"""CLI."""',
    "cli/main.py": "",
    "certify/__init__.py": '"""Certificates."""',
    "certify/a.py": "import importlib\n\n\ndef f():\n    return importlib.import_module('shadowlab.lab.b')\n",
    "certify/c.py": "from importlib import import_module\n\nX = import_module('.b', package='shadowlab.lab')\n",
    "defenses/__init__.py": '"""Defenses."""',
    "defenses/d.py": "def f(n):\n    return __import__(f'shadowlab.bench.run{n}')\n",  # an f-string: its package
    "lab/__init__.py": '"""Lab."""',
    "lab/b.py": "from shadowlab.certify import a\n",                              # down, and a circle with a
    "bench/__init__.py": '"""Bench."""',
}


def test_the_layer_checker_sees_every_fault_of_a_package_on_disk(tmp_path):
    """The checks above can fail: the real parser, on a fake package written to tmp_path, finds each upward import
    (``from shadowlab import <subpackage>``, relative, ``importlib.import_module``, ``__import__`` of an f-string)
    and the circle."""
    root = tmp_path / "shadowlab"
    for rel, text in FAKE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = imports(root)
    assert set(modules(root)) == {"shadowlab", *(f"shadowlab.{r[:-3].removesuffix('/__init__').replace('/', '.')}"
                                                 for r in FAKE if r != "__init__.py")}
    assert upward(graph) == [
        "shadowlab.certify.a (certify) imports shadowlab.lab.b (lab)",
        "shadowlab.certify.c (certify) imports shadowlab.lab.b (lab)",
        "shadowlab.data (base) imports shadowlab.lab (lab)",
        "shadowlab.defenses.d (defenses) imports shadowlab.bench (bench)",
        "shadowlab.models (base) imports shadowlab.cli (cli)"]
    assert graph["shadowlab.validate"] == {"shadowlab.models"}
    assert cycles(graph) == [["shadowlab.certify.a", "shadowlab.lab.b"]]
    assert layer("shadowlab.cli") == layer("shadowlab.cli.main") == layer("shadowlab.__main__") == LAYERS.index("cli")


def test_every_function_level_import_says_why():
    """An import belongs at the top of its module; one inside a function carries a one-line reason (LAZY_REASONS:
    an optional dependency, the start-up cost of a heavy module, an import cycle) on its line or the line above."""
    offenders = unexplained_lazy_imports(PKG)
    assert not offenders, ("imports inside a function without a reason (move them to the top of the module, or add "
                           f"a comment naming one of {LAZY_REASONS}):\n" + "\n".join(offenders))


def test_the_lazy_import_checker_sees_an_import_without_a_reason(tmp_path):
    root = tmp_path / "shadowlab"
    root.mkdir()
    (root / "m.py").write_text(
        "import json\n\n\n"
        "def a():\n    import csv\n    return csv\n\n\n"                                   # line 5: no reason
        "def b():\n    import ipywidgets  # optional dependency (ipywidgets)\n    return ipywidgets\n\n\n"
        "def c():\n    # start-up cost (matplotlib)\n    import matplotlib\n    import matplotlib.pyplot\n"
        "    return matplotlib\n\n\n"
        "async def d():\n    if True:\n        # a comment that gives no reason\n        from os import path\n"
        "    return path\n")                                                               # line 24: no reason
    assert unexplained_lazy_imports(root) == ["shadowlab/m.py:5: import csv",
                                              "shadowlab/m.py:24: from os import path"]


def test_pyproject_installs_every_subpackage():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+

    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert listed == found
