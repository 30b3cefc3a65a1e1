"""mkdocs hook: render the Sphinx roles of lensattr's docstrings as API cross-references.

The docstrings say ``:func:`build_cache``` or ``:class:`~lensattr.models.Model```. mkdocstrings
renders those as ``:func:<code>build_cache</code>``; this hook turns each into a code span linked
to the object's entry in the API reference (through mkdocs-autorefs, ``optional``: a name that is
not documented stays plain code, never a warning). A leading ``~`` shows only the last
component, as in Sphinx. Short names are resolved when exactly one lensattr object has that name.
"""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):<code>(?P<tilde>~?)(?P<name>[\w.]+)</code>"
)
_index: dict[str, str] = {}


def _build_index(package: Path) -> dict[str, str]:
    """Short and partly qualified names -> full dotted path, for the names that are unique."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__")
        found[module].add(module)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names += [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
            for name in names:
                full = f"{module}.{name}"
                found[name].add(full)
                found[f"{module.split('.')[-1]}.{name}"].add(full)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                        full = f"{module}.{node.name}.{sub.name}"
                        found[f"{node.name}.{sub.name}"].add(full)
                        found[sub.name].add(full)
    return {k: next(iter(v)) for k, v in found.items() if len(v) == 1}


def on_config(config, **kwargs):  # noqa: ANN001, ANN003, ANN201
    root = Path(config["config_file_path"]).parent
    _index.clear()
    _index.update(_build_index(root / "lensattr"))
    return config


def _replace(match: re.Match) -> str:
    name = match["name"]
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
    target = _index.get(name)
    if target is None and name.startswith("lensattr."):
        # lensattr.load_model (re-exported) -> lensattr.models.load_model, when unique
        target = _index.get(name.rsplit(".", 1)[-1], name)
    if target is None:
        return f"<code>{shown}</code>"
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


def on_page_content(html, page, config, files):  # noqa: ANN001, ANN201
    return ROLE.sub(_replace, html)
