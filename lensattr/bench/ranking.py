"""Each behaviour ranked inside the pool: auto, every fixed method at every layer, baselines.

For a behaviour ``b`` the pool is the whole clean corpus plus ``b``'s own plants (label 1: the
behaviour, label 0: decoys with the same prompts). Everything is computed through lensattr's
public API:

- ``auto``: :func:`lensattr.select` on ``b``'s query pairs and the unlabelled pool;
- every method of the grid (``query|stat|score``, default every registered candidate) at every
  layer: :func:`lensattr.behavior_query` + :func:`lensattr.rank` over the pool rows;
- the paper's method as its authors ran it at the layer its own held-out accuracy chooses
  (``Query.best_layer``);
- baselines: text search (:mod:`lensattr.baselines`: every lexical kind of the replies against
  the query pairs' replies, and ``lexical``, the kind chosen without labels by ``auto``'s
  criterion), RepSim (:data:`~lensattr.baselines.REPSIM` at the layer ``auto``'s criterion
  chooses for it), persona vectors (``query="persona"``), TRAK (projected weight gradients
  scored with the registered cosine), random selection.

Every ranking is judged by :func:`lensattr.pool_metrics` (precision@k of label-1 plants against
everything else, k = their number, average precision, clean examples above the median plant,
planted AUROC as a secondary column). Labels are read here, for the metrics only.
"""

import json
from pathlib import Path
from typing import Any

import torch

from lensattr import PAPER, Method, behavior_query, candidates, pool_metrics, rank, select
from lensattr.baselines import LEXICAL, lexical_scores, lexical_select, repsim_select
from lensattr.bench.run import BenchConfig, save_json, say, subpools
from lensattr.registry import get_score


def _scores(cache: Any, query: Any, layer: Any, score: str, idx: torch.Tensor) -> torch.Tensor:
    """Scores of the pool rows ``idx`` (in that order) under ``query`` at ``layer`` (or a layer
    set) with ``score``."""
    return rank(cache, query, layer=layer, score=score, rows=idx, top_k=None).scores_of(idx)


