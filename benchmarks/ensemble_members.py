"""Which methods should ``auto``'s ensemble average? Duplicate and near-duplicate members.

    python -m benchmarks.ensemble_members --work runs/gen [--part 0 --parts 2]   # per pool
    python -m benchmarks.ensemble_members --work runs/gen --report               # the means

Reads a finished generalisation study (``benchmarks/generalisation.py``: its plan, pools,
pairs and per-pool criterion tables, ``cells/*.json``) and ranks each pool with ensembles
built two ways from the same criterion order (methods by criterion averaged over layers,
each at its best layer, as ``select`` builds its ensemble):

* ``topN``: the first N methods (``auto`` today is ``top30``);
* ``dedupe{rho}_{N}``: greedy; a method is skipped when its standardised pool scores
  correlate above ``rho`` with a member already in.

This study found the score ``projection`` (``dot`` divided by the query's norm: it ranked every
pool exactly as ``dot``, so ``auto`` counted each ``dot`` method twice); it is gone from the
library, so ``topN`` no longer holds duplicates of that kind.

Labels (the plan's plants) are read for P@k only. ``--report`` prints the mean P@k of each
variant over behaviours, and of each family with its constant fitted on the other behaviours
(left one behaviour out). Public API only; per-pool results go to ``WORK/members/``.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import lensattr
from benchmarks.generalisation import _all_scores, _p_at_k
from lensattr.criterion import best_rows, method_scores
from lensattr.ensemble import standardised

SIZES = (20, 30, 40)
RHOS = (0.99, 0.95, 0.9, 0.8)
DEDUPE_SIZES = (5, 10, 15, 20, 30)


def _pool_scores(
    work: Path, plan: dict[str, Any], res: dict[str, Any]
) -> tuple[Any, list[str], torch.Tensor]:
    """A function giving each method's standardised scores of the pool, the criterion order,
    and the pool's labels."""
    name, seed = res["behaviour"], res["seed"]
    cache = lensattr.open_cache(work / "pools" / f"{name}-{seed}")
    ps = lensattr.PairStats.load(work / "pairs" / f"{name}.safetensors")
    pos = set(plan["behaviours"][name]["pos"])
    labels = torch.tensor([int(i in pos) for i in cache.ids])
    table = [{k: c[k] for k in ("method", "layer", "criterion", "accuracy")} for c in res["cells"]]
    means, best = method_scores(table), best_rows(table)
    order = sorted(means, key=lambda m: means[m], reverse=True)
    memo: dict[str, torch.Tensor] = {}

    def z(m: str) -> torch.Tensor:
        if m not in memo:
            meth = lensattr.Method.parse(m)
            q = lensattr.behavior_query(
                None, ps, query=meth.query, stat=meth.stat, pool=cache, score=meth.score
            )
            # a non-finite score ranks last, as in rank()
            memo[m] = standardised(_all_scores(cache, q, best[m]["layer"])).nan_to_num(nan=-10.0)
        return memo[m]

    return z, order, labels


def score_pool(work: Path, plan: dict[str, Any], res: dict[str, Any]) -> dict[str, float]:
    z, order, labels = _pool_scores(work, plan, res)

    def p_at_k(members: list[str]) -> float:
        return _p_at_k(torch.stack([z(m) for m in members]).mean(0).float(), labels)

    corrs: dict[tuple[str, str], float] = {}  # each pair once, whatever the threshold

    def corr(a: str, b: str) -> float:
        if (a, b) not in corrs:
            corrs[a, b] = float(torch.corrcoef(torch.stack([z(a), z(b)]))[0, 1])
        return corrs[a, b]

    out: dict[str, float] = {}
    for n in SIZES:
        out[f"top{n}"] = p_at_k(order[:n])
    for rho in RHOS:
        chosen: list[str] = []
        for m in order:
            if len(chosen) == max(DEDUPE_SIZES):
                break
            if all(corr(m, c) < rho for c in chosen):
                chosen.append(m)
        for n in DEDUPE_SIZES:
            out[f"dedupe{rho}_{n}"] = p_at_k(chosen[:n])
    return out


def report(work: Path) -> None:
    by: dict[str, list[dict[str, float]]] = defaultdict(list)
    for f in sorted((work / "members").glob("*.json")):
        r = json.loads(f.read_text())
        by[r["behaviour"]].append(r["p_at_k"])
    per = {
        v: {b: statistics.mean(r[v] for r in rs) for b, rs in by.items()}
        for v in next(iter(by.values()))[0]
    }
    print(f"{len(by)} behaviours, {sum(len(rs) for rs in by.values())} pools")
    for v, vals in per.items():
        print(f"{v:16s} {statistics.mean(vals.values()):.3f}")
    for family in ("top", "dedupe"):
        members = [v for v in per if v.startswith(family)]
        left_out = []
        for b in by:
            fitted = max(members, key=lambda v: statistics.mean(per[v][x] for x in by if x != b))
            left_out.append(per[fitted][b])
        print(
            f"{family:8s} constant fitted left one behaviour out: {statistics.mean(left_out):.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/gen", help="a finished generalisation study")
    ap.add_argument("--part", type=int, default=0, help="score every --parts-th pool from this")
    ap.add_argument("--parts", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print the means of the scored pools")
    args = ap.parse_args()
    work = Path(args.work)
    if args.report:
        report(work)
        return
    (work / "members").mkdir(exist_ok=True)
    plan = json.loads((work / "plan.json").read_text())
    for f in sorted((work / "cells").glob("*.json"))[args.part :: args.parts]:
        out = work / "members" / f.name
        if out.exists():
            continue
        res = json.loads(f.read_text())
        row = {
            "behaviour": res["behaviour"],
            "seed": res["seed"],
            "p_at_k": score_pool(work, plan, res),
        }
        out.write_text(json.dumps(row, indent=1))
        print(f.stem, f"top30 {row['p_at_k']['top30']:.2f}", flush=True)


if __name__ == "__main__":
    main()
