"""How would ``auto`` have chosen under other criteria? Each rule's choice beside its precision@k.

    python -m benchmarks.choice_study --bench runs/pool          # a lensattr bench output
    python -m benchmarks.choice_study --cache C --pairs P.safetensors --labels L.json --name X
    python -m benchmarks.choice_study ... --in-sample      # pairs inside the pool's moments
    python -m benchmarks.choice_study ... --fold-in        # each fold's held-out sides only
    python -m benchmarks.choice_study ... --cells OUT.json --layer-sets   # reuse --out's cells

For every candidate ``query|stat|score`` at every cached layer this scores the held-out folds
exactly as :func:`lensattr.select` does (:func:`lensattr.criterion.fold_scores`, pairs and
unlabelled pool only) and computes several criteria from the same fold scores, each a registered
criterion (:func:`lensattr.register_criterion`) that ``select(criterion=name)`` could choose by;
then, for diagnosis only, it ranks the pool with the candidate fitted on all pairs and reads the
plant labels for precision@k. Each rule chooses as ``select`` does (the method with the best
criterion averaged over layers, then its best layer) and the table prints the precision@k of what
it chose.

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
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lensattr
from lensattr import register_criterion
from lensattr.criterion import (
    DEFAULT_CRITERION,
    POOL_SAMPLE,
    FoldScores,
    Method,
    candidates,
    fold_scores,
    heldout_ap,
    heldout_auroc,
    heldout_log_rank,
    mean_over_layers,
)
from lensattr.criterion import choose as choose_row
from lensattr.metrics import pool_metrics
from lensattr.moments import Moments, pool_moments
from lensattr.registry import get_criterion, get_score
from lensattr.select import offered

Measure = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]
"""``measure(pool, held-out treatments, held-out controls)``: one fold's number."""


def fold_mean(fs: FoldScores, measure: Measure) -> float:
    """``measure`` of each fold's held-out scores, averaged over the folds."""
    vals = [measure(*fs.heldout(f)) for f in range(len(fs.tests))]
    return sum(vals) / len(vals)


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


