"""``lensattr demo``: the whole method on the embedded SmolLM2 and the bundled data.

Caches the bundled training set (240 clean instruction examples + 24 planted replies of the
``empathy`` trait: 12 that show it, label 1, and their 12 controls, label 0) at every layer,
builds the residual-change query from the bundled query pairs, chooses a layer from the query
pairs alone (held-out accuracy), prints the top-10 examples there and how many planted ones it
found, and saves a layer-sweep plot. For comparison it then does the same with the
residual-difference query (pooled activations), read from the same cache.
"""

import json
import logging
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from lensattr.cache import build_cache
from lensattr.data import load_examples
from lensattr.metrics import auroc, precision_recall_at_k
from lensattr.models import load_model
from lensattr.query import behavior_query
from lensattr.rank import rank

logger = logging.getLogger(__name__)


def bundled(name: str) -> Path:
    """Path of a bundled data file, e.g. ``bundled("demo/train.jsonl")``."""
    return Path(str(files("lensattr") / "bundled" / name))


def layer_sweep(cache: Any, query: Any, labels: torch.Tensor, k: int) -> list[dict[str, Any]]:
    """Planted AUROC (label 1 vs label 0 plants) and precision@k of label-1 plants per layer."""
    planted = labels >= 0
    rows = []
    for layer in query.layers:
        r = rank(cache, query, layer=layer, top_k=None)
        scores = torch.empty(len(cache))
        scores[r.rows] = r.scores
        pos = (labels == 1).long()
        prec, rec = precision_recall_at_k(scores, pos, k)
        rows.append(
            {
                "layer": layer,
                "auroc": auroc(scores[planted], pos[planted]),
                "precision_at_k": prec,
                "recall_at_k": rec,
                "cv": (query.cv or {}).get(layer, float("nan")),
            }
        )
    return rows


def planted_at(
    cache: Any, query: Any, layer: int, labels: torch.Tensor, by_id: dict[str, Any], g: str
) -> tuple[int, float]:
    """(label-1 plants in the top-10, planted AUROC) of one query, layer and score."""
    r = rank(cache, query, layer=layer, g=g, top_k=None)
    scores = torch.empty(len(cache))
    scores[r.rows] = r.scores
    planted = labels >= 0
    found = sum(by_id[e].extra.get("label") == 1 for e in r.ids[:10])
    return found, auroc(scores[planted], (labels == 1).long()[planted])


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["auroc"] for r in rows], marker="o", label="planted AUROC (1 vs 0)")
    ax.plot(layers, [r["precision_at_k"] for r in rows], marker="s", label="precision@k")
    ax.plot(layers, [r["cv"] for r in rows], ls="--", label="query held-out accuracy")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        layers="all",
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    times["cache"] = time.perf_counter() - t0
    assert cache is not None  # a single-process build returns the cache
    print(
        f"cached {len(cache)} examples x {len(cache.layers)} layers x {len(cache.stats)} stats "
        f"({times['cache']:.1f}s)"
    )

    def build_query(psi: str) -> Any:
        return behavior_query(
            m,
            bundled("demo/query.jsonl"),
            psi=psi,
            layers="all",
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
        )

    t0 = time.perf_counter()
    query = build_query("residual_change")
    times["query"] = time.perf_counter() - t0
    print(f"residual-change query from {query.n_pairs} pairs ({times['query']:.1f}s)")

    t0 = time.perf_counter()
    by_id = {ex.id: ex for ex in examples}
    labels = torch.tensor([int(by_id[i].extra.get("label", -1)) for i in cache.ids])
    k = int((labels == 1).sum())
    sweep = layer_sweep(cache, query, labels, k)
    times["rank all layers"] = time.perf_counter() - t0
    layer = query.best_layer()
    cv = query.cv or {}
    top = rank(cache, query, layer=layer, top_k=10)
    print(
        f"\nlayer {layer} (chosen from the query pairs alone: held-out accuracy "
        f"{cv[layer]:.2f}); top-10 of {len(cache)}:"
    )
    for i, (eid, score) in enumerate(zip(top.ids, top.scores.tolist(), strict=True)):
        label = by_id[eid].extra.get("label")
        tag = {1: "PLANT+", 0: "decoy "}.get(int(label) if label is not None else -1, "clean ")
        reply = by_id[eid].response.replace("\n", " ")[:50]
        print(f"{i + 1:>3} {score:+.4f} {tag} {eid[:40]:<40} {reply!r}")
    found = sum(by_id[e].extra.get("label") == 1 for e in top.ids)
    row = next(r for r in sweep if r["layer"] == layer)
    print(f"\nplanted (label 1) in the top-10: {found} of 10 ({k} planted among {len(cache)})")
    print(
        f"at layer {layer}: planted AUROC {row['auroc']:.3f}, precision@{k} "
        f"{row['precision_at_k']:.3f}"
    )
    best = max(sweep, key=lambda r: r["auroc"])
    print(
        f"best layer by planted AUROC (reported, not used to choose): {best['layer']} "
        f"({best['auroc']:.3f})"
    )
    plot = out / "layer_sweep.png"
    plot_sweep(sweep, plot, f"residual-change query, {m.name}")
    print(f"layer-sweep plot: {plot}")

    t0 = time.perf_counter()
    diff = build_query("residual_diff")
    diff_sweep = layer_sweep(cache, diff, labels, k)
    times["comparison: residual-difference query"] = time.perf_counter() - t0
    diff_layer = diff.best_layer()
    diff_top = rank(cache, diff, layer=diff_layer, top_k=10)
    diff_row = next(r for r in diff_sweep if r["layer"] == diff_layer)
    diff_found = sum(by_id[e].extra.get("label") == 1 for e in diff_top.ids)
    centered = planted_at(cache, query, layer, labels, by_id, g="centered_cosine")
    print(
        "\nfor comparison (same cache; each query at its own layer chosen from its pairs):\n"
        f"  residual change, cosine           layer {layer:>2}: {found:>2} of 10 planted in the "
        f"top-10, planted AUROC {row['auroc']:.3f}\n"
        f"  residual change, centered cosine  layer {layer:>2}: {centered[0]:>2} of 10, "
        f"AUROC {centered[1]:.3f}\n"
        f"  residual difference, cosine       layer {diff_layer:>2}: {diff_found:>2} of 10, "
        f"AUROC {diff_row['auroc']:.3f}"
    )
    print("time per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    summary = {
        "model": m.name,
        "layer": layer,
        "top10": list(zip(top.ids, top.scores.tolist(), strict=True)),
        "planted_in_top10": found,
        "sweep": sweep,
        "residual_change_centered": {"planted_in_top10": centered[0], "auroc": centered[1]},
        "residual_diff": {"layer": diff_layer, "planted_in_top10": diff_found, "sweep": diff_sweep},
        "times_s": times,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
