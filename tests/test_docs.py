"""The documentation site builds with ``mkdocs build --strict`` (API pages, notebooks, links)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

for module in (
    "mkdocs",
    "material",
    "mkdocstrings",
    "mkdocstrings_handlers.python",
    "mkdocs_jupyter",
):
    pytest.importorskip(module)


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert (site / "index.html").exists()
    for page in ("concepts", "api/pipeline", "tutorials/01_quickstart"):
        assert (site / page / "index.html").exists(), page
    quickstart = (site / "tutorials" / "01_quickstart" / "index.html").read_text()
    assert re.search(r"planted AUROC at layer \d+: \d\.\d{3}", quickstart)  # stored outputs shown
