"""benchmarks/bench_peers.py (issue 14): the parts that need neither bergson nor the real model."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lensattr.demo import bundled

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_peers.py"


def bench_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_bergsons_venv_it_says_so_in_one_line_and_exits_0(tmp_path):
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--venv", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and str(tmp_path / "absent") in lines[0]


def test_demo_subset_keeps_every_labelled_example_and_the_first_clean_ones():
    rows = [json.loads(x) for x in bundled("demo/train.jsonl").read_text().splitlines() if x]
    sub = bench_peers().demo_subset(48)
    assert len(sub) == 48
    assert sum(r.get("label") == 1 for r in sub) == 12
    assert sum(r.get("label") == 0 for r in sub) == 12
    clean = [r["id"] for r in rows if "label" not in r][:24]
    assert [r["id"] for r in sub if "label" not in r] == clean
    order = [r["id"] for r in rows]
    assert [order.index(r["id"]) for r in sub] == sorted(order.index(r["id"]) for r in sub)
    with pytest.raises(SystemExit, match="at least 24"):
        bench_peers().demo_subset(23)
