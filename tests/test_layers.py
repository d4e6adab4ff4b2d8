"""The package's layers, read from the source (ast; nothing is imported): no import cycles, and no
module imports from a layer above its own.

Every ``import`` counts, also those inside functions: a lazy import hides a cycle from Python,
not from the design. ``docs/architecture.md`` draws the same layers in the same order (checked below).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

SRC = ROOT / "src"

#: bottom first. A module may import modules of its own layer and of the layers below. A layer lists
#: packages (``serengeti.io`` covers ``serengeti.io.*``) and single modules; ``serengeti`` is the
#: package's ``__init__`` (the public API) only.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("serengeti.errors", "serengeti.registry", "serengeti.config_resolvers", "serengeti.runtime",
              "serengeti.config_catalog")),
    ("io", ("serengeti.io",)),
    ("ops", ("serengeti.ops",)),
    ("mixers", ("serengeti.mixers",)),
    ("data", ("serengeti.data",)),
    ("models", ("serengeti.models",)),
    ("training", ("serengeti.training",)),
    ("evaluate", ("serengeti.evaluate",)),
    ("entry", ("serengeti", "serengeti.report", "serengeti.convert")),
)


def module_names(src: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` under ``src/serengeti`` (packages by their ``__init__``)."""
    names = {}
    for path in sorted((src / "serengeti").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The serengeti modules that ``name`` imports anywhere in its file.

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module, else of ``a.b``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    files = module_names(src)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the most specific entry covering ``module``."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            covers = module == entry or (entry != "serengeti" and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = i, len(entry)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name} "
                             "and to the diagram in docs/architecture.md")
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a (layer) imports b (higher layer)"`` for every import that goes up."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                found.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_from_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_the_checks_see_lazy_relative_and_upward_imports(tmp_path):
    """The graph and both checks on a planted package: a lazy import inside a function, a relative
    import, a cycle through them and an import from a higher layer are all found."""
    pkg = tmp_path / "serengeti"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("def f():\n    from serengeti.training.run import run\n")
    (pkg / "ops" / "b.py").write_text("from . import a\n")
    (pkg / "training").mkdir()
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "run.py").write_text("from serengeti.ops import b\nrun = 1\n")
    graph = import_graph(tmp_path)
    assert graph["serengeti.ops.a"] == {"serengeti.training.run"}
    assert graph["serengeti.ops.b"] == {"serengeti.ops.a"}
    assert find_cycle(graph) == ["serengeti.ops.a", "serengeti.training.run", "serengeti.ops.b", "serengeti.ops.a"]
    assert upward_imports(graph) == ["serengeti.ops.a (ops) imports serengeti.training.run (training)"]


def diagram_layers(text: str) -> list[str]:
    """Layer names, top first, from the first code block of the ``## Layers`` section of architecture.md
    (each layer's line starts with its name, indented by one space)."""
    section = text.split("\n## Layers\n", 1)[1]
    block = section.split("```", 2)[1]
    return re.findall(r"^ ([a-z]+)  ", block, flags=re.M)


def test_the_architecture_diagram_draws_these_layers_in_this_order():
    drawn = diagram_layers((ROOT / "docs" / "architecture.md").read_text())
    assert drawn == [name for name, _ in reversed(LAYERS)]


@pytest.mark.parametrize("name", [name for name, _ in LAYERS])
def test_each_layer_holds_a_module(name):
    """No stale entry: every layer (and every package or module it lists) exists in the tree."""
    modules = set(import_graph())
    entries = dict(LAYERS)[name]
    for entry in entries:
        assert entry in modules, f"LAYERS names {entry}, which is not in src/serengeti"
