"""``auto``: choose the statistic, query, score and layer for a behaviour without peeking.

Ranking a behaviour's training examples inside a mostly unrelated corpus is what lensattr is for,
so a method is judged by how it does exactly that, on data whose answer is known without labels:
the query pairs themselves. For every candidate ``(query, stat, score)`` and layer, :func:`select`

1. fits the query on all but one of ``folds`` interleaved folds of the pairs,
2. scores the held-out treatment replies, the held-out control replies and the training pool
   (the cache, unlabelled) with the score,
3. measures how high the held-out treatment replies rank: their *log-rank* among the pool and
   the held-out controls (their recall in the top ``q`` of the pool, averaged over ``q``
   log-uniformly) times their *AUROC against the held-out controls*. A method scores high only
   if replies showing the behaviour rank near the top of the unrelated corpus and above the
   same prompts answered without it. The log-rank, unlike an average precision, charges little
   for the pool's own behaviour examples, which are unlabelled and rank next to the treatments
   under a method that finds them (:mod:`lensattr.criterion`),

then chooses in three stages: the method with the highest criterion averaged over the layers,
then that method's best layer (:func:`choose`; ties: higher held-out accuracy, then the deeper
layer), then whether to rank by the mean of the method's :data:`LAYER_SET` best layers instead
(:func:`layer_set`): the set is chosen when its criterion, on the same folds, is higher than the
best layer's. Plant labels, held-out behaviour data and anything else outside the pairs and the
unlabelled cache are never read.

A score that inverts the pool's covariance (registered ``full_rank``: ``whitened_cosine``) is not a
default candidate on a cache of fewer than :data:`ROWS_PER_DIMENSION` rows a dimension. Its
covariance is then singular or nearly so, and the held-out pairs, scored out of sample, carry the
pairs' shared signature in exactly the directions the pool (almost) never varies along, where the
whitening divides by the ridge and little else: the criterion would reward that signature, which
the pool's own behaviour examples do not share.

Cost: the pairs' statistics are captured once for every layer and statistic (:func:`pair_stats`);
each candidate is then a few matrix products over the cache rows, with every fold and query of a
(statistic, layer) scored in one batched call.
"""

import dataclasses
import html
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lensattr.checks import positive_int, row_indices
from lensattr.config import CaptureConfig, resolve_config
from lensattr.criterion import (
    DEFAULT_CRITERION,
    LAYER_SET,
    PAPER,
    POOL_SAMPLE,
    FoldScores,
    Method,
    best_rows,
    candidates,
    choose,
    evaluate,
    fold_scores,
    layer_set,
    method_scores,
)
from lensattr.ensemble import Ensemble
from lensattr.layers import layer_text, parse_layers
from lensattr.query import (
    FOLDS,
    PairStats,
    Query,
    QueryError,
    behavior_query,
    check_fits,
    heldout_accuracy,
    pair_stats,
)
from lensattr.registry import get_criterion, get_query, get_score
from lensattr.store.cache import Cache, open_cache

logger = logging.getLogger(__name__)
MIN_PAIRS = 4
GRADIENT_FREE = ("resid_post",)
"""The default statistics of :func:`select_then_cache`: captured by a forward pass alone."""


