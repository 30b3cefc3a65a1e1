"""How would ``auto`` have chosen under other criteria? Each rule's choice beside its precision@k.

    python benchmarks/choice_study.py --bench runs/pool          # a lensattr bench output
    python benchmarks/choice_study.py --cache C --pairs P.safetensors --labels L.json --name X
    python benchmarks/choice_study.py ... --in-sample      # pairs inside the pool's moments
    python benchmarks/choice_study.py ... --fold-in        # each fold's held-out sides only
    python benchmarks/choice_study.py ... --cells OUT.json --layer-sets   # reuse --out's cells

For every candidate ``psi|stat|score`` at every cached layer this scores the held-out folds exactly
as :func:`lensattr.select` does (:func:`lensattr.criterion.fold_scores`, pairs and unlabelled pool
only) and computes several criteria from the same fold scores; then, for diagnosis only, it ranks
the pool with the candidate fitted on all pairs and reads the plant labels for precision@k. Each
rule chooses as ``select`` does (the method with the best criterion averaged over layers, then its
best layer) and the table prints the precision@k of what it chose.

``--bench`` reads a ``lensattr bench`` output directory (``cache/``, ``pairs/{b}.safetensors``,
``pool-labels.json``: each behaviour ranked in the clean corpus plus its own plants);
``--labels`` is a JSON list of one label per cache row (1 behaviour, 0 decoy, -1 clean).
``--in-sample`` puts every pair side into the pool's moments, so the held-out treatments are
scored in sample, as the pool's own behaviour examples are in the final ranking.

The row "diagnosis: AP, label-1 rows not negatives" is no rule ``select`` could follow: it reads
the labels to leave the pool's own behaviour examples out of the criterion's negatives, which
tells whether those examples (unlabelled, so counted against a method that ranks them high)
are what misled the choice.
"""

import argparse
import importlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import lensattr
from lensattr.criterion import heldout_ap, heldout_auroc, heldout_log_rank
from lensattr.metrics import pool_metrics
from lensattr.moments import Moments, pool_moments
from lensattr.select import offered

S = importlib.import_module("lensattr.criterion")  # where fold_scores reads the pool's moments


