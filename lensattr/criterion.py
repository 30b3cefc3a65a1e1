"""How ``auto`` judges a candidate: the candidates and the held-out criterion.

A candidate is a :class:`Method` (``query|stat|score``) at a layer. :func:`fold_scores` scores it on
interleaved folds of the query pairs, each fold's query fitted on the other folds, together with
the unlabelled pool; :class:`FoldScores` turns those scores into the criterion and the held-out
accuracy; :func:`choose` picks the row of a criterion table. :func:`lensattr.select` runs them
(see :mod:`lensattr.select`).

A criterion is a registered rule (:func:`~lensattr.registry.register_criterion`) turning one
candidate's :class:`FoldScores` into a number; ``select(criterion=name)`` chooses by it, so a
study compares rules by name. The default, :data:`DEFAULT_CRITERION` (:func:`log_rank_auroc`), is
the product of two held-out measures, each a mean over the folds:

* the treatments' **log-rank** among the pool and the held-out controls
  (:func:`heldout_log_rank`): the recall of the held-out treatments in the top ``q`` of the pool,
  averaged over ``q`` log-uniformly. It rewards a method that puts them near the top, and
  charges ``log(k + 1) / log(n + 1)`` for ``k`` of ``n`` rows above a treatment. The pool is
  unlabelled, so a method that finds the pool's own behaviour examples ranks them next to the
  treatments: an average precision counts each against it (ten of them above a treatment cut
  its precision to 1/11), the log-rank charges their logarithm (docs/performance.md, "Why auto
  chose badly on run Q");
* their **AUROC against the held-out controls** (:func:`heldout_auroc`), the only rows known
  not to show the behaviour: a method must tell the two replies to one prompt apart, not only
  find the topic.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lensattr.checks import positive_int, row_indices
from lensattr.metrics import average_precision
from lensattr.moments import Moments, ScoreContext, pool_moments
from lensattr.query import FOLDS, PairStats, fit, interleaved_folds
from lensattr.registry import (
    QUERY,
    SCORE,
    QueryRule,
    Score,
    get_criterion,
    get_query,
    get_score,
    load_plugins,
    register_criterion,
)
from lensattr.store.cache import Cache

POOL_SAMPLE = 20_000
"""At most this many pool rows (a seeded uniform sample) enter the choice."""


@dataclass(frozen=True)
class Method:
    """A ranking method: a query rule, the cached statistic it is built from and a score.

    Written ``"query|stat|score"``, e.g. ``"residual_change|residual_change|cosine"`` (the
    paper's).

    Examples:
        >>> Method.parse("pool_contrast|resid_post|centered_cosine").score
        'centered_cosine'
    """

    query: str
    stat: str
    score: str

    def __str__(self) -> str:
        return f"{self.query}|{self.stat}|{self.score}"

    @classmethod
    def parse(cls, text: "str | Method") -> "Method":
        if isinstance(text, Method):
            return text
        parts = str(text).split("|")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"method {text!r}: write it as 'query|stat|score'")
        return cls(*parts)


PAPER = Method("residual_change", "residual_change", "cosine")
"""The paper's method as its authors ran it: their residual change over the whole sequence
(``residual_change``), their per-pair normalised treatment-minus-control query
(``norm(mean_j norm(t(x'_j) - t(x_j)))``, the query rule ``residual_change``) and cosine."""


def candidates(stats: Sequence[str]) -> list[Method]:
    """Every registered ``(query, stat, score)`` usable with the cached ``stats`` (plugins
    included).

    A query rule that names its statistics is paired with those only; a generic one
    (``contrast``, ``pool_contrast``) with every cached statistic, except where a named rule
    already covers the same function and statistic (the rule ``residual_change`` is
    ``unit_contrast`` of the statistic ``residual_change``). Rules that build their own pairs
    (``persona``) are not candidates: they do not fit on folds.
    """
    load_plugins()
    seen: set[tuple[int, str]] = set()
    out: list[Method] = []
    named = sorted(QUERY.values(), key=lambda p: p.stats is None)  # named statistics first
    for p in named:
        if p.pairs_from is not None:
            continue
        for stat in [s for s in (p.stats or stats) if s in stats]:
            if (id(p.fn), stat) in seen:
                continue
            seen.add((id(p.fn), stat))
            out += [Method(p.name, stat, score) for score in sorted(SCORE)]
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else -1.0


def _by_method(table: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        by_method.setdefault(row["method"], []).append(row)
    return by_method


def method_scores(table: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each method's criterion and held-out accuracy averaged over the layers."""
    return {
        m: (_mean(rows, "criterion"), _mean(rows, "accuracy"))
        for m, rows in _by_method(table).items()
    }


def best_rows(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's best layer: its row with the highest criterion (ties: held-out accuracy,
    then the deeper layer)."""
    return {m: max(rows, key=_key) for m, rows in _by_method(table).items()}


def choose(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen row of a criterion table, in two stages: first the method with the highest
    criterion averaged over the layers (ties: mean held-out accuracy), then that method's layer
    with the highest criterion (ties: held-out accuracy, then the deeper layer).

    Each cell's criterion rests on a few held-out pairs; the best of some 300 noisy cells is
    mostly the luckiest. A method's mean over its layers is a steadier estimate of the bigger
    decision, and the layer is then chosen among a handful of cells.

    Examples:
        >>> rows = [{"method": "a", "layer": 1, "criterion": 0.9, "accuracy": 1.0},
        ...         {"method": "a", "layer": 2, "criterion": 0.1, "accuracy": 1.0},
        ...         {"method": "b", "layer": 1, "criterion": 0.6, "accuracy": 1.0},
        ...         {"method": "b", "layer": 2, "criterion": 0.7, "accuracy": 1.0}]
        >>> (r := choose(rows))["method"], r["layer"]
        ('b', 2)
    """
    means = method_scores(table)
    method = max(means, key=lambda m: means[m])
    return best_rows(table)[method]


def _key(row: dict[str, Any]) -> tuple[float, float, int]:
    def num(x: float) -> float:
        return -1.0 if math.isnan(x) else x

    return (num(row["criterion"]), num(row["accuracy"]), row["layer"])


def heldout_ap(treatment: torch.Tensor, negatives: torch.Tensor) -> float:
    """Average precision of held-out treatment scores among ``negatives``; the treatments go
    last, so ties count against them (a constant score earns no credit).

    Examples:
        >>> heldout_ap(torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.0]))  # ranks 1 and 3
        0.8333333333333333
        >>> heldout_ap(torch.tensor([1.0]), torch.tensor([1.0, 1.0]))  # a tie: ranked last
        0.3333333333333333
    """
    s = torch.cat([negatives, treatment])
    lab = torch.zeros(len(s), dtype=torch.bool)
    lab[len(negatives) :] = True
    return average_precision(s, lab)


def heldout_log_rank(treatment: torch.Tensor, negatives: torch.Tensor) -> float:
    """Log-rank of held-out treatment scores among ``negatives``, in [0, 1]: the mean over the
    treatments of ``log(1 / r) / log(n + 1)``, where ``r = (1 + m) / (n + 1)`` with ``m`` the
    number of the ``n`` negatives at or above the treatment (ties count against it). It is the
    treatments' recall in the top ``q`` of the negatives averaged over ``q`` log-uniform in
    ``[1 / (n + 1), 1]``: 1 when every treatment is above every negative, 0 for a constant score.

    Examples:
        >>> heldout_log_rank(torch.tensor([2.0]), torch.tensor([1.0, 0.0, -1.0]))  # above all
        1.0
        >>> round(heldout_log_rank(torch.tensor([0.5]), torch.tensor([1.0, 0.0, -1.0])), 3)
        0.5
        >>> heldout_log_rank(torch.tensor([1.0]), torch.tensor([1.0, 1.0]))  # a tie: last
        0.0
    """
    n = len(negatives)
    above = (negatives.double()[None, :] >= treatment.double()[:, None]).sum(1)
    r = (1 + above.double()) / (n + 1)
    return float((1 / r).log().mean() / math.log(n + 1))


def heldout_auroc(treatment: torch.Tensor, control: torch.Tensor) -> float:
    """AUROC of held-out treatment scores against held-out control scores: the fraction of
    (treatment, control) pairs where the treatment scores strictly higher (ties count against).

    Examples:
        >>> heldout_auroc(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))  # 2 > 1, 0, 0 = 0
        0.5
    """
    return float((treatment.double()[:, None] > control.double()[None, :]).double().mean())


def score_columns(
    score: Score, x: torch.Tensor, queries: torch.Tensor, ctx: ScoreContext
) -> torch.Tensor:
    """``[n, q]`` scores of rows ``x`` against the query columns ``queries`` ``[d, q]`` (a
    non-finite score becomes ``-inf``, ranked last)."""
    norms = x.norm(dim=1)
    if score.batched:
        out = score.apply(x, norms, queries, ctx)
    else:
        columns = [score.apply(x, norms, queries[:, j], ctx) for j in range(queries.shape[1])]
        out = torch.stack(columns, 1)
    return out.float().nan_to_num(nan=-torch.inf, posinf=-torch.inf)


@dataclass
class FoldScores:
    """One candidate at one layer, scored on every fold: what a criterion is computed from.

    ``pool`` ``[n_pool, folds]``, ``treatment`` and ``control`` ``[n_pairs, folds]``: column
    ``f`` holds the scores under the query fitted without fold ``f``; ``tests[f]`` are the
    pairs held out of it (only those rows of ``treatment`` / ``control`` are held-out scores).
    ``layer`` is a tuple for the mean of several layers' scores (:func:`mean_over_layers`).
    """

    method: Method
    layer: int | tuple[int, ...]
    pool: torch.Tensor
    treatment: torch.Tensor
    control: torch.Tensor
    tests: list[torch.Tensor]

    def heldout(self, f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fold ``f``'s pool, held-out treatment and held-out control scores."""
        te = self.tests[f]
        return self.pool[:, f], self.treatment[te, f], self.control[te, f]

    def accuracy(self) -> float:
        """Fraction of pairs whose held-out treatment scores above its control."""
        hits = sum(
            int((self.treatment[te, f] > self.control[te, f]).sum())
            for f, te in enumerate(self.tests)
        )
        return hits / len(self.treatment)


DEFAULT_CRITERION = "log_rank_auroc"
"""The criterion ``auto`` chooses by unless told otherwise (``select(criterion=...)``)."""


@register_criterion(
    DEFAULT_CRITERION, description="log-rank among the pool x AUROC against the controls"
)
def log_rank_auroc(fs: FoldScores) -> float:
    """The held-out treatments' log-rank among the pool and the held-out controls, times their
    AUROC against the held-out controls, each a mean over the folds (see the module doc).

    Examples:
        >>> t = [torch.tensor([0]), torch.tensor([1])]
        >>> pool = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> fs = FoldScores(PAPER, 1, pool, torch.full((2, 2), 2.0), torch.zeros(2, 2), t)
        >>> log_rank_auroc(fs)  # every held-out treatment above every pool row and control
        1.0
    """
    log_rank, auroc = [], []
    for f in range(len(fs.tests)):
        pool_s, t_s, c_s = fs.heldout(f)
        log_rank.append(heldout_log_rank(t_s, torch.cat([pool_s, c_s])))
        auroc.append(heldout_auroc(t_s, c_s))
    return float(sum(log_rank) / len(log_rank) * sum(auroc) / len(auroc))


FoldMoments = Callable[[str, int, torch.Tensor], Moments]
"""``moments(stat, layer, held_out)``: the moments a fold's query is fitted and scored with,
given the indices of the pairs it holds out (see :func:`fold_scores`)."""


def fold_scores(
    ps: PairStats,
    cache: Cache,
    methods: Sequence[Method],
    layers: Sequence[int],
    *,
    rows: Any = None,
    folds: int = FOLDS,
    pool_sample: int | None = POOL_SAMPLE,
    seed: int = 0,
    moments: FoldMoments | None = None,
) -> Iterator[FoldScores]:
    """Every method at every layer scored on ``folds`` interleaved folds of the pairs: each
    fold's query is fitted on the other folds' pairs, then the pool (``rows`` of the cache, at
    most ``pool_sample`` of them, a seeded sample) and every pair are scored with it. Every fold
    and query of a (statistic, layer) is scored in one batched call.

    ``moments`` replaces the pool's moments (:func:`~lensattr.moments.pool_moments`, what
    ``select`` uses) by other ones for each fold, e.g. the pool's plus the pairs' (a study of
    how the choice depends on them); each fold is then scored on its own.
    """
    positive_int("pool_sample", pool_sample, none=True)
    split = interleaved_folds(ps.n_pairs, folds)
    tests, trains = [te for te, _ in split], [tr for _, tr in split]
    folds = len(split)
    chosen = row_indices(rows, len(cache))
    pool_rows = torch.arange(len(cache)) if chosen is None else chosen
    if pool_sample is not None and len(pool_rows) > pool_sample:
        gen = torch.Generator().manual_seed(seed)
        pool_rows = pool_rows[torch.randperm(len(pool_rows), generator=gen)[:pool_sample]].sort()[0]
    by_stat: dict[str, list[Method]] = {}
    for m in methods:
        by_stat.setdefault(m.stat, []).append(m)
    for stat, ms in by_stat.items():
        for layer in layers:
            x = cache.stat(stat, layer)[pool_rows].float()
            t, c = ps.sides(stat, layer)
            rules: dict[str, QueryRule] = {m.query: get_query(m.query) for m in ms}
            names = list(rules)
            if moments is None:
                ctxs = [ScoreContext(cache, stat, layer)]
                pool = (
                    pool_moments(cache, stat, layer)
                    if any(p.uses_pool for p in rules.values())
                    else None
                )
                fitted = {  # {rule: [d, folds]}
                    name: torch.stack(
                        [fit(p, t[tr], c[tr], pool if p.uses_pool else None) for tr in trains], 1
                    )
                    for name, p in rules.items()
                }
                blocks = [torch.cat([fitted[nm] for nm in names], 1)]
            else:
                fold_moments = [moments(stat, layer, te) for te in tests]
                ctxs = [ScoreContext(pool=mom) for mom in fold_moments]
                blocks = [
                    torch.stack(
                        [
                            fit(rules[nm], t[tr], c[tr], mom if rules[nm].uses_pool else None)
                            for nm in names
                        ],
                        1,
                    )  # [d, rules] of fold f
                    for tr, mom in zip(trains, fold_moments, strict=True)
                ]
            for name in dict.fromkeys(m.score for m in ms):
                score = get_score(name)
                pairs = list(zip(blocks, ctxs, strict=True))
                sx, st, sc = (
                    _rule_major([score_columns(score, a, q, ctx) for q, ctx in pairs], len(names))
                    for a in (x, t, c)
                )
                for j, nm in enumerate(names):
                    method = Method(nm, stat, name)
                    if method not in ms:
                        continue
                    sl = slice(j * folds, (j + 1) * folds)
                    yield FoldScores(method, layer, sx[:, sl], st[:, sl], sc[:, sl], tests)


def _rule_major(parts: list[torch.Tensor], n_rules: int) -> torch.Tensor:
    """The ``[n, rules * folds]`` scores, rule-major (column ``j * folds + f``), from one block
    that is already in that order or from one ``[n, rules]`` block per fold."""
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts, 2).reshape(len(parts[0]), n_rules * len(parts))


def mean_over_layers(scored: Sequence[FoldScores]) -> FoldScores:
    """One method's fold scores at several layers averaged into those of the layer set: what
    ``rank(cache, query, layer=[...])`` scores, on the same folds and pool rows.

    Examples:
        >>> t = [torch.tensor([0]), torch.tensor([1])]
        >>> a = FoldScores(PAPER, 1, torch.ones(3, 2), torch.ones(2, 2), torch.zeros(2, 2), t)
        >>> b = FoldScores(PAPER, 2, torch.zeros(3, 2), torch.ones(2, 2), torch.ones(2, 2), t)
        >>> m = mean_over_layers([a, b]); m.layer, m.pool[0].tolist(), m.control[0].tolist()
        ((1, 2), [0.5, 0.5], [0.5, 0.5])
    """
    if len({fs.method for fs in scored}) != 1:
        raise ValueError("mean_over_layers averages one method's layers")
    layers = [(fs.layer,) if isinstance(fs.layer, int) else fs.layer for fs in scored]

    def mean(side: str) -> torch.Tensor:
        return torch.stack([getattr(fs, side) for fs in scored]).mean(0)

    return FoldScores(
        scored[0].method,
        tuple(la for group in layers for la in group),
        mean("pool"),
        mean("treatment"),
        mean("control"),
        scored[0].tests,
    )


LAYER_SET = 3
"""How many of the chosen method's best layers ``auto`` also tries as a layer set (the mean
of their scores): the set is chosen when its criterion is higher than the best layer's."""


def layer_set(
    ps: PairStats,
    cache: Cache,
    table: list[dict[str, Any]],
    method: Method,
    size: int = LAYER_SET,
    *,
    criterion: str = DEFAULT_CRITERION,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """The criterion row of ``method``'s ``size`` best layers in ``table`` taken together (each
    row scored by the mean of its scores at those layers), or ``None`` when the table has fewer
    than two of its layers or ``size < 2``. ``layer`` is the tuple of layers, best first;
    ``criterion`` and the keywords (:func:`fold_scores`'s) must be those the table was computed
    with."""
    rows = sorted((r for r in table if r["method"] == str(method)), key=_key, reverse=True)
    layers = tuple(r["layer"] for r in rows[:size])
    if size < 2 or len(layers) < 2:
        return None
    fs = mean_over_layers(list(fold_scores(ps, cache, [method], layers, **kwargs)))
    return {
        "method": str(method),
        "layer": layers,
        "criterion": get_criterion(criterion).fn(fs),
        "accuracy": fs.accuracy(),
    }


def evaluate(
    ps: PairStats,
    cache: Cache,
    methods: Sequence[Method],
    layers: Sequence[int],
    *,
    criterion: str = DEFAULT_CRITERION,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The registered ``criterion`` and the held-out accuracy of every method at every layer, a
    row each (the keywords are :func:`fold_scores`'s: ``rows``, ``folds``, ``pool_sample``,
    ``seed``, ``moments``)."""
    rule = get_criterion(criterion).fn
    return [
        {
            "method": str(fs.method),
            "layer": fs.layer,
            "criterion": rule(fs),
            "accuracy": fs.accuracy(),
        }
        for fs in fold_scores(ps, cache, methods, layers, **kwargs)
    ]


__all__ = [
    "DEFAULT_CRITERION",
    "PAPER",
    "POOL_SAMPLE",
    "LAYER_SET",
    "FoldMoments",
    "FoldScores",
    "Method",
    "best_rows",
    "candidates",
    "choose",
    "evaluate",
    "fold_scores",
    "heldout_ap",
    "heldout_auroc",
    "heldout_log_rank",
    "layer_set",
    "log_rank_auroc",
    "mean_over_layers",
    "method_scores",
    "score_columns",
]
