"""The leave-one-behaviour-out study end to end on the tiny model and synthetic data (plumbing,
and auto's number recomputed from the pool it wrote)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import lensattr
from lensattr.bench.smoke import write_synthetic_data
from lensattr.metrics import precision_at_k

ROOT = Path(__file__).resolve().parents[1]


def study(*args: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.generalisation", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_study_builds_scores_and_reports(tmp_path):
    data, work = write_synthetic_data(tmp_path / "data"), tmp_path / "work"
    common = ["--data", str(data), "--work", str(work), "--own", ""]
    study("build", *common, "--model", "tiny-random", "--clean", "40", "--plants", "8",
          "--pairs", "8", "--layers", "0:4:1")  # fmt: skip
    study("score", *common, "--model", "tiny-random", "--seeds", "0,1", "--pool", "30",
          "--plants", "6")  # fmt: skip
    study("report", "--work", str(work), "--data", str(data))
    report = json.loads((work / "report.json").read_text())
    names = sorted(report["rows"])
    assert list(report["targets"]) == ["shared data"]  # the data folder holds both behaviours
    assert len(names) == 2 and "hindsight" in report["rows"][names[0]]
    for row in report["rows"].values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # auto's P@k in a pool is select's ensemble ranked on that pool's cache
    res = json.loads((work / "cells" / f"{names[0]}-0.json").read_text())
    cache = lensattr.open_cache(work / "pools" / f"{names[0]}-0")
    ps = lensattr.PairStats.load(work / "pairs" / f"{names[0]}.safetensors")
    sel = lensattr.select(None, cache, ps)
    plan = json.loads((work / "plan.json").read_text())
    pos = set(plan["behaviours"][names[0]]["pos"])
    labels = torch.tensor([int(i in pos) for i in cache.ids])
    scores = lensattr.rank(cache, sel, top_k=None).scores_of(range(len(cache)))
    assert res["auto"]["p_at_k"] == precision_at_k(scores, labels, int(labels.sum()))
    assert res["auto"]["members"] == len(sel.ensemble.members)
    # the ensemble-members study rebuilds auto's ensemble from the saved criterion table: its
    # top30 is auto's ranking of the pool, and every variant is a precision
    cmd = [sys.executable, "-m", "benchmarks.ensemble_members", "--work", str(work)]
    res_m = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res_m.returncode == 0, res_m.stderr[-3000:]
    for f in sorted((work / "cells").glob("*.json")):
        members = json.loads((work / "members" / f.name).read_text())["p_at_k"]
        assert members["top30"] == json.loads(f.read_text())["auto"]["p_at_k"], f.name
        assert all(0.0 <= v <= 1.0 for v in members.values())
    shown = subprocess.run([*cmd, "--report"], cwd=ROOT, capture_output=True, text=True)
    assert "left one behaviour out" in shown.stdout, shown.stderr[-3000:]


def test_hindsight_is_one_fixed_method_and_the_targets_count_it():
    import benchmarks.generalisation as gen

    def pool(a: float, b: float) -> dict:
        return {"cells": [{"method": "m", "layer": 3, "p_at_k": a},
                          {"method": "n", "layer": 3, "p_at_k": b}]}  # fmt: skip

    # m wins pool 0, n wins pool 1: a per-pool best would be 1.0; the best fixed method is 0.6
    assert gen._hindsight([pool(1.0, 0.2), pool(0.2, 1.0)]) == 0.6
    assert gen._hindsight([pool(0.5, 0.25), pool(0.75, 0.25)]) == 0.625
    rows = {
        "a": {"auto (LOBO)": 0.9, "hindsight": 0.92, "repsim": 0.5, "lexical:x": 0.7},
        "b": {"auto (LOBO)": 0.7, "hindsight": 0.9, "repsim": 0.6, "lexical:x": 0.2},
        "c": {"auto (LOBO)": 0.95, "hindsight": 1.0, "repsim": 0.9, "lexical:x": 0.95},
    }
    t = gen.targets(rows, ["a", "b", "c"])
    assert t["mean"]["value"] == (0.9 + 0.7 + 0.95) / 3 and t["mean"]["met"]
    assert t["near_hindsight"]["count"] == 2 and t["near_hindsight"]["missed_by"] == ["b"]
    assert not t["near_hindsight"]["met"]  # 2 of 3 < 80%
    # margins over the best baseline: +0.2, +0.1, 0.0
    assert abs(t["margin_mean"]["value"] - 0.1) < 1e-12 and not t["margin_mean"]["met"]
    assert t["margin_count"]["count"] == 1 and t["margin_count"]["ceiling"] == ["c"]
