"""The study scripts (``benchmarks/``) and the benchmark product (``lensattr/bench``) use
lensattr's public API only: no private name or module, no ``sys.path`` edit, no file loaded as a
module, no attribute of a lensattr module assigned (a monkeypatch). Public: a name without a
leading underscore that the module's ``__all__`` lists, where it has one."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "lensattr" / "bench").glob("*.py")])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _public(module: str, name: str) -> bool:
    mod = importlib.import_module(module)
    if _private(name):
        return False
    if hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None:
        return True  # a submodule of a package
    if not hasattr(mod, name):
        return True  # an optional module this checkout lacks (the script guards its import)
    listed = getattr(mod, "__all__", None)
    return listed is None or name in listed


def violations(path: Path) -> list[str]:
    """What ``path`` does outside the public API, one line each (``file:line: what``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found: list[str] = []
    lensattr_names: set[str] = set()  # local names bound to lensattr modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lensattr":
                    lensattr_names.add((a.asname or a.name).split(".")[0])
                    if any(_private(p) for p in a.name.split(".")):
                        found.append(f"{where}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lensattr"):
            module = node.module or ""
            if any(_private(p) for p in module.split(".")):
                found.append(f"{where}:{node.lineno}: imports from {module}")
                continue
            for a in node.names:
                if not _public(module, a.name):
                    found.append(f"{where}:{node.lineno}: {module}.{a.name} is not public")
                if isinstance(getattr(importlib.import_module(module), a.name, None), type(ast)):
                    lensattr_names.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in lensattr_names:
                found.append(f"{where}:{node.lineno}: reads {ast.unparse(node)}")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                root = t.value if isinstance(t, ast.Attribute) else None
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in lensattr_names:
                    found.append(f"{where}:{node.lineno}: patches {ast.unparse(t)}")
        if isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.path":
            found.append(f"{where}:{node.lineno}: edits sys.path")
        if isinstance(node, ast.Attribute) and node.attr == "spec_from_file_location":
            found.append(f"{where}:{node.lineno}: loads a file as a module")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr":
            found.append(f"{where}:{node.lineno}: setattr")
    return found


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    bad = tmp_path / "example.py"
    bad.write_text(
        "import sys\nimport lensattr\nfrom lensattr.moments import _MEMO\n"
        "from lensattr._version import __version__\nfrom lensattr.criterion import candidates\n"
        "sys.path.insert(0, '.')\nlensattr.criterion.pool_moments = None\n"
        "x = lensattr.moments._MEMO\n"
    )
    said = "\n".join(violations(bad))
    for what in ("_MEMO is not public", "from lensattr._version", "edits sys.path"):
        assert what in said
    assert "patches lensattr.criterion.pool_moments" in said
    assert "reads lensattr.moments._MEMO" in said
    assert "candidates" not in said  # public: in lensattr.criterion's __all__


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_studies_and_bench_use_the_public_api_only(path):
    assert violations(path) == []


def test_the_studies_are_an_importable_package():
    import benchmarks.choice_study as study

    assert study.__name__ == "benchmarks.choice_study"
