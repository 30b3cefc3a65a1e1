"""Planted recovery: every method at every layer, the pre-chosen layer, intervals, baselines."""

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lensattr.bench.grid import (
    choose,
    cv_accuracy,
    grid_layer,
    interval,
    planted_metrics,
    pool_moments,
    score_method,
)
from lensattr.bench.run import BenchConfig, _save_json, pool_rows, say, subpools
from lensattr.bench.trak import cosine_scores


def _trak_cv(t: torch.Tensor, c: torch.Tensor, folds: int = 2) -> float:
    n, hits = len(t), 0
    for k in range(folds):
        test = torch.arange(k, n, folds)
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        v = (t[train] - c[train]).mean(0)
        hits += int((cosine_scores(t[test], v) > cosine_scores(c[test], v)).sum())
    return hits / n


def planted_recovery(cfg: BenchConfig, h: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run (or resume) the grid at every layer and assemble the per-behaviour results."""
    sub = subpools(h)
    layers = h["layers"]
    per_layer: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for la in tqdm(layers, desc="grid layers"):
        f = out / "grid" / f"layer-{la}.json"
        if not f.exists():
            say(f"scoring every method at layer {la}")
            _save_json(f, grid_layer(pool_rows(h, la), h["queries"], h["personas"], sub, la, cfg.k))
        per_layer[la] = json.loads(f.read_text())
    h["costs"].data["grid_scoring"] = h["costs"].data.get("grid_scoring", 0.0) + (
        time.perf_counter() - t0
    )
    results: dict[str, Any] = {}
    rows_cache: dict[int, dict[str, torch.Tensor]] = {}
    for b in h["behaviours"]:
        idx, labels = sub[b.name]
        k = min(cfg.k, int((labels == 1).sum()))
        res: dict[str, Any] = {
            "n_clean": int((labels == -1).sum()),
            "n_plants": {"1": int((labels == 1).sum()), "0": int((labels == 0).sum())},
            "k": k,
            "methods": {},
        }
        names = list(per_layer[layers[0]][b.name])
        for m in names:
            by_layer = {la: per_layer[la][b.name][m] for la in layers}
            best = choose(by_layer)
            if best not in rows_cache:
                rows_cache[best] = pool_rows(h, best)
            s = score_method(
                m, best, rows_cache[best], h["queries"][b.name], h["personas"][b.name], idx
            )
            res["methods"][m] = {
                "layers": {str(la): v for la, v in by_layer.items()},
                "chosen_layer": best,
                **by_layer[best],
                "auroc_ci": interval(s, labels, cfg.n_boot),
            }
        if h["trak"] is not None:
            tr = h["trak"]
            q = tr["queries"][b.name]
            s = cosine_scores(tr["pool"][idx], (q["t"] - q["c"]).mean(0))
            met = planted_metrics(s, labels, k)
            met["cv"] = _trak_cv(q["t"], q["c"])
            res["methods"]["trak"] = {
                **met,
                "chosen_layer": None,
                "layers": {},
                "auroc_ci": interval(s, labels, cfg.n_boot),
            }
        rand = []
        for seed in range(cfg.random_seeds):
            gen = torch.Generator().manual_seed(seed)
            rand.append(planted_metrics(torch.rand(len(idx), generator=gen), labels, k))
        res["methods"]["random"] = {
            key: float(torch.tensor([r[key] for r in rand]).mean()) for key in rand[0]
        }
        res["methods"]["random"].update(
            {
                "cv": 0.5,
                "chosen_layer": None,
                "layers": {},
                "auroc_sd": float(torch.tensor([r["auroc"] for r in rand]).std()),
            }
        )
        ranked = sorted(
            (m for m in res["methods"] if m != "random"), key=lambda m: -res["methods"][m]["cv"]
        )
        res["best_by_cv"] = ranked[0]
        results[b.name] = res
    return results


__all__ = ["planted_recovery", "cv_accuracy", "pool_moments"]
