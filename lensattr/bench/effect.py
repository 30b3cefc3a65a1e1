"""The fine-tuning effect (the paper's protocol): top-k per method -> LoRA -> trait score."""

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from lensattr import Ensemble, Method, Query, behavior_query, rank
from lensattr.bench.finetune import lora_finetune, trait_score
from lensattr.bench.report import layer_label
from lensattr.bench.run import BenchConfig, save_json, say, subpools
from lensattr.data import load_examples
from lensattr.registry import get_score

BASELINES = ("auto", "paper", "random", "trak", "persona")
"""Fine-tuning methods besides any ``query|stat|score`` of the grid."""


def _fitted(h: dict[str, Any], name: str, method: str, layer: Any) -> Query:
    """``method``'s query for behaviour ``name``, fitted on its pairs against the pool, chosen at
    ``layer`` (a saved layer set comes back from JSON as a list; ``None``: its own best)."""
    m = Method.parse(method)
    q = behavior_query(
        None,
        h["pairs"][name],
        query=m.query,
        stat=m.stat,
        layers=h["layers"],
        pool=h["cache"],
        score=m.score,
    )
    if layer is None:
        q.layer = q.best_layer()
    else:
        q.layer = tuple(layer) if isinstance(layer, list) else layer
    return q


def _query_of(method: str, name: str, h: dict[str, Any], ranking: dict[str, Any]) -> Any:
    """What a named method of one behaviour ranks with, as the ranking step saved it: ``auto``
    its ensemble (its members rebuilt at their layers) or its one method, ``paper`` at its layer,
    ``persona`` its vector, a ``query|stat|score`` method at the layer its pairs choose."""
    r = ranking[name]
    if method == "persona":
        q = h["personas"][name]
        q.layer = r["baselines"]["persona"]["layer"]
        return q
    if method in ("auto", "paper"):
        chosen = r[method]
        if chosen.get("members"):
            return Ensemble([_fitted(h, name, x["method"], x["layer"]) for x in chosen["members"]])
        return _fitted(h, name, chosen["method"], chosen["layer"])
    return _fitted(h, name, method, None)


def _resolved(method: str, r: dict[str, Any]) -> str:
    """What ``auto`` or ``paper`` ranked with, in words, for the tables."""
    chosen = r[method]
    if method == "auto" and chosen.get("members"):
        return f"mean of {len(chosen['members'])} methods (best: {chosen['method']})"
    return f"{chosen['method']} {layer_label(chosen['layer'])}"


def top_ids(
    method: str, name: str, h: dict[str, Any], ranking: dict[str, Any], k: int, seed: int
) -> list[str]:
    """Pool ids of the top-``k`` of ``method`` in behaviour ``name``'s pool (``random``: a seeded
    sample; ``auto``: its ensemble); ``query|stat|score`` methods use the layer their own query
    pairs choose."""
    idx, _ = subpools(h)[name]
    cache = h["cache"]
    if method == "random":
        ids = [cache.ids[i] for i in idx.tolist()]
        return random.Random(seed).sample(ids, min(k, len(ids)))
    if method == "trak":
        q = h["trak"]["queries"][name]
        rows = h["trak"]["pool"][idx]
        s = get_score("cosine").fn(rows, rows.norm(dim=1), (q["t"] - q["c"]).mean(0), None)
        return [cache.ids[int(idx[i])] for i in torch.topk(s, min(k, len(s))).indices.tolist()]
    return rank(cache, _query_of(method, name, h, ranking), rows=idx, top_k=k).ids


def finetune_effect(
    cfg: BenchConfig, h: dict[str, Any], ranking: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Trait score on ``heldout`` for the base model and, per method and seed, the model
    LoRA-fine-tuned on its top-k (same steps, lr, rank and seeds for every method)."""
    known = {*BASELINES, *(m for r in ranking.values() for m in r["grid"])}
    unknown = [m for m in cfg.ft_methods if m not in known]
    if unknown:  # fail before the first (minutes-long) fine-tune, not after
        raise ValueError(f"unknown fine-tuning methods {unknown}; known: {sorted(known)}")
    table = {ex.id: ex for ex in load_examples(out / "pool.jsonl")}
    results: dict[str, Any] = {}
    for b in h["behaviours"]:
        if b.name not in cfg.ft_behaviours:
            continue
        heldout = b.heldout[: cfg.ft_heldout]
        res: dict[str, Any] = {"n_heldout": len(heldout), "methods": {}}
        f = out / "ft" / b.name / "base.json"
        if not f.exists():
            say(f"{b.name}: trait score of the base model on {len(heldout)} heldout pairs")
            save_json(f, {"score": trait_score(h["model"], heldout, max_length=cfg.max_length)})
        res["base"] = json.loads(f.read_text())["score"]
        for m in cfg.ft_methods:
            run_m = m
            if (run_m == "trak" and h["trak"] is None) or (
                run_m == "persona" and h["personas"].get(b.name) is None
            ):
                continue
            scores = []
            for seed in cfg.ft_seeds:
                f = out / "ft" / b.name / f"{run_m.replace('|', '+')}-s{seed}.json"
                ids = top_ids(m, b.name, h, ranking, cfg.k, seed)
                saved = json.loads(f.read_text()) if f.exists() else None
                # a saved fine-tune is reused only for the same top-k: after a change to the
                # method (e.g. auto choosing differently) it would be a stale row
                if saved is None or saved.get("ids") != ids:
                    say(f"{b.name}: LoRA on the top-{cfg.k} of {run_m} (seed {seed})")
                    t0 = time.perf_counter()
                    tuned = lora_finetune(
                        h["model"],
                        [table[i] for i in ids],
                        steps=cfg.ft_steps,
                        lr=cfg.ft_lr,
                        rank=cfg.ft_rank,
                        seed=seed,
                        batch_size=4,
                        max_length=cfg.max_length,
                    )
                    sc = trait_score(tuned, heldout, max_length=cfg.max_length)
                    labels = [h["owner"][i][1] for i in ids]
                    saved = {
                        "score": sc,
                        "ids": ids,
                        "n_label1": labels.count(1),
                        "n_label0": labels.count(0),
                        "seconds": time.perf_counter() - t0,
                    }
                    save_json(f, saved)
                scores.append(saved)
            vals = torch.tensor([s["score"] for s in scores], dtype=torch.float64)
            res["methods"][m] = {
                "scores": vals.tolist(),
                "mean": float(vals.mean()),
                "sd": float(vals.std()) if len(vals) > 1 else 0.0,
                "n_label1_selected": [s["n_label1"] for s in scores],
                "n_label0_selected": [s["n_label0"] for s in scores],
                **({"resolved": _resolved(m, ranking[b.name])} if m in ("auto", "paper") else {}),
            }
        # every fine-tune + score of this behaviour that ran, this session or an earlier one
        res["seconds"] = sum(
            json.loads(x.read_text()).get("seconds", 0.0)
            for x in (out / "ft" / b.name).glob("*-s*.json")
        )
        h["costs"].record(f"finetune_{b.name}", res["seconds"])
        results[b.name] = res
    return results
