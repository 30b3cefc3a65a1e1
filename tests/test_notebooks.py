"""Every tutorial notebook runs top to bottom on the tiny model, and ships with its outputs.

The notebooks execute with nbclient in a kernel running *this* interpreter (a kernel spec written
to a temporary ``JUPYTER_PATH`` entry), in a temporary working directory, with
``LENSATTR_TUTORIAL_MODEL=tiny-random``.

``python tests/test_notebooks.py`` (``make notebooks``) re-executes them the same way and stores
the outputs in place, which is what the docs render (mkdocs-jupyter runs with ``execute: false``).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
KERNEL = "lensattr-tutorials"
SWITCH = 'MODEL = os.environ.get("LENSATTR_TUTORIAL_MODEL", "tiny-random")'


def write_kernel_spec(root: Path) -> str:
    """Write a kernel spec running this interpreter under ``root/kernels``; return its name."""
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lensattr tutorials",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KERNEL


def execute(path: Path, kernel_name: str, work: Path):  # noqa: ANN201
    """Run the notebook at ``path`` on the tiny model in ``work``; return it with its outputs."""
    nb = nbformat.read(path, as_version=4)
    env = {
        **os.environ,
        "LENSATTR_TUTORIAL_MODEL": "tiny-random",
        "TMPDIR": str(work),  # the notebooks' temporary caches go away with ``work``
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=600,
        record_timing=False,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on any error
    return nb


def test_tutorials_exist():
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no tutorial {prefix}*.ipynb"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    root = tmp_path / "jupyter"
    name = write_kernel_spec(root)
    paths = [str(root), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(p for p in paths if p))
    return name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    start = time.perf_counter()
    nb = execute(path, kernel, work)
    print(f"{path.name}: {time.perf_counter() - start:.1f}s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    """The docs render stored outputs (mkdocs-jupyter ``execute: false``): keep them in the file."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and SWITCH in code[0].source, "the first code cell must hold the model switch"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored executed top to bottom: run `make notebooks`"
    )
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


def main() -> None:
    """Execute every tutorial on the tiny model and store the outputs in place."""
    with tempfile.TemporaryDirectory(prefix="lensattr-notebooks-") as tmp:
        root = Path(tmp)
        name = write_kernel_spec(root / "jupyter")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            p for p in (str(root / "jupyter"), os.environ.get("JUPYTER_PATH", "")) if p
        )
        for path in NOTEBOOKS:
            work = root / path.stem
            work.mkdir()
            start = time.perf_counter()
            nb = execute(path, name, work)
            for cell in nb.cells:
                cell.metadata.pop("execution", None)  # timestamps: noise in diffs
            nb.metadata["kernelspec"] = {
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
                "name": "python3",
            }
            nbformat.write(nb, path)
            print(f"{path.relative_to(ROOT)}: {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