def _ap_pu(pool: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    """``select``'s AP with the pool's share of behaviour examples estimated from the scores and
    taken out of the negatives (positive-unlabelled learning): ``pi`` = the smallest ratio, over
    the held-out treatments' scores ``tau``, of the pool's fraction at or above ``tau`` to the
    treatments' (an upper bound on the share, tight where only behaviour examples score so
    high); above the ``j``-th treatment, ``pi n j / m`` pool rows are taken to be the behaviour's.
    With a few held-out treatments a fold the estimate is coarse: one treatment above every pool
    row makes it 0 (then this is ``select``'s AP).
    """
    n, m = len(pool), len(t)
    ts = t.double().sort(descending=True).values
    above = (pool.double()[None, :] >= ts[:, None]).sum(1).double()
    j = torch.arange(1, m + 1, dtype=torch.float64)
    pi = float((above / n / (j / m)).min().clamp(0, 1))
    neg = (above - pi * n * j / m).clamp(min=0) + (c.double()[None, :] >= ts[:, None]).sum(1)
    return float((j / (j + neg)).mean())


def criteria(fs: Any, labels: torch.Tensor) -> dict[str, float]:
    """Every criterion of one candidate at one layer, averaged over the folds. ``ap_oracle``
    is a diagnosis, not a rule ``select`` could use: ``select``'s criterion with the pool's own
    behaviour examples (label 1, read from ``labels``) left out of the negatives."""
    out: dict[str, list[float]] = defaultdict(list)
    for f in range(len(fs.tests)):
        pool, t, c = fs.heldout(f)
        neg = torch.cat([pool, c])
        out["ap_all"].append(heldout_ap(t, neg))
        out["ap_oracle"].append(heldout_ap(t, torch.cat([pool[labels != 1], c])))
        out["ap_pool"].append(heldout_ap(t, pool))
        out["ap_ctrl"].append(heldout_ap(t, c))
        out["auc_ctrl"].append(heldout_auroc(t, c))
        out["auc_pool"].append(heldout_auroc(t, pool))
        out["log_rank"].append(heldout_log_rank(t, neg))
        out["ap_pu"].append(_ap_pu(pool, t, c))
    return {k: sum(v) / len(v) for k, v in out.items()} | {"accuracy": fs.accuracy()}


SELECT = "select: log-rank among pool + controls x AUROC vs controls"
RULES: dict[str, Callable[[dict[str, float]], float]] = {
    SELECT: lambda c: c["log_rank"] * c["auc_ctrl"],
    "select before 2026-11-30: AP among pool + controls": lambda c: c["ap_all"],
    "AP among pool x AUROC vs controls": lambda c: c["ap_pool"] * c["auc_ctrl"],
    "min(AP among pool, AP vs controls)": lambda c: min(c["ap_pool"], c["ap_ctrl"]),
    "AUROC vs pool x AUROC vs controls": lambda c: c["auc_pool"] * c["auc_ctrl"],
    "log-rank among pool + controls": lambda c: c.get("log_rank"),
    "AP, pool's behaviour share estimated (PU)": lambda c: c.get("ap_pu"),
}


def choose(cells: list[dict[str, Any]], rule: Callable[[dict[str, float]], float]) -> dict:
    """The cell ``select``'s two-stage choice (:func:`lensattr.criterion.choose`) picks when
    ``rule`` is the criterion."""
    return S.choose([{**c, "criterion": rule(c)} for c in cells])


def with_pairs_in_moments(ps: Any) -> Callable[..., Moments]:
    """A ``pool_moments`` whose moments also hold every pair side of ``ps``."""

    def moments(cache: Any, stat: str, layer: int) -> Moments:
        return _plus(pool_moments(cache, stat, layer), torch.cat(ps.sides(stat, layer)))

    return moments


def _plus(m: Moments, x: torch.Tensor) -> Moments:
    """The moments ``m`` with the rows ``x`` added."""
    x = x.double()
    n = m.n + len(x)
    s1 = m.mean * m.n + x.sum(0)
    s2 = m.cov * (m.n - 1) + m.n * torch.outer(m.mean, m.mean) + x.T @ x
    mu = s1 / n
    return Moments(mu, (s2 - n * torch.outer(mu, mu)) / (n - 1), n)


def fold_in_scores(ps: Any, cache: Any, methods: list, rows: Any) -> Iterator[Any]:
    """:func:`lensattr.criterion.fold_scores` with each fold's held-out sides in the pool's
    moments (``--fold-in``): fold ``f``'s query is fitted, and its pool and held-out sides scored,
    with the moments of the pool plus those sides only. Only the held-out rows of ``treatment``
    and ``control`` are filled (``FoldScores`` reads no others)."""
    n = ps.n_pairs
    split = S.interleaved_folds(n)  # select's folds
    tests, folds = [te for te, _ in split], len(split)
    pool_rows = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows).long()
    for m in methods:
        psi, score = S.get_psi(m.psi), S.get_score(m.score)
        for layer in cache.layers:
            x = cache.stat(m.stat, layer)[pool_rows].float()
            t, c = ps.sides(m.stat, layer)
            base = pool_moments(cache, m.stat, layer)
            sx = torch.empty(len(x), folds)
            st, sc = torch.full((n, folds), torch.nan), torch.full((n, folds), torch.nan)
            for f, (te, train) in enumerate(split):
                mom = _plus(base, torch.cat([t[te], c[te]]))
                q = S.fit(psi, t[train], c[train], mom if psi.uses_pool else None)[:, None]
                ctx = lensattr.moments.ScoreContext(pool=mom)
                sx[:, f] = S._scores(score, x, q, ctx)[:, 0]
                st[te, f] = S._scores(score, t[te], q, ctx)[:, 0]
                sc[te, f] = S._scores(score, c[te], q, ctx)[:, 0]
            yield S.FoldScores(m, layer, sx, st, sc, tests)


