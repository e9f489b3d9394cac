"""The packages' import layering (issue 24): data < models < toe < methods < launcher.

Every module's imports are read with ``ast`` (module level and inside functions, relative ones resolved), and:

- no import points up a layer (``models`` importing ``methods``, say), at any level;
- no import cycle among modules at module level (what runs on import);
- no cycle either when the imports inside functions count, but for the known ones listed below;
- test modules import no other test module (shared code: ``tests/helpers.py``, fixtures: ``tests/conftest.py``);
- nothing outside tests/ edits ``sys.path`` (the package is installed; bench scripts import their siblings).

bench/, examples/ and tests/ may import anything. A known exception names the import to remove; once it is gone the test
says so, and the entry goes too.
"""

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("data", "models", "toe", "methods", "launcher")  # lowest first: a module imports its own layer or lower
RANK = {package: rank for rank, package in enumerate(LAYERS)}

# (importer, imported) pairs allowed to point up a layer: none at present
KNOWN_UPWARD: frozenset = frozenset()

# cycles that only function-level imports close, as the set of their modules
KNOWN_CYCLES: frozenset = frozenset()  # cycles through imports inside functions, each with its reason


class Import(NamedTuple):
    importer: str
    target: str
    line: int
    module_level: bool  # runs when the importer is imported (not inside a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.importer} -> {self.target} ({module_path(self.importer)}:{self.line})"


def module_names() -> dict[str, Path]:
    names = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


MODULES = module_names()


def module_path(name: str) -> str:
    return str(MODULES[name].relative_to(ROOT))


def known(name: str) -> str:
    """The longest prefix of ``name`` that is one of the project's modules or packages."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path) -> list[Import]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in child.names]
            else:
                inner = (
                    module_level
                    and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                    and not (isinstance(child, ast.If) and _type_checking(child))
                )
                visit(child, inner)
                continue
            for target in targets:
                if target.split(".")[0] in RANK and known(target) != name:
                    found.append(Import(name, known(target), child.lineno, module_level))

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


IMPORTS = [i for name, path in MODULES.items() for i in imports_of(name, path)]


def cycles(edges: list[Import]) -> list[frozenset]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                other = stack.pop()
                component.add(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def describe(component: frozenset, edges: list[Import]) -> str:
    return "; ".join(str(e) for e in edges if e.importer in component and e.target in component)


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}: add them to LAYERS"
    assert len(MODULES) > 50 and len(IMPORTS) > 100, "the parser found too little: is ROOT right?"


def test_no_import_points_up_a_layer():
    upward = [i for i in IMPORTS if RANK[i.target.split(".")[0]] > RANK[i.importer.split(".")[0]]]
    new = [str(i) for i in upward if (i.importer, i.target) not in KNOWN_UPWARD]
    assert not new, f"imports from a lower layer to a higher one ({' < '.join(LAYERS)}):\n" + "\n".join(new)
    gone = KNOWN_UPWARD - {(i.importer, i.target) for i in upward}
    assert not gone, f"known upward imports no longer there: remove them from KNOWN_UPWARD: {sorted(gone)}"


def test_no_import_cycle_at_module_level():
    runtime = [i for i in IMPORTS if i.module_level]
    found = cycles(runtime)
    assert not found, "module-level import cycles:\n" + "\n".join(describe(c, runtime) for c in found)


def test_no_import_cycle_through_function_level_imports_but_the_known_ones():
    found = cycles(IMPORTS)
    new = [describe(c, IMPORTS) for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles (counting the imports inside functions):\n" + "\n".join(new)
    gone = KNOWN_CYCLES - set(found)
    assert not gone, f"known cycles no longer there: remove them from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


def test_the_parser_sees_function_level_and_relative_imports():
    by_importer = {(i.importer, i.target): i for i in IMPORTS}
    relative = by_importer[("data.stream", "data.plan")]  # `from .plan import ...` at the top of data/stream.py
    assert relative.module_level
    inner = by_importer[("data.stream", "data.token_labels")]  # inside build_train_stream
    assert not inner.module_level
    assert not by_importer[("toe.schedule", "models.cost")].module_level, "under TYPE_CHECKING"


def test_test_modules_import_no_other_test_module():
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                stem = name.removeprefix("tests.").split(".")[0]
                if stem in local and (stem.startswith("test_") or stem == "conftest"):
                    bad.append(f"tests/{path.name}:{node.lineno} imports {name}")
    assert not bad, "test modules importing test modules (move the shared code to tests/helpers.py):\n" + "\n".join(bad)


def test_nothing_outside_tests_edits_sys_path():
    bad = []
    for path in sorted(p for top in (*LAYERS, "bench", "examples") for p in (ROOT / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
                and not isinstance(getattr(node, "ctx", None), ast.Load)
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} assigns sys.path")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append", "extend")
                and ast.unparse(node.func.value) == "sys.path"
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "sys.path edits (the package is installed; run bench scripts as python bench/NAME.py):\n" + "\n".join(
        bad
    )
