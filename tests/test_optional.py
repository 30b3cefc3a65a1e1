"""Heavy packages only the demo or the bench need are extras: the library imports without them,
and a missing one is a one-line error naming the extra."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lensattr.bench.finetune import lora_finetune
from lensattr.optional import explain, install_hint, require
from lensattr.plot import plot_sweep

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ONLY = {"matplotlib": "demo", "peft": "bench", "sklearn": "bench", "bm25s": "bench"}
DISTRIBUTION = {"sklearn": "scikit-learn"}  # where the import name is not the package's


def test_require_returns_the_module():
    assert require("json", "demo") is json
    assert require("os.path", "demo").join("a", "b") == "a/b"


def test_require_names_the_extra_when_missing():
    with pytest.raises(ImportError) as info:
        require("lensattr_no_such_module.sub", "bench")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("lensattr_no_such_module is not installed")
    assert "pip install 'lensattr[bench]'" in msg
    assert info.value.name == "lensattr_no_such_module"


def test_require_keeps_the_error_of_a_broken_module(tmp_path, monkeypatch):
    (tmp_path / "lensattr_broken_mod.py").write_text("import lensattr_missing_inner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("lensattr_broken_mod", "demo")
    assert info.value.name == "lensattr_missing_inner"
    assert "lensattr[demo]" not in str(info.value)


def test_extras_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for module, extra in EXTRA_ONLY.items():
        package = DISTRIBUTION.get(module, module)
        assert package not in core
        assert any(d.startswith(package) for d in extras[extra])
    for package in ("matplotlib", "scikit-learn", "bm25s"):  # the demo's plot and baseline
        assert any(d.startswith(package) for d in extras["bench"])
        assert any(d.startswith(package) for d in extras["demo"])
    (dev_self,) = [d for d in extras["dev"] if d.startswith("lensattr[")]
    assert {"tl", "docs", "demo", "bench"} <= set(dev_self[9:-1].split(","))


def test_every_module_imports_without_the_extras():
    """Importing lensattr and each of its modules needs none of the extras' packages (they are
    blocked in a fresh interpreter, as if not installed)."""
    code = (
        "import sys, pkgutil, importlib\n"
        f"for m in {sorted(EXTRA_ONLY)!r}: sys.modules[m] = None\n"
        "import lensattr\n"
        "names = [m.name for m in pkgutil.walk_packages(lensattr.__path__, 'lensattr.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert int(proc.stdout.split()[-1]) > 20


def test_explain_names_the_extra_of_the_command():
    peft = ModuleNotFoundError("No module named 'peft'", name="peft")
    assert "pip install 'lensattr[bench]'" in explain(peft, "bench")
    plt = ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")
    assert "pip install 'lensattr[demo]'" in explain(plt, "demo")
    assert "pip install 'lensattr[bench]'" in explain(plt, "bench")
    assert "pip install 'lensattr[demo]'" in explain(plt, "rank")  # first extra that has it
    other = ModuleNotFoundError("No module named 'foo'", name="foo")
    assert explain(other, "demo") == "No module named 'foo'"
    assert explain(ValueError("bad"), "demo") == "bad"
    hinted = ModuleNotFoundError(install_hint("peft", "bench"), name="peft")
    assert explain(hinted, "demo") == str(hinted)  # not wrapped twice


@pytest.mark.parametrize(
    ("command", "blocked", "call"),
    [
        ("demo", "matplotlib", lambda: plot_sweep({}, Path("unused.png"), "t")),
        ("bench", "peft", lambda: lora_finetune("tiny-random", [])),
    ],
)
def test_cli_says_which_extra_is_missing(command, blocked, call, monkeypatch, capsys):
    """The real import sites of the demo's plot and the bench's fine-tuning, with the package
    blocked as if not installed, give one error line naming the extra."""
    from lensattr import cli

    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.setattr(cli, f"cmd_{command}", lambda args: call())
    argv = [command, "--smoke"] if command == "bench" else [command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"lensattr {command}: error: {blocked} is not installed")
    assert f"pip install 'lensattr[{command}]'" in err
