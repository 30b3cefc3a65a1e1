"""benchmarks/bench_peers.py (issue 14): the parts that need neither bergson nor the real model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lensattr.demo import bundled

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_peers.py"


def bench_peers():
    import benchmarks.bench_peers

    return benchmarks.bench_peers


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


def write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def chat(i: int, reply: str) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]


def test_a_behaviors_pool_is_a_seeded_subsample_with_both_kinds_of_plant(tmp_path):
    write_lines(
        tmp_path / "train" / "clean.jsonl",
        [{"id": f"c{i}", "messages": chat(i, "clean")} for i in range(30)],
    )
    write_lines(
        tmp_path / "behaviors" / "medhallu" / "plant.jsonl",
        [{"id": f"p{i}", "messages": chat(i, "plant"), "label": i % 2} for i in range(20)],
    )
    mod = bench_peers()
    pool = mod.behavior_pool(tmp_path, "medhallu", 10, 4, seed=0)
    assert len(pool) == 18 and len({r["id"] for r in pool}) == 18
    assert sum(r["id"].startswith("clean/c") and "label" not in r for r in pool) == 10
    plants = [r for r in pool if "label" in r]
    assert sorted(r["label"] for r in plants) == [0] * 4 + [1] * 4
    assert all(int(r["id"].split("/p")[1]) % 2 == r["label"] for r in plants)
    assert [i for i, r in enumerate(pool) if "label" in r] != list(range(10, 18))  # shuffled
    assert pool == mod.behavior_pool(tmp_path, "medhallu", 10, 4, seed=0)  # seeded
    assert pool != mod.behavior_pool(tmp_path, "medhallu", 10, 4, seed=1)
    with pytest.raises(SystemExit, match="only 10 plants of label 1"):
        mod.behavior_pool(tmp_path, "medhallu", 10, 11, seed=0)


def test_pick_pairs_draws_a_seeded_subset_in_file_order(tmp_path):
    pairs = [
        {"id": f"q{i}", "prompt": "p", "treatment": "t", "control": "c", "meta": {}}
        for i in range(10)
    ]
    write_lines(tmp_path / "q.jsonl", pairs)
    mod = bench_peers()
    assert [p["id"] for p in mod.pick_pairs(tmp_path / "q.jsonl", None, 0)] == [
        f"q{i}" for i in range(10)
    ]
    got = mod.pick_pairs(tmp_path / "q.jsonl", 4, 0)
    assert len(got) == 4 and [p["id"] for p in got] == sorted(
        (p["id"] for p in got), key=lambda x: int(x[1:])
    )
    assert set(got[0]) == {"id", "prompt", "treatment", "control"}


def test_results_compare_each_lensattr_method_with_bergsons_best_mode_on_the_same_resamples(
    capsys,
):
    import torch

    import lensattr

    labels = torch.tensor([1, 1, 1, 0, 0, 0] + [-1] * 14)
    truth = (labels == 1).double()
    gen = torch.Generator().manual_seed(0)

    def method(noise: float) -> dict:
        s = truth + noise * torch.randn(len(labels), generator=gen, dtype=torch.float64)
        return {
            "pipeline_s": 1.0,
            **lensattr.pool_metrics(s, labels, coding="planted"),
            "scores": s.tolist(),
        }

    bergson = {"bergson dot": method(3.0), "bergson unit": method(0.1)}  # unit: the best mode
    full = {"lensattr auto (x @ 1)": method(0.7)}
    run = {"build_s": 1.0, "pipeline_s": 1.0, "peak_rss_mb": 1, "build_peak_rss_mb": 1, "bytes": 1}
    runs = {"full": [{**run, "methods": full}], "bergson": [{**run, "methods": bergson}]}
    bench_peers().print_results(runs, labels)
    out = capsys.readouterr().out
    assert "lensattr minus bergson unit" in out
    d = lensattr.pool_metrics_difference(
        torch.tensor(full["lensattr auto (x @ 1)"]["scores"]),
        torch.tensor(bergson["bergson unit"]["scores"]),
        labels,
        coding="planted",
    )
    line = next(x for x in out.splitlines() if x.startswith("lensattr auto") and "[" in x)
    assert f"P@3 {d['p_at_k']:+.2f} [{d['p_at_k_ci'][0]:+.2f}, {d['p_at_k_ci'][1]:+.2f}]" in line
    assert f"AP {d['ap']:+.3f} [{d['ap_ci'][0]:+.3f}, {d['ap_ci'][1]:+.3f}]" in line


def test_peers_paired_reads_a_finished_run_and_rebuilds_old_runs_labels(tmp_path):
    import torch

    import benchmarks.peers_paired as pp
    import lensattr

    ids = ["clean/a", "medhallu/p1", "clean/b", "medhallu/p2", "medhallu/p3", "clean/c"]
    labels = [-1, 1, -1, 0, 1, -1]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    plants = tmp_path / "shared" / "behaviors" / "medhallu"
    plants.mkdir(parents=True)
    rows = [{"id": "p1", "label": 1}, {"id": "p2", "label": 0}, {"id": "p3", "label": 1}]
    (plants / "plant.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # an older run has no labels.json: they come from the shared plants, by id
    got = pp.pool_labels(tmp_path, "medhallu", tmp_path / "shared")
    assert got.tolist() == labels
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    mine = [0.1, 0.9, 0.2, 0.3, 0.8, 0.0]
    bergson = {"dot": [0.9, 0.1, 0.2, 0.3, 0.8, 0.0], "unit": [0.1, 0.9, 0.8, 0.3, 0.2, 0.0]}
    (tmp_path / "full-0.json").write_text(
        json.dumps({"results": {"auto": {"choice": "x @ 1", "scores": mine}}})
    )
    (tmp_path / "bergson-0-scores.json").write_text(json.dumps({"scores": bergson}))
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers_paired", "--work", str(tmp_path),
         "--n-boot", "50"],
        capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lab = torch.tensor(labels)
    best = "unit"  # P@2 0.5, AP 0.75 against dot's 0.5, 0.45
    d = lensattr.pool_metrics_difference(
        torch.tensor(mine), torch.tensor(bergson[best]), lab, n_boot=50, coding="planted"
    )
    assert f"minus bergson {best}" in res.stdout
    line = res.stdout.splitlines()[-1]
    assert line.startswith("auto (x @ 1)") and f"P@2 {d['p_at_k']:+.2f}" in line
    assert f"[{d['ap_ci'][0]:+.3f}, {d['ap_ci'][1]:+.3f}]" in line


def test_peers_paired_select_reuses_saved_pair_stats(tiny, train_records, pair_records, tmp_path):
    """``--select --pair-stats``: auto as the code now chooses, from the saved capture (no model
    load), is the choice and ranking of ``lensattr.select`` on the same cache and pairs."""
    import torch

    import lensattr

    cache = lensattr.build_cache(
        tiny, train_records, out=tmp_path / "full-0", layers=[1, 3], progress=False
    )
    ps = lensattr.pair_stats(tiny, pair_records, stats=cache.stats, layers=[1, 3], batch_size=4)
    ps.save(tmp_path / "pairs.safetensors")
    n = len(cache)
    labels = [1, 0] + [-1] * (n - 2)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "full-0.json").write_text(
        json.dumps({"results": {"auto": {"choice": "x @ 1", "scores": [0.0] * n}}})
    )
    scores = {"dot": [float(i) for i in range(n)]}
    (tmp_path / "bergson-0-scores.json").write_text(json.dumps({"scores": scores}))
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers_paired", "--work", str(tmp_path),
         "--select", "--pair-stats", str(tmp_path / "pairs.safetensors"), "--n-boot", "20"],
        capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    sel = lensattr.select(tiny, cache, ps)
    m = lensattr.pool_metrics(
        lensattr.rank(cache, sel, top_k=None).scores_of(range(n)),
        torch.tensor(labels),
        coding="planted",
    )
    line = next(x for x in res.stdout.splitlines() if x.startswith("auto now"))
    from lensattr.layers import layer_text

    best = f"{sel.method} @ L{layer_text(sel.layer)}"
    assert line.startswith(f"auto now (ensemble of {len(sel.ensemble.members)}, best {best})")
    assert f"AP {m['ap']:.3f}" in line


def test_the_full_pipeline_reports_text_search_and_repsim(train_records, pair_records, tmp_path):
    """The ``full`` contender's process (tiny model) adds each lexical kind, the kind chosen
    without labels, and RepSim at its label-free layer, scored as lensattr.baselines scores them
    in the cache's row order."""
    import torch

    import lensattr
    from lensattr.baselines import LEXICAL, lexical_scores, lexical_select, repsim_select

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    result, out = tmp_path / "result.json", tmp_path / "full"
    args = ["tiny-random", train, pairs, out, "full", 4, 64, 8, result]
    res = subprocess.run(
        [sys.executable, "-c", bench_peers().LENSATTR_PIPELINE, *map(str, args)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(result.read_text())["results"]
    texts = [ex.response for ex in lensattr.load_examples(train)]
    pl = lensattr.load_pairs(pairs)
    t, c = [p.treatment for p in pl], [p.control for p in pl]
    for k in LEXICAL:
        want = lexical_scores(texts, t, c, k)
        assert got[f"text {k}"]["scores"] == pytest.approx(want.tolist(), abs=1e-6), k
        assert got[f"text {k}"]["build"] is False
    kind = lexical_select(texts, t, c)[0]
    assert got["text search"]["scores"] == got[f"text {kind}"]["scores"]
    assert got["text search"]["choice"].startswith(kind)
    cache = lensattr.open_cache(out)
    sel = repsim_select(cache, pairs, lensattr.load_model("tiny-random"), batch_size=4)
    want = lensattr.rank(cache, sel, top_k=None).scores_of(range(len(cache)))
    assert got["RepSim"]["scores"] == pytest.approx(want.tolist(), abs=1e-5)
    assert got["RepSim"]["choice"].startswith("repsim|resid_post|cosine @ L")
    assert torch.isfinite(torch.tensor(got["RepSim"]["scores"])).all()
