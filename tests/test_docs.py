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
    # stored outputs shown: precision among the pool first, planted AUROC second
    assert re.search(r"precision@\d+ among the pool at layer \d+: \d\.\d{3}", quickstart)
    assert re.search(r"planted AUROC at layer \d+: \d\.\d{3}", quickstart)


def test_docs_point_at_data_users_have():
    """Users have no ``../shared/data`` (the developers' benchmark data): the guides point at
    the bundled files or say where the data comes from. (The results page keeps the exact
    command of its run.)"""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in pages
        if p.name != "results.md" and "shared/data" in p.read_text()
    ]
    assert not offenders, offenders


def test_docs_nav_has_no_duplicate_pages():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use !!python/name tags; only the nav matters here
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)["nav"]

    def leaves(items):
        for item in items:
            if isinstance(item, dict):
                for title, value in item.items():
                    yield from leaves(value) if isinstance(value, list) else [(title, value)]
            else:
                yield (None, item)

    pairs = list(leaves(nav))
    files = [f for _, f in pairs]
    assert len(files) == len(set(files)), files
    titles = [t.lower().replace("-", " ") for t, _ in pairs if t]
    assert "scale out" not in titles and titles.count("scaling out") == 1, titles


def test_custom_methods_guide_runs(tmp_path):
    """The Python blocks of the custom-methods guide run top to bottom on the tiny model (in a
    subprocess: their registrations must not leak into the test session), and ``select`` picks
    one of the four methods the guide names."""
    text = (ROOT / "docs" / "howto" / "custom-methods.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if not b.startswith(">>>")]
    assert len(blocks) >= 5, "the guide lost its examples"
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks) + "\nprint('CHOSEN', sel.method)\n")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    chosen = re.search(r"^CHOSEN (\S+)$", proc.stdout, re.M)
    assert chosen, proc.stdout[-2000:]
    assert chosen.group(1) in {
        "unit_contrast|residual_change|abs_cosine",
        "clipped_pool_contrast|resid_post|centered_cosine",
        "pool_contrast|resid_post|deflated_cosine",
        "residual_change|residual_change|cosine",
    }