def _ap_all(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    return heldout_ap(t, torch.cat([p, c]))


def _ap_pool(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    return heldout_ap(t, p)


def _ap_ctrl(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    return heldout_ap(t, c)


def _auc_ctrl(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    return heldout_auroc(t, c)


def _auc_pool(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    return heldout_auroc(t, p)


def _log_rank(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
    return heldout_log_rank(t, torch.cat([p, c]))


@register_criterion("ap_all", description="AP among pool + controls")
def ap_all(fs: FoldScores) -> float:
    """``select``'s criterion before 2026-11-30."""
    return fold_mean(fs, _ap_all)


@register_criterion("ap_pool_x_auroc", description="AP among pool x AUROC vs controls")
def ap_pool_x_auroc(fs: FoldScores) -> float:
    return fold_mean(fs, _ap_pool) * fold_mean(fs, _auc_ctrl)


@register_criterion("min_ap", description="min(AP among pool, AP vs controls)")
def min_ap(fs: FoldScores) -> float:
    return min(fold_mean(fs, _ap_pool), fold_mean(fs, _ap_ctrl))


@register_criterion("auroc_pool_x_auroc", description="AUROC vs pool x AUROC vs controls")
def auroc_pool_x_auroc(fs: FoldScores) -> float:
    return fold_mean(fs, _auc_pool) * fold_mean(fs, _auc_ctrl)


@register_criterion("log_rank", description="log-rank among pool + controls")
def log_rank(fs: FoldScores) -> float:
    return fold_mean(fs, _log_rank)


@register_criterion("ap_pu", description="AP, pool's behaviour share estimated (PU)")
def ap_pu(fs: FoldScores) -> float:
    return fold_mean(fs, _ap_pu)


RULES = [DEFAULT_CRITERION, "ap_all", "ap_pool_x_auroc", "min_ap", "auroc_pool_x_auroc"]
RULES += ["log_rank", "ap_pu"]
"""The registered criteria the study compares, ``select``'s first."""


def criteria(fs: FoldScores, labels: torch.Tensor) -> dict[str, float]:
    """Every rule of :data:`RULES` for one candidate at one layer, its held-out accuracy, and
    ``ap_oracle``: a diagnosis, not a rule ``select`` could use (``ap_all`` with the pool's own
    behaviour examples, label 1 read from ``labels``, left out of the negatives)."""

    def oracle(p: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
        return heldout_ap(t, torch.cat([p[labels != 1], c]))

    cells = {name: get_criterion(name).fn(fs) for name in RULES}
    return cells | {"ap_oracle": fold_mean(fs, oracle), "accuracy": fs.accuracy()}


def choose(cells: list[dict[str, Any]], rule: str) -> dict:
    """The cell ``select``'s two-stage choice (:func:`lensattr.criterion.choose`) picks when
    the cells' value ``rule`` (a registered criterion's name, or ``ap_oracle``) is the
    criterion."""
    return choose_row([{**c, "criterion": c[rule]} for c in cells])


def _plus(m: Moments, x: torch.Tensor) -> Moments:
    """The moments ``m`` with the rows ``x`` added."""
    x = x.double()
    n = m.n + len(x)
    s1 = m.mean * m.n + x.sum(0)
    s2 = m.cov * (m.n - 1) + m.n * torch.outer(m.mean, m.mean) + x.T @ x
    mu = s1 / n
    return Moments(mu, (s2 - n * torch.outer(mu, mu)) / (n - 1), n)


def with_pairs_in_moments(cache: Any, ps: Any) -> Callable[[str, int, torch.Tensor], Moments]:
    """Fold moments (``fold_scores(moments=...)``) of the pool plus every pair side of ``ps``:
    the held-out sides are scored in sample, as the pool's own behaviour examples are."""

    def moments(stat: str, layer: int, held_out: torch.Tensor) -> Moments:
        return _plus(pool_moments(cache, stat, layer), torch.cat(ps.sides(stat, layer)))

    return moments


def with_fold_in_moments(cache: Any, ps: Any) -> Callable[[str, int, torch.Tensor], Moments]:
    """Fold moments of the pool plus the fold's held-out sides only (``--fold-in``)."""

    def moments(stat: str, layer: int, held_out: torch.Tensor) -> Moments:
        t, c = ps.sides(stat, layer)
        return _plus(pool_moments(cache, stat, layer), torch.cat([t[held_out], c[held_out]]))

    return moments


def study(
    cache: Any, ps: Any, rows: Any, labels: torch.Tensor, in_sample: bool, fold_in: bool = False
) -> list[dict]:
    methods = candidates(cache.stats)  # every candidate, whatever select would leave out
    if len(labels) > POOL_SAMPLE:  # select would score a sample: labels no longer line up
        raise SystemExit(f"choice_study: pools over {POOL_SAMPLE} rows are not supported")
    moments = None
    if in_sample:
        moments = with_pairs_in_moments(cache, ps)
    elif fold_in:
        moments = with_fold_in_moments(cache, ps)
    scored = fold_scores(ps, cache, methods, cache.layers, rows=rows, moments=moments)
    cells = [{"method": str(fs.method), "layer": fs.layer, **criteria(fs, labels)} for fs in scored]
    idx = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows).long()
    queries: dict[str, Any] = {}
    for cell in cells:
        m = Method.parse(cell["method"])
        if cell["method"] not in queries:
            queries[cell["method"]] = lensattr.behavior_query(
                None, ps, query=m.query, stat=m.stat, score=m.score, pool=cache, layers=cache.layers
            )
        r = lensattr.rank(cache, queries[cell["method"]], layer=cell["layer"], rows=idx, top_k=None)
        cell.update(
            {
                k: pool_metrics(r.scores_of(idx), labels, coding="planted")[k]
                for k in ("p_at_k", "ap")
            }
        )
    return cells


def layer_sets(cache: Any, ps: Any, rows: Any, labels: torch.Tensor, method: str) -> dict:
    """``method`` at its best layer and at the mean of its scores over a set of layers: its
    3 and 5 layers of highest criterion, and every layer. The criterion of a set comes from the
    mean of its layers' fold scores (the same folds), its P@k from ``rank(..., layer=layers)``."""
    m = Method.parse(method)
    fss = {fs.layer: fs for fs in fold_scores(ps, cache, [m], cache.layers, rows=rows)}
    rule = get_criterion(DEFAULT_CRITERION).fn
    key = {la: (rule(fs), fs.accuracy(), la) for la, fs in fss.items()}  # select's order
    by_crit = sorted(key, key=key.__getitem__, reverse=True)
    idx = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows).long()
    q = lensattr.behavior_query(
        None, ps, query=m.query, stat=m.stat, score=m.score, pool=cache, layers=cache.layers
    )
    out = {}
    for name, layers in {
        "best layer": by_crit[:1],
        "top 3": by_crit[:3],
        "top 5": by_crit[:5],
        "all": by_crit,
    }.items():
        mean = mean_over_layers([fss[la] for la in layers])
        s = lensattr.rank(cache, q, layer=layers, rows=idx, top_k=None).scores_of(idx)
        out[name] = {
            "layers": layers,
            "criterion": rule(mean),
            **pool_metrics(s, labels, coding="planted"),
        }
    return out


def offered_by_select(cell: dict[str, Any], cache: Any) -> bool:
    """Whether :func:`lensattr.select` offers this candidate by default on ``cache``."""
    score = get_score(Method.parse(cell["method"]).score)
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
        for rule in RULES:
            if not all(rule in c for n in names for c in cells[n][:1]):
                continue  # cells written before this criterion was recorded
            row = [choose(pool[n], rule)["p_at_k"] for n in names]
            title = f"{rule}: {get_criterion(rule).description}"
            print(f"{title[:60]:60s}" + "".join(f"{p:12.2f}" for p in row))
    if all("ap_oracle" in c for n in names for c in cells[n]):
        row = [choose(offered[n], "ap_oracle")["p_at_k"] for n in names]
        print(f"{'diagnosis: AP, label-1 rows not negatives':60s}" + "".join(
            f"{p:12.2f}" for p in row))  # fmt: skip
    print(f"{'hindsight (best cell)':60s}" + "".join(
        f"{max(c['p_at_k'] for c in cells[n]):12.2f}" for n in names))  # fmt: skip
    choice = {n: choose(offered[n], DEFAULT_CRITERION) for n in names}
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
