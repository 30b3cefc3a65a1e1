"""The module graph: the model loader, the backends and the capture import one another in one
direction only (no circle through a lazy import either), so each can be read on its own."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lensattr"
CORE = {
    "lensattr.backends.models",
    "lensattr.backends.backend",
    "lensattr.backends.bridge",
    "lensattr.backends.capture",
    "lensattr.backends.nnsight",
}
"""The modules of the old circle models <-> bridge <-> capture."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every lensattr module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                )
                base = base.rstrip(".")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from lensattr import submodule
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def cycles(edges: dict[str, set[str]], skip: set[str]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), ``skip`` left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v] - skip:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(set(edges) - skip):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_sources():
    edges = graph()
    assert "lensattr.backends.backend" in edges["lensattr.backends.capture"]  # at the top
    assert "lensattr.distributed" in edges["lensattr.build"]  # from lensattr import ...
    assert "lensattr.testing" in edges["lensattr.backends.models"]  # inside a function


def test_no_import_circle_among_loader_backends_and_capture():
    edges = graph()
    sub = {m: edges[m] & CORE for m in CORE}
    assert cycles(sub, set()) == []
    assert (
        "lensattr.backends.capture" not in edges["lensattr.backends.bridge"]
    )  # no helper borrowed
    assert not edges["lensattr.backends.backend"] & CORE  # the interface imports no backend


def test_no_import_circle():
    """The package's ``__init__`` (the facade that imports everything) is left out; the
    registry imports no method module (the built-ins register from that ``__init__``)."""
    edges = graph()
    assert cycles(edges, skip={"lensattr"}) == []
    assert not {m for m in edges["lensattr.registry"] if m.startswith("lensattr.methods")}


def test_the_builtins_are_registered_whichever_module_is_imported_first():
    """Importing any submodule imports the package first, which registers the built-ins."""

    code = (
        "from lensattr.registry import STAT, QUERY, SCORE\n"
        "print(*(sorted(k for k, v in t.items() if v.module.startswith('lensattr.methods'))"
        " for t in (STAT, QUERY, SCORE)), sep='|')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from lensattr import registry

    # the built-ins only: other tests in this process may have registered their own
    want = [
        sorted(k for k, v in t.items() if v.module.startswith("lensattr.methods"))
        for t in (registry.STAT, registry.QUERY, registry.SCORE)
    ]
    assert out.stdout.strip() == "|".join(map(str, want)) and min(map(len, want)) >= 4


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, set()) == [["a", "b", "c"]]


def test_layout_backends_methods_store():
    """Each box of the architecture page is a subpackage."""
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"backends", "methods", "store"} <= subpackages


def test_the_store_imports_no_backend_and_the_build_loop_sits_above_both():
    edges = graph()
    store = {m for m in edges if m.startswith("lensattr.store")}
    for m in store:
        assert not {e for e in edges[m] if e.startswith("lensattr.backends")}, m
    assert {"lensattr.backends.capture", "lensattr.store.cache"} <= edges["lensattr.build"]


def test_the_architecture_page_names_modules_that_exist():
    """Every module path docs/architecture.md names (``lensattr/...py``, ``store/x.py``) exists."""
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:lensattr/)?(?:[a-z_]+/)?[a-z_]+\.py)`", page))
    assert len(named) > 20
    missing = [n for n in named if not (PACKAGE.parent / n).exists() and not (PACKAGE / n).exists()]
    assert missing == [], missing


def test_import_in_a_notebook_prints_nothing():
    """Issue 27 item 12: ``import lensattr`` in a Jupyter kernel without ipywidgets writes no
    ``TqdmWarning: IProgress not found`` (nor anything else)."""
    import pytest

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import lensattr")]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(PACKAGE.parent))
    assert nb.cells[0]["outputs"] == []
