"""The wheel is complete: built from a copy of the sources, installed into a fresh virtual
environment without downloading anything, its ``lensattr`` command runs a tiny attribution.

The fresh environment gets its dependencies from this one through a ``.pth`` file listing this
environment's site-packages (plain paths: the editable install of lensattr there is not
activated), so the ``lensattr`` it imports is the wheel's.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "lensattr")


def run(cmd, cwd, env, timeout=300):
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (no build isolation, no index)."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src]
    run([sys.executable, "-m", "pip", *build], cwd=tmp, env=env)
    (whl,) = dist.glob("lensattr-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "lensattr/py.typed",
        "lensattr/bundled/demo/train.jsonl",
        "lensattr/bundled/demo/query.jsonl",
        "lensattr/bundled/README.md",
        "lensattr/cli.py",
        "lensattr/backends/bridge.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    assert any(n.startswith("lensattr/bundled/LICENSES/") for n in names)
    assert not any(n.startswith(("tests/", "docs/", "tutorials/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "lensattr = lensattr.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_heavy_packages_are_extras(wheel):
    """matplotlib and peft (demo / bench only) are not installed with the bare library."""
    (meta,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch") for r in core)
    extras = [(n, "demo") for n in ("matplotlib", "scikit-learn", "bm25s")]
    extras += [(n, "bench") for n in ("matplotlib", "peft", "scikit-learn", "bm25s")]
    for name, extra in extras:
        assert not any(r.startswith(name) for r in core), core
        assert any(r.startswith(name) and f'extra == "{extra}"' in r for r in requires), requires


def test_wheel_installs_and_runs(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = Path(
        run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
            env=os.environ,
        ).strip()
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_lensattr_test_deps.pth").write_text("\n".join(deps) + "\n")

    env = {
        **os.environ,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    run(
        [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel],
        cwd=tmp_path,
        env=env,
    )

    where = run(
        [
            py,
            "-c",
            "import lensattr, lensattr.demo as d; print(lensattr.__file__); "
            "print(d.bundled('demo/query.jsonl'))",
        ],
        cwd=tmp_path,
        env=env,
    ).split()
    assert all(Path(w).resolve().is_relative_to(env_dir.resolve()) for w in where), where
    pairs = where[1]

    cli = env_dir / "bin" / "lensattr"
    assert "cache" in run([cli, "--help"], cwd=tmp_path, env=env)
    train = tmp_path / "train.jsonl"
    records = [
        {"id": f"ex{i}", "prompt": f"Say {i}.", "response": "ok " * (i + 1)} for i in range(6)
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    tiny = ["--model", "tiny-random", "--layers", "1,2", "--quiet"]
    run([cli, "cache", *tiny, "--train", train, "--out", "cache"], cwd=tmp_path, env=env)
    run([cli, "query", *tiny, "--pairs", pairs, "--out", "q.safetensors"], cwd=tmp_path, env=env)
    ranked = ["--cache", "cache", "--query", "q.safetensors", "--layer", "2", "--top-k", "3"]
    run([cli, "rank", *ranked, "--out", "top.jsonl"], cwd=tmp_path, env=env)
    rows = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert {r["id"] for r in rows} <= {f"ex{i}" for i in range(6)}