def study(
    cache: Any, ps: Any, rows: Any, labels: torch.Tensor, in_sample: bool, fold_in: bool = False
) -> list[dict]:
    methods = S.candidates(cache.stats)  # every candidate, whatever select would leave out
    if len(labels) > S.POOL_SAMPLE:  # select would score a sample: labels no longer line up
        raise SystemExit(f"choice_study: pools over {S.POOL_SAMPLE} rows are not supported")
    if fold_in:
        scored = fold_in_scores(ps, cache, methods, rows)
    else:
        scored = S.fold_scores(ps, cache, methods, cache.layers, rows=rows)
    if in_sample:
        moments = with_pairs_in_moments(ps)
        S.pool_moments = moments
        real_ctx = S.ScoreContext
        S.ScoreContext = lambda c, s, la: real_ctx(pool=moments(c, s, la))
    try:
        cells = [
            {"method": str(fs.method), "layer": fs.layer, **criteria(fs, labels)} for fs in scored
        ]
    finally:
        S.pool_moments, S.ScoreContext = pool_moments, lensattr.moments.ScoreContext
    idx = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows).long()
    queries: dict[str, Any] = {}
    for cell in cells:
        m = S.Method.parse(cell["method"])
        if cell["method"] not in queries:
            queries[cell["method"]] = lensattr.behavior_query(
                None, ps, psi=m.psi, stat=m.stat, score=m.score, pool=cache, layers=cache.layers
            )
        r = lensattr.rank(cache, queries[cell["method"]], layer=cell["layer"], rows=idx, top_k=None)
        cell.update({k: pool_metrics(r.scores_of(idx), labels)[k] for k in ("p_at_k", "ap")})
    return cells


def layer_sets(cache: Any, ps: Any, rows: Any, labels: torch.Tensor, method: str) -> dict:
    """``method`` at its best layer and at the mean of its scores over a set of layers: its
    3 and 5 layers of highest criterion, and every layer. The criterion of a set comes from the
    mean of its layers' fold scores (the same folds), its P@k from ``rank(..., layer=layers)``."""
    m = S.Method.parse(method)
    fss = {fs.layer: fs for fs in S.fold_scores(ps, cache, [m], cache.layers, rows=rows)}
    key = {la: (fs.criterion(), fs.accuracy(), la) for la, fs in fss.items()}  # select's order
    by_crit = sorted(key, key=key.__getitem__, reverse=True)
    idx = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows).long()
    q = lensattr.behavior_query(
        None, ps, psi=m.psi, stat=m.stat, score=m.score, pool=cache, layers=cache.layers
    )
    out = {}
    for name, layers in {
        "best layer": by_crit[:1],
        "top 3": by_crit[:3],
        "top 5": by_crit[:5],
        "all": by_crit,
    }.items():
        mean = S.mean_over_layers([fss[la] for la in layers])
        s = lensattr.rank(cache, q, layer=layers, rows=idx, top_k=None).scores_of(idx)
        out[name] = {"layers": layers, "criterion": mean.criterion(), **pool_metrics(s, labels)}
    return out