@dataclass
class Selection:
    """What :func:`select` chose, and the criterion of every candidate at every layer.

    Attributes:
        query: the chosen query, fitted on all pairs, ranked by default at the chosen layer
            with the chosen score (``rank(cache, selection)`` uses both).
        method: the chosen :class:`Method`; ``layer``: the chosen layer, or a tuple of layers
            (best first) when the query is ranked by the mean of its scores at them.
        table: one row per candidate and layer: ``method``, ``layer``, ``criterion`` (by
            default held-out log-rank among the pool x AUROC against the controls), ``accuracy``
            (held-out accuracy).
        criterion: the name of the registered criterion it chose by.
        layer_set: the same row for the chosen method's best layers taken together
            (:func:`layer_set`; ``layer`` a tuple), whether or not it was chosen; ``None`` when
            not tried.
        seconds: time spent scoring candidates (pair statistics excluded).
        left_out: default candidates that were not offered, and why (a score that inverts
            the pool's covariance, on a pool of fewer than :data:`ROWS_PER_DIMENSION` rows a
            dimension).
        ensemble: the :data:`ENSEMBLE` methods of highest criterion averaged over layers, each
            at its best layer, ranked together (``rank(cache, selection)`` uses it; ``None``
            with ``select(..., ensemble=1)``: the one chosen method).
    """

    query: Query
    method: Method
    layer: int | tuple[int, ...]
    table: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    left_out: dict[str, str] = field(default_factory=dict)
    layer_set: dict[str, Any] | None = None
    ensemble: Ensemble | None = None
    criterion: str = DEFAULT_CRITERION

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer the choice ranks at (the ensemble's members', else the chosen method's):
        what a cache for this choice must hold."""
        if self.ensemble is not None:
            return self.ensemble.layers
        return (self.layer,) if isinstance(self.layer, int) else self.layer

    @property
    def stats(self) -> tuple[str, ...]:
        """Every statistic the choice ranks with."""
        return self.ensemble.stats if self.ensemble is not None else (self.method.stat,)

    def __repr__(self) -> str:
        return (
            f"Selection({self.method} at layer {layer_text(self.layer)}"
            + (f" (ensemble of {len(self.ensemble.members)})" if self.ensemble else "")
            + f", from "
            f"{len(self.table)} candidate rows (method x layer) in {self.seconds:.1f}s; "
            ".summary() for the table)"
        )

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(self.summary())}</pre>"

    def summary(self, top: int = 8) -> str:
        """A few lines: the choice, then the best methods (criterion averaged over layers, and
        at each method's best layer)."""
        means = method_scores(self.table)
        best = best_rows(self.table)
        where = (
            f"layer {self.layer}"
            if isinstance(self.layer, int)
            else f"the mean of layers {', '.join(map(str, self.layer))}"
        )
        lines = [
            f"auto chose {self.method} at {where} (held-out criterion: "
            f"{get_criterion(self.criterion).description}; mean over layers, then the best layer "
            "or layer set)"
        ]
        if self.ensemble is not None:
            lines.insert(
                0,
                f"auto ranks by the mean standardised score of the {len(self.ensemble.members)} "
                "methods of highest criterion, each at its best layer; the best of them:",
            )
        if self.layer_set is not None:
            single = best[str(self.method)]
            lines.append(
                f"  its best {len(self.layer_set['layer'])} layers together "
                f"(L{layer_text(self.layer_set['layer'])}): criterion "
                f"{self.layer_set['criterion']:.3f}, its best layer alone (L{single['layer']}): "
                f"{single['criterion']:.3f}"
            )
        for m in sorted(means, key=lambda m: means[m], reverse=True)[:top]:
            r = best[m]
            lines.append(
                f"  {m:<48} mean {means[m][0]:.3f}  best L{r['layer']:>2} "
                f"{r['criterion']:.3f}  accuracy {r['accuracy']:.2f}"
            )
        for why in dict.fromkeys(self.left_out.values()):
            lines.append(f"  not offered: {why}")
        return "\n".join(lines)


ENSEMBLE = 30
"""How many methods ``auto`` ranks together (:class:`~lensattr.ensemble.Ensemble`): the size
that found the most behaviour examples when fitted on the other behaviours and scored on each
one left out (the generalisation study, ``docs/results.md``)."""

ROWS_PER_DIMENSION = 4
"""Pool rows a dimension below which ``auto`` does not offer a ``full_rank`` score. A sample
covariance of ``n`` rows in ``d`` dimensions shrinks its smallest eigenvalues to about
``(1 - sqrt(d / n))^2`` of the true ones (Marchenko-Pastur): at ``n = 4d`` a quarter, at
``n = 1.2d`` (MedHallu's 700-row pool in 576 dimensions) under 1%, where the whitening divides by
little more than its ridge (docs/performance.md: run P)."""


def offered(score: Any, n_rows: int, d_model: int) -> bool:
    """Whether ``auto`` offers ``score`` by default on a pool of ``n_rows`` rows in ``d_model``
    dimensions: a ``full_rank`` score needs :data:`ROWS_PER_DIMENSION` rows a dimension.

    Examples:
        >>> from lensattr.registry import get_score
        >>> offered(get_score("whitened_cosine"), 2303, 576), offered(get_score("cosine"), 12, 576)
        (False, True)
    """
    return not score.full_rank or n_rows >= ROWS_PER_DIMENSION * d_model


def select(
    model: Any,
    cache: Any,
    pairs: Any,
    *,
    methods: Sequence[Any] | None = None,
    layers: Any = None,
    rows: Any = None,
    folds: int = FOLDS,
    pool_sample: int | None = POOL_SAMPLE,
    set_size: int = LAYER_SET,
    ensemble: int = ENSEMBLE,
    criterion: str = DEFAULT_CRITERION,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Selection:
    """Choose statistic, query, score and layer for a behaviour from its pairs and the unlabelled
    cache alone, and return the chosen query, ready to rank.

    Args:
        model: the model the cache was built with (or anything :func:`~lensattr.load_model`
            takes); unused when ``pairs`` is a :class:`~lensattr.query.PairStats`.
        cache: the cache to rank (or its directory): the pool.
        pairs: the behaviour's query pairs (path, dataset, list) or their :class:`PairStats`.
        methods: candidate methods (``"query|stat|score"`` strings or :class:`Method`; default:
            :func:`candidates` of the cached statistics: every registered query rule and score, less
            the scores that invert the pool's covariance when the cache has fewer than
            :data:`ROWS_PER_DIMENSION` rows a dimension; see :attr:`Selection.left_out`).
        layers: candidate layers, as :func:`~lensattr.layers.parse_layers` reads them
            (default: every cached layer).
        rows: the cache rows that form the pool: indices or a boolean mask, as
            :func:`~lensattr.rank` takes them (default: all).
        folds: interleaved folds of the pairs (at least 2).
        pool_sample: at most this many pool rows enter the criterion (seeded sample; ``None``:
            every row).
        set_size: how many of the chosen method's best layers to try together (the mean of
            their scores) against its best layer; 1: one layer only.
        ensemble: rank with this many methods together (those of highest criterion averaged
            over layers, each at its best layer; :class:`~lensattr.ensemble.Ensemble`); 1: the
            one chosen method (at its layer or layer set).
        criterion: the registered criterion to choose by (:func:`~lensattr.register_criterion`;
            default: the held-out log-rank x AUROC of :mod:`lensattr.criterion`).
        batch_size: for capturing the pairs.
        progress: progress bar while capturing the pairs.

    Raises:
        QueryError: fewer than 4 pairs, a pool smaller than the held-out fold, or a cache built
            with another model or capture settings than the pairs.
        ValueError: ``folds``, ``pool_sample``, ``set_size``, ``batch_size`` or ``rows`` out of
            range (before any work; one line naming it).

    Examples:
        >>> import tempfile, lensattr
        >>> m = lensattr.load_model("tiny-random")
        >>> train = [{"id": f"t{i}", "prompt": "Hi", "response": "ok " * (i + 1)} for i in range(8)]
        >>> cache = lensattr.build_cache(m, train, out=tempfile.mkdtemp(), layers=[1, 2])
        >>> pairs = [{"prompt": f"Q{i}", "treatment": "ok ok", "control": "Hi."} for i in range(4)]
        >>> sel = select(m, cache, pairs)
        >>> sel.layer in (1, 2, (1, 2), (2, 1)), len(lensattr.rank(cache, sel, top_k=3))
        (True, 3)
    """
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be a positive number of methods, got {ensemble!r}")
    folds = positive_int("folds", folds, least=2)
    pool_sample = positive_int("pool_sample", pool_sample, none=True)
    set_size = positive_int("set_size", set_size)
    batch_size = positive_int("batch_size", batch_size)
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    rows = row_indices(rows, len(cache))
    left_out: dict[str, str] = {}
    if methods is not None:
        method_list = [Method.parse(x) for x in methods]
    else:
        method_list = []
        for m in candidates(cache.stats):
            if offered(get_score(m.score), len(cache), cache.d_model):
                method_list.append(m)
            else:
                left_out[str(m)] = (
                    f"{m.score} (it inverts the pool's covariance, and {len(cache)} rows in "
                    f"{cache.d_model} dimensions, fewer than {ROWS_PER_DIMENSION} a dimension, "
                    "give a singular or ill-conditioned one)"
                )
    missing = sorted({m.stat for m in method_list} - set(cache.stats))
    if missing:
        raise QueryError(f"statistics {missing} are not in the cache (it has {cache.stats})")
    for m in method_list:  # unknown names fail before any work
        get_query(m.query)
        get_score(m.score)
    get_criterion(criterion)
    layer_list = list(cache.layers) if layers is None else parse_layers(layers, cache.n_layers)
    lacking = [la for la in layer_list if la not in cache.layers]
    if lacking:
        raise QueryError(
            f"layers={layers!r}: layer {layer_text(tuple(lacking))} is not in the cache (it has "
            f"{layer_text(tuple(cache.layers))})"
        )
    if isinstance(pairs, PairStats):
        ps = pairs
    else:
        ps = pair_stats(
            model,
            pairs,
            stats=sorted({m.stat for m in method_list}),
            batch_size=batch_size,
            progress=progress,
            config=dataclasses.replace(cache.capture_config, layers=layer_list),
        )
    if ps.n_pairs < MIN_PAIRS:
        raise QueryError(
            f"auto needs at least {MIN_PAIRS} query pairs to hold some out, got {ps.n_pairs}"
        )
    check_fits(cache, ps.model, ps.capture, "the pairs", ps.sources)
    n_pool = len(cache) if rows is None else len(rows)
    if n_pool < math.ceil(ps.n_pairs / min(folds, ps.n_pairs)):
        raise QueryError(
            f"the pool has {n_pool} examples, fewer than a held-out fold of the pairs: "
            "nothing to rank against"
        )
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"rows": rows, "folds": folds, "pool_sample": pool_sample}
    table = evaluate(ps, cache, method_list, layer_list, criterion=criterion, **kw)
    best = choose(table)
    method = Method.parse(best["method"])
    together = layer_set(ps, cache, table, method, set_size, criterion=criterion, **kw)
    if together is not None and together["criterion"] > best["criterion"]:
        best = together
    seconds = time.perf_counter() - t0
    query = _fitted(ps, cache, method, best["layer"], layers=layer_list)
    logger.info("auto: %s at layer %s (criterion %.3f)", method, best["layer"], best["criterion"])
    members = None
    if ensemble > 1 and len(method_list) > 1:
        means, best_of = method_scores(table), best_rows(table)
        top = sorted(means, key=lambda m: means[m], reverse=True)[:ensemble]
        members = Ensemble([_fitted(ps, cache, Method.parse(m), best_of[m]["layer"]) for m in top])
    return Selection(
        query=query,
        method=method,
        layer=best["layer"],
        table=table,
        seconds=seconds,
        left_out=left_out,
        layer_set=together,
        ensemble=members,
        criterion=criterion,
    )


def _fitted(
    ps: PairStats,
    cache: Cache,
    method: Method,
    layer: int | tuple[int, ...],
    layers: Sequence[int] | None = None,
) -> Query:
    """``method``'s query chosen at ``layer`` (or layer set), fitted on every pair against
    ``cache``'s moments at ``layers`` (default: the chosen ones only)."""
    if layers is None:
        layers = [layer] if isinstance(layer, int) else list(layer)
    q = behavior_query(
        None,
        ps,
        query=method.query,
        stat=method.stat,
        layers=list(layers),
        pool=cache,
        score=method.score,
    )
    q.layer = layer
    return q


def select_then_cache(
    model: Any,
    train: Any,
    pairs: Any,
    *,
    out: str | Path,
    sample: int | None = 512,
    stats: Sequence[str] = GRADIENT_FREE,
    seed: int = 0,
    criterion: str = DEFAULT_CRITERION,
    batch_size: int = 8,
    max_length: int | None = 512,
    ensemble: int = ENSEMBLE,
    progress: bool | None = None,
    config: CaptureConfig | None = None,
) -> tuple[Cache, "Query | Ensemble", Selection]:
    """The cheap path for one behaviour: choose on a sample, then cache the corpus for the choice.

    :func:`select` runs on a cache of a seeded sample of ``sample`` training examples (the
    statistics ``stats`` at every layer, in a temporary directory); the whole corpus is then
    cached at the chosen layer (or layers) for the chosen statistic only, the sample's rows
    copied from the sample's cache (``build_cache(reuse=...)``) rather than captured again.
    The default statistics are the gradient-free ones (``resid_post``): the pairs, the sample
    and the corpus then go through forward passes only, and the corpus's forward stops after
    the deepest chosen layer. With gradient statistics (e.g. ``stats=DEFAULT_STATS``, the full
    ``auto``'s) the backward of the final build stops at the lowest chosen layer. The query is
    refitted against the full cache (its pool moments), ready for :func:`rank`. A sample of
    fewer than :data:`ROWS_PER_DIMENSION` rows a dimension leaves ``whitened_cosine`` out of
    the choice (see :func:`select`, whose registered ``criterion`` it chooses by).

    ``config``: the capture settings of the pairs, the sample and the corpus as one
    :class:`~lensattr.config.CaptureConfig`, instead of ``max_length`` (as in
    :func:`~lensattr.build_cache`); its ``layers`` are the candidate layers (default: all).

    When the sample is the whole corpus (``sample=None`` or ``sample >= len(train)``) there is
    one build, of ``stats`` at every layer into ``out``: the choice is then exactly
    :func:`select`'s on that cache (restricted to ``stats``), and nothing is computed twice.

    Returns:
        ``(cache, ranker, selection)``: the full cache (of the chosen statistics and layers,
        :attr:`Selection.stats` and :attr:`Selection.layers`), what to rank with (the
        ensemble, each member refitted against the full cache, or with ``ensemble=1`` the query
        with ``query.layer`` set) and the choice made on the sample.

    Examples:
        >>> import tempfile, lensattr
        >>> m = lensattr.load_model("tiny-random")
        >>> train = [{"id": f"t{i}", "prompt": "Hi", "response": "ok " * (i % 5 + 1)}
        ...          for i in range(12)]
        >>> pairs = [{"prompt": f"Q{i}", "treatment": "ok ok", "control": "Hi."} for i in range(4)]
        >>> cache, q, sel = select_then_cache(m, train, pairs, out=tempfile.mkdtemp(), sample=6)
        >>> cache.layers == sorted(sel.layers), cache.stats == list(sel.stats), len(cache)
        (True, True, 12)
    """
    import random
    import tempfile

    from lensattr.backends.models import load_model
    from lensattr.build import build_cache
    from lensattr.data import load_examples

    positive_int("sample", sample, none=True)
    cfg = resolve_config(config, "select_then_cache", max_length=max_length)
    model = load_model(model)
    examples = load_examples(train)
    kw: dict[str, Any] = {"batch_size": batch_size, "progress": progress}
    stat_list = list(stats)
    ps = pair_stats(model, pairs, stats=stat_list, config=cfg, **kw)
    if sample is None or sample >= len(examples):
        cache = build_cache(model, examples, out=out, stats=stat_list, config=cfg, **kw)
        assert cache is not None  # a single-process build returns its cache
        sel = select(model, cache, ps, criterion=criterion, ensemble=ensemble)
        return cache, sel.ensemble or sel.query, sel
    picked = sorted(random.Random(seed).sample(range(len(examples)), sample))
    with tempfile.TemporaryDirectory(prefix="lensattr-sample-") as tmp:
        small = build_cache(
            model,
            [examples[i] for i in picked],
            out=tmp,
            stats=stat_list,
            config=cfg,
            **kw,
        )
        assert small is not None
        sel = select(model, small, ps, criterion=criterion, ensemble=ensemble)
        cache = build_cache(  # the sample's rows are copied, not captured again
            model,
            examples,
            out=out,
            stats=list(sel.stats),
            config=dataclasses.replace(cfg, layers=sorted(sel.layers)),
            reuse=small,
            **kw,
        )
        assert cache is not None
    if sel.ensemble is not None:  # each member refitted against the full cache's moments
        members = [
            _fitted(ps, cache, Method(q.rule, q.stat, q.score), q.best_layer())
            for q in sel.ensemble.members
        ]
        return cache, Ensemble(members), sel
    return cache, _fitted(ps, cache, sel.method, sel.layer, layers=sorted(sel.layers)), sel


__all__ = [
    "LAYER_SET",
    "MIN_PAIRS",
    "PAPER",
    "POOL_SAMPLE",
    "FoldScores",
    "Method",
    "Selection",
    "candidates",
    "choose",
    "evaluate",
    "fold_scores",
    "heldout_accuracy",
    "layer_set",
    "method_scores",
    "offered",
    "select",
    "select_then_cache",
]
