"""``lensattr demo``: the whole method on the embedded SmolLM2 and the bundled data.

Caches the bundled training set (240 clean instruction examples + 24 planted replies of the
``empathy`` trait: 12 that show it, label 1, and their 12 controls, label 0) at every layer,
captures the 16 bundled query pairs once, lets ``auto`` (:func:`lensattr.select`) choose the
methods and layers from those pairs and the unlabelled cache, and prints its top-10 and its
precision among the pool. Then, for comparison on the same cache, the paper's method as its
authors ran it (``lensattr.PAPER``) at the layer its own held-out accuracy chooses, text search
of the replies and RepSim (each at its setting chosen without labels: :mod:`lensattr.baselines`);
and a plot of precision@k per layer for auto, the paper's method and RepSim.
The labels are read for the printed metrics only.
"""

import json
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from lensattr import (
    PAPER,
    CaptureConfig,
    behavior_query,
    build_cache,
    load_examples,
    load_model,
    pair_stats,
    pool_metrics,
    rank,
    select,
)
from lensattr.baselines import REPSIM, lexical_scores, lexical_select, repsim_select
from lensattr.data import load_pairs
from lensattr.layers import layer_text
from lensattr.plot import layer_sweep, plot_sweep


def bundled(name: str) -> Path:
    """Path of a bundled data file, e.g. ``bundled("demo/train.jsonl")``."""
    return Path(str(files("lensattr") / "bundled" / name))


def all_scores(cache: Any, query: Any, layer: Any, score: str | None) -> torch.Tensor:
    """Every cached example's score (cache row order) under ``query`` at ``layer`` (or the mean
    over a layer set)."""
    return rank(cache, query, layer=layer, score=score, top_k=None).scores_of(range(len(cache)))


def show_top(top: Any, by_id: dict[str, Any]) -> int:
    """Print a top-10 with plant tags; returns how many are label-1 plants."""
    for i, (eid, score) in enumerate(zip(top.ids, top.scores.tolist(), strict=True)):
        label = by_id[eid].extra.get("label")
        tag = {1: "PLANT+", 0: "decoy "}.get(int(label) if label is not None else -1, "clean ")
        reply = by_id[eid].response.replace("\n", " ")[:50]
        print(f"{i + 1:>3} {score:+.4f} {tag} {eid[:40]:<40} {reply!r}")
    return sum(by_id[e].extra.get("label") == 1 for e in top.ids)