def lexical_and_repsim(
    cfg: BenchConfig, h: dict[str, Any], name: str, idx: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """The baselines a user tries first, on the behaviour's pool: ``lexical`` (the kind
    :func:`~lensattr.baselines.lexical_select` chooses from the query pairs' replies and the
    pool's, with its criterion table), each lexical kind, and ``repsim`` at the layer (or layer
    set) ``auto``'s criterion chooses for it, with its P@k at every layer."""
    cache, layers = h["cache"], h["layers"]
    pairs = next(b for b in h["behaviours"] if b.name == name).query[: cfg.n_query]
    texts = [h["replies"][cache.ids[i]] for i in idx.tolist()]
    treatment, control = [p.treatment for p in pairs], [p.control for p in pairs]
    kind, table = lexical_select(texts, treatment, control)
    kinds = {
        k: pool_metrics(
            lexical_scores(texts, treatment, control, k),
            labels,
            n_boot=cfg.n_boot,
            coding="planted",
        )
        for k in LEXICAL
    }
    rs = repsim_select(cache, h["pairs"][name], layers=layers, rows=idx)
    return {
        "lexical": {"kind": kind, **kinds[kind], "table": table},
        **{f"lexical {k}": m for k, m in kinds.items()},
        "repsim": {
            "method": str(rs.method),
            "layer": rs.layer,
            **pool_metrics(
                _scores(cache, rs.query, rs.layer, "cosine", idx),
                labels,
                n_boot=cfg.n_boot,
                coding="planted",
            ),
            "layers": {
                str(la): pool_metrics(
                    _scores(cache, rs.query, la, "cosine", idx), labels, coding="planted"
                )["p_at_k"]
                for la in layers
            },
        },
    }


def rank_behaviour(cfg: BenchConfig, h: dict[str, Any], name: str) -> dict[str, Any]:
    """Auto's choice, every method's metrics at every layer, and the baselines for one behaviour."""
    cache, ps = h["cache"], h["pairs"][name]
    idx, labels = subpools(h)[name]
    layers = h["layers"]
    methods = [Method.parse(m) for m in cfg.methods] if cfg.methods else candidates(cache.stats)
    if PAPER not in methods:
        methods.append(PAPER)
    sel = select(None, cache, ps, methods=methods, layers=layers, rows=idx)
    grid: dict[str, dict[str, Any]] = {}
    queries: dict[tuple[str, str, str], Any] = {}
    for m in methods:
        q = queries.get((m.query, m.stat, m.score))
        if q is None:
            q = behavior_query(
                None, ps, query=m.query, stat=m.stat, layers=layers, pool=cache, score=m.score
            )
            queries[(m.query, m.stat, m.score)] = q
        grid[str(m)] = {
            "layers": {
                str(la): pool_metrics(_scores(cache, q, la, m.score, idx), labels, coding="planted")
                for la in layers
            },
            "cv": {str(la): (q.cv or {}).get(la) for la in layers},
            "query_layer": q.best_layer(),
        }
    crit = {(r["method"], r["layer"]): r for r in sel.table}
    for name_m, res in grid.items():
        for la, met in res["layers"].items():
            met["criterion"] = crit[(name_m, int(la))]["criterion"]
    out: dict[str, Any] = {
        "n_pool": len(idx),
        "n_clean": int((labels == -1).sum()),
        "n_plants": {"1": int((labels == 1).sum()), "0": int((labels == 0).sum())},
        "auto": {"method": str(sel.method), "layer": sel.layer, "seconds": sel.seconds},
        "grid": grid,
        "baselines": lexical_and_repsim(cfg, h, name, idx, labels),
    }
    if sel.ensemble is not None:  # auto ranks with its ensemble of top methods
        out["auto"]["members"] = [
            {"method": f"{q.rule}|{q.stat}|{q.score}", "layer": q.layer}
            for q in sel.ensemble.members
        ]
    out["auto"].update(
        pool_metrics(
            rank(cache, sel, rows=idx, top_k=None).scores_of(idx),
            labels,
            n_boot=cfg.n_boot,
            coding="planted",
        )
    )
    paper = grid[str(PAPER)]
    q_paper = queries[(PAPER.query, PAPER.stat, PAPER.score)]
    out["paper"] = {
        "method": str(PAPER),
        "layer": paper["query_layer"],
        **pool_metrics(
            _scores(cache, q_paper, paper["query_layer"], PAPER.score, idx),
            labels,
            n_boot=cfg.n_boot,
            coding="planted",
        ),
    }
    best = max(
        ((m, int(la), v) for m, r in grid.items() for la, v in r["layers"].items()),
        key=lambda t: (t[2]["p_at_k"], t[2]["ap"]),
    )
    out["hindsight"] = {"method": best[0], "layer": best[1], **best[2]}
    persona = h["personas"].get(name)
    if persona is not None:
        la = persona.best_layer()
        out["baselines"]["persona"] = {
            "layer": la,
            **pool_metrics(_scores(cache, persona, la, "cosine", idx), labels, coding="planted"),
        }
    if h.get("trak") is not None:
        tr = h["trak"]
        q = tr["queries"][name]
        rows = tr["pool"][idx]
        vec = (q["t"] - q["c"]).mean(0)
        s = get_score("cosine").fn(rows, rows.norm(dim=1), vec, None)
        out["baselines"]["trak"] = pool_metrics(s, labels, coding="planted")
    rand = []
    for seed in range(cfg.random_seeds):
        gen = torch.Generator().manual_seed(seed)
        rand.append(pool_metrics(torch.rand(len(idx), generator=gen), labels, coding="planted"))
    out["baselines"]["random"] = {
        key: float(torch.tensor([float(r[key]) for r in rand]).mean())
        for key in ("p_at_k", "ap", "clean_above_median", "auroc_planted")
    }
    return out


def pool_ranking(cfg: BenchConfig, h: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run (or resume) :func:`rank_behaviour` for every behaviour; ``ranking/{b}.json``."""
    results = {}
    for b in h["behaviours"]:
        f = out / "ranking" / f"{b.name}.json"
        if not f.exists():
            say(f"{b.name}: auto choice and every method at every layer")
            save_json(
                f, h["costs"].timed(f"rank_{b.name}", lambda b=b: rank_behaviour(cfg, h, b.name))
            )
        r = json.loads(f.read_text())
        if "lexical" not in r["baselines"]:  # saved before the text-search baselines
            idx, labels = subpools(h)[b.name]
            r["baselines"].update(lexical_and_repsim(cfg, h, b.name, idx, labels))
            save_json(f, r)
        results[b.name] = r
    return results


def summary(ranking: dict[str, Any]) -> dict[str, Any]:
    """The targets: auto within 0.05 of the hindsight-best fixed method, and its mean p@k."""
    within = {b: r["hindsight"]["p_at_k"] - r["auto"]["p_at_k"] <= 0.05 for b, r in ranking.items()}
    n = max(len(ranking), 1)
    return {
        "auto_within_0.05_of_hindsight": sum(within.values()),
        "n_behaviours": len(ranking),
        "within": within,
        "mean_p_at_k": {
            "auto": sum(r["auto"]["p_at_k"] for r in ranking.values()) / n,
            "paper": sum(r["paper"]["p_at_k"] for r in ranking.values()) / n,
            "hindsight": sum(r["hindsight"]["p_at_k"] for r in ranking.values()) / n,
            **{
                b: sum(r["baselines"][b]["p_at_k"] for r in ranking.values()) / n
                for b in ("lexical", "repsim")
            },
        },
        "mean_ap": {
            "auto": sum(r["auto"]["ap"] for r in ranking.values()) / n,
            "paper": sum(r["paper"]["ap"] for r in ranking.values()) / n,
        },
    }


__all__ = ["pool_ranking", "rank_behaviour", "summary"]