def offered_by_select(cell: dict[str, Any], cache: Any) -> bool:
    """Whether :func:`lensattr.select` offers this candidate by default on ``cache``."""
    score = lensattr.registry.get_score(S.Method.parse(cell["method"]).score)
    return offered(score, len(cache), cache.d_model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", help="a lensattr bench output directory")
    ap.add_argument("--cache")
    ap.add_argument("--pairs", help="the pairs' saved PairStats (.safetensors)")
    ap.add_argument("--labels", help="JSON list: one label per cache row")
    ap.add_argument("--name", default="behaviour")
    moments = ap.add_mutually_exclusive_group()
    moments.add_argument("--in-sample", action="store_true", help="every pair in the moments")
    moments.add_argument("--fold-in", action="store_true", help="each fold's sides in them")
    ap.add_argument("--out", help="also write every cell as JSON here")
    ap.add_argument("--cells", help="read the cells from an earlier --out instead of scoring")
    ap.add_argument(
        "--layer-sets", action="store_true", help="select's method over sets of its layers"
    )
    args = ap.parse_args()
    setups: dict[str, tuple[Any, Any, Any, torch.Tensor]] = {}
    if args.bench:
        base = Path(args.bench)
        cache = lensattr.open_cache(base / "cache")
        owner = json.loads((base / "pool-labels.json").read_text())
        for f in sorted((base / "pairs").glob("*.safetensors")):
            idx = [k for k, i in enumerate(cache.ids) if owner[i][0] in ("clean", f.stem)]
            labels = torch.tensor([owner[cache.ids[k]][1] for k in idx])
            setups[f.stem] = (cache, lensattr.PairStats.load(f), idx, labels)
    else:
        cache = lensattr.open_cache(args.cache)
        labels = torch.tensor(json.loads(Path(args.labels).read_text()))
        setups[args.name] = (cache, lensattr.PairStats.load(args.pairs), None, labels)
    if args.cells:
        cells = json.loads(Path(args.cells).read_text())
    else:
        cells = {
            name: study(*setup, args.in_sample, args.fold_in) for name, setup in setups.items()
        }
    if args.out:
        Path(args.out).write_text(json.dumps(cells))
    names = list(cells)
    offered = {n: [c for c in cells[n] if offered_by_select(c, setups[n][0])] for n in names}
    for title, pool in (("every candidate", cells), ("the candidates select offers", offered)):
        print(
            f"{'rule (P@k of its choice), ' + title:60s}" + "".join(f"{n[:11]:>12s}" for n in names)
        )
        for rule_name, rule in RULES.items():
            if not all(rule(c) is not None for n in names for c in cells[n][:1]):
                continue  # cells written before this criterion was recorded
            row = [choose(pool[n], rule)["p_at_k"] for n in names]
            print(f"{rule_name:60s}" + "".join(f"{p:12.2f}" for p in row))
    if all("ap_oracle" in c for n in names for c in cells[n]):
        row = [choose(offered[n], lambda c: c["ap_oracle"])["p_at_k"] for n in names]
        print(f"{'diagnosis: AP, label-1 rows not negatives':60s}" + "".join(
            f"{p:12.2f}" for p in row))  # fmt: skip
    print(f"{'hindsight (best cell)':60s}" + "".join(
        f"{max(c['p_at_k'] for c in cells[n]):12.2f}" for n in names))  # fmt: skip
    choice = {n: choose(offered[n], RULES[SELECT]) for n in names}
    for n in names:
        c = choice[n]
        print(f"{n}: select chooses {c['method']} L{c['layer']} (P@k {c['p_at_k']:.2f})")
    if not args.layer_sets:
        return
    head = "select's method over its layers"
    print(f"\n{head:34s}{'criterion':>10s}{'P@k':>6s}{'AP':>7s}")
    for n in names:
        sets = layer_sets(*setups[n], choice[n]["method"])
        print(f"{n} ({choice[n]['method']})")
        # select's third stage (lensattr.criterion.layer_set): the set if its criterion is higher
        top3_wins = sets["top 3"]["criterion"] > sets["best layer"]["criterion"]
        chosen = "top 3" if top3_wins else "best layer"
        for name, r in sets.items():
            mark = "  <- select" if name == chosen else ""
            print(f"  {name:32s}{r['criterion']:10.3f}{r['p_at_k']:6.2f}{r['ap']:7.3f}{mark}")


if __name__ == "__main__":
    main()