def baselines(
    cache: Any, stats: Any, examples: list[Any], labels: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Print and return what a user tries first, on the same cache and metrics as ``auto``: text
    search (:mod:`lensattr.baselines`, the kind chosen without labels) and RepSim at the layer
    ``auto``'s criterion chooses for it. ``repsim`` keeps its ``query`` for the layer sweep."""
    by_id = {ex.id: ex for ex in examples}
    texts = [by_id[i].response for i in cache.ids]
    pairs = load_pairs(bundled("demo/query.jsonl"))
    treatment, control = [p.treatment for p in pairs], [p.control for p in pairs]
    kind, table = lexical_select(texts, treatment, control)
    rs = repsim_select(cache, stats)
    k = int((labels == 1).sum())
    out: dict[str, dict[str, Any]] = {}
    rows: list[tuple[str, str, torch.Tensor, dict[str, Any]]] = [
        (
            "lexical",
            f"text search ({kind}: TF-IDF / BM25 of the replies, the kind chosen without labels)",
            lexical_scores(texts, treatment, control, kind),
            {"kind": kind, "table": table},
        ),
        (
            "repsim",
            f"RepSim ({REPSIM}) at layer {layer_text(rs.layer)} (chosen without labels)",
            all_scores(cache, rs, rs.layer, REPSIM.score),
            {"method": str(REPSIM), "layer": rs.layer, "query": rs.query},
        ),
    ]
    for name, what, scores, extra in rows:
        found = int((labels[scores.topk(10).indices] == 1).sum())
        met = pool_metrics(scores, labels, n_boot=500, coding="planted")
        print(
            f"{what}: {found} of 10 planted in the top-10, precision@{k} {met['p_at_k']:.2f} "
            f"[{met['p_at_k_ci'][0]:.2f}, {met['p_at_k_ci'][1]:.2f}], AP {met['ap']:.2f}, "
            f"planted AUROC {met['auroc_planted']:.2f}"
        )
        out[name] = {**extra, "planted_in_top10": found, **met}
    return out


def run_demo(
    model: Any = "smollm2-135m-instruct",
    out: Path = Path("runs/demo"),
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict:
    """Run the demo; returns (and writes to ``out/summary.json``) what it printed."""
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    m = load_model(model)
    times["load model"] = time.perf_counter() - t0
    print(f"model {m.name}: {m.n_layers} layers, d_model {m.d_model} ({times['load model']:.1f}s)")

    train_path = bundled("demo/train.jsonl")
    examples = load_examples(train_path)
    t0 = time.perf_counter()
    cache = build_cache(
        m,
        train_path,
        out=out / "cache",
        batch_size=batch_size,
        progress=progress,
        config=CaptureConfig(layers="all", max_length=max_length),
    )
    times["cache"] = time.perf_counter() - t0
    assert cache is not None  # a single-process build returns the cache
    print(
        f"cached {len(cache)} examples x {len(cache.layers)} layers x {len(cache.stats)} stats "
        f"({times['cache']:.1f}s)"
    )
    t0 = time.perf_counter()
    stats = pair_stats(
        m,
        bundled("demo/query.jsonl"),
        stats=cache.stats,
        batch_size=batch_size,
        progress=progress,
        config=cache.capture_config,  # the pairs captured as the cache was
    )
    times["query pairs"] = time.perf_counter() - t0
    print(f"captured {stats.n_pairs} query pairs at every layer ({times['query pairs']:.1f}s)")

    by_id = {ex.id: ex for ex in examples}
    labels = torch.tensor([int(by_id[i].extra.get("label", -1)) for i in cache.ids])
    k = int((labels == 1).sum())

    t0 = time.perf_counter()
    sel = select(m, cache, stats)
    times["auto"] = time.perf_counter() - t0
    print(f"\n{sel.summary(top=6)}\n({len(sel.table)} candidates x layers in {times['auto']:.1f}s)")
    top = rank(cache, sel, top_k=10)
    if sel.ensemble is not None:
        what = f"the mean standardised score of its {len(sel.ensemble.members)} best methods"
    else:
        what = f"{sel.method}, layer{'s' if len(sel.layers) > 1 else ''} {layer_text(sel.layers)}"
    print(f"\nauto: top-10 of {len(cache)} ({what}):")
    found = show_top(top, by_id)
    auto_m = pool_metrics(all_scores(cache, sel, None, None), labels, n_boot=500, coding="planted")
    print(
        f"\nplanted (label 1) in the top-10: {found} of 10 ({k} planted among {len(cache)})\n"
        f"precision@{k} among the pool {auto_m['p_at_k']:.2f} "
        f"[{auto_m['p_at_k_ci'][0]:.2f}, {auto_m['p_at_k_ci'][1]:.2f}], average precision "
        f"{auto_m['ap']:.2f}, clean examples above the median plant: "
        f"{auto_m['clean_above_median']}, planted AUROC (1 vs 0) {auto_m['auroc_planted']:.2f}"
    )

    t0 = time.perf_counter()
    paper = behavior_query(
        m, stats, query=PAPER.query, stat=PAPER.stat, pool=cache, score=PAPER.score
    )
    p_layer = paper.best_layer()
    assert isinstance(p_layer, int)  # no layer set: the query's best by held-out accuracy
    p_top = rank(cache, paper, layer=p_layer, top_k=10)
    times["the paper's method"] = time.perf_counter() - t0
    p_found = sum(by_id[e].extra.get("label") == 1 for e in p_top.ids)
    paper_m = pool_metrics(
        all_scores(cache, paper, p_layer, PAPER.score), labels, n_boot=500, coding="planted"
    )
    print(
        f"\nfor comparison, the paper's method as its authors ran it ({PAPER}) at layer "
        f"{p_layer} (its held-out "
        f"accuracy {(paper.cv or {})[p_layer]:.2f}): {p_found} of 10 planted in the top-10, "
        f"precision@{k} {paper_m['p_at_k']:.2f} [{paper_m['p_at_k_ci'][0]:.2f}, "
        f"{paper_m['p_at_k_ci'][1]:.2f}], AP {paper_m['ap']:.2f}, "
        f"planted AUROC {paper_m['auroc_planted']:.2f}"
    )
    t0 = time.perf_counter()
    base = baselines(cache, stats, examples, labels)
    times["text search and RepSim"] = time.perf_counter() - t0
    auto_sweep = layer_sweep(cache, sel.query, labels, coding="planted")
    paper_sweep = layer_sweep(cache, paper, labels, coding="planted")
    rep = base["repsim"]
    rep["sweep"] = layer_sweep(
        cache, rep.pop("query"), labels, score=REPSIM.score, coding="planted"
    )
    plot = out / "layer_sweep.png"
    auto_label = f"auto: {sel.method}"
    if sel.ensemble is not None:  # the curve is its best method's; the dashed line, the ensemble
        auto_label = f"auto (ensemble of {len(sel.ensemble.members)}), best method: {sel.method}"
    plot_sweep(
        {
            auto_label: (auto_sweep, sel.layer, auto_m["p_at_k"]),
            f"paper: {PAPER}": (paper_sweep, p_layer, paper_m["p_at_k"]),
            f"RepSim: {REPSIM}": (rep["sweep"], rep["layer"], rep["p_at_k"]),
        },
        plot,
        f"{m.name}: empathy plants among {len(cache)} examples (k = {k})",
    )
    print(f"precision@k per layer: {plot}")
    print("time per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    summary: dict[str, Any] = {
        "model": m.name,
        "auto": {
            "method": str(sel.method),
            "layer": sel.layer,
            "members": [
                {"method": f"{q.rule}|{q.stat}|{q.score}", "layer": q.layer}
                for q in sel.ensemble.members
            ]
            if sel.ensemble is not None
            else [],
            "top10": list(zip(top.ids, top.scores.tolist(), strict=True)),
            "planted_in_top10": found,
            **auto_m,
            "sweep": auto_sweep,
        },
        "paper": {
            "method": str(PAPER),
            "layer": p_layer,
            "planted_in_top10": p_found,
            **paper_m,
            "sweep": paper_sweep,
        },
        **base,
        "candidates": sel.table,
        "times_s": times,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
