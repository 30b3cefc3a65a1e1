"""mkdocs hook: the API reference documents each public name once, on its first page.

``docs/api/index.md`` documents every name of ``lensattr.__all__`` (``::: lensattr.load_model``,
...). On the other API pages a bare ``::: module`` line becomes that module with the members
it defines itself (functions, classes and upper-case constants, not underscored), less the
names already on the first page, so nothing appears twice and a module's own new function
appears without editing the page.
"""

import ast
import re
from pathlib import Path

DIRECTIVE = re.compile(r"^::: (lensattr(?:\.\w+)*)[ \t]*$(?!\n[ \t]+options:)", re.M)
_top: set[str] = set()
_root: list[Path] = []


def top_level(package: Path) -> set[str]:
    """The names of ``lensattr.__all__``, read from the package's ``__init__.py``."""
    tree = ast.parse((package / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value)) - {"__version__"}
    return set()


def own_members(path: Path) -> list[str]:
    """The public functions, classes and upper-case constants ``path`` defines, in order."""
    names: list[str] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def module_file(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def expand(markdown: str, root: Path, top: set[str]) -> str:
    """``markdown`` with each bare ``::: module`` given the members it alone documents."""

    def one(match: re.Match) -> str:
        module = match[1]
        members = [n for n in own_members(module_file(root, module)) if n not in top]
        if module.count(".") == 0:
            return match[0]
        listed = ", ".join(members)
        return f"::: {module}\n    options:\n      members: [{listed}]"

    return DIRECTIVE.sub(one, markdown)


def on_config(config, **kwargs):  # noqa: ANN001, ANN003, ANN201
    root = Path(config["config_file_path"]).parent
    _root[:] = [root]
    _top.clear()
    _top.update(top_level(root / "lensattr"))
    return config


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001, ANN201
    if not page.file.src_uri.startswith("api/") or page.file.src_uri == "api/index.md":
        return markdown
    return expand(markdown, _root[0], _top)
