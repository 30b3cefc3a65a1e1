"""Ranking cached training examples against a behaviour query, and per-token explanations."""

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from lensattr.backends.capture import capture
from lensattr.backends.models import load_model
from lensattr.checks import positive_int, row_indices
from lensattr.config import POOLINGS, CaptureConfig, check_capture, resolve_config
from lensattr.data import Example, load_examples
from lensattr.ensemble import SCORE as ENSEMBLE_SCORE
from lensattr.ensemble import Ensemble, as_ranked, standardised
from lensattr.layers import layer_text, parse_layers
from lensattr.moments import ScoreContext, content_digest
from lensattr.query import Query, QueryError, as_query, check_fits
from lensattr.registry import get_score, get_stat
from lensattr.render import collate, encode
from lensattr.store.cache import Cache, CacheError, open_cache
from lensattr.tables import excerpt, html_table, tokens_html, tokens_text

logger = logging.getLogger(__name__)
SCORE_BLOCK = 1024
"""Rows a score is computed on at a time, in blocks aligned to the cache's row 0: a row's score
is computed on the same block of rows whatever ``chunk_rows`` and ``rows`` are, so it is bitwise
the same, and so is the order of ties."""


@dataclass
class Ranking:
    """Top (or bottom) examples: ``ids[i]`` has ``scores[i]`` and cache row ``rows[i]``.

    Ordered by score (highest first; lowest first for ``bottom=True``), ties by row index;
    non-finite scores always come last and are counted in ``n_nonfinite``. ``stat`` is the
    cached statistic ranked and ``score`` the registered score that gave ``scores``; ``layer``
    is a tuple when the scores are the mean over several layers; ``rule`` names the query's
    rule, and ``cache`` is the cache ranked (for the replies in :meth:`table` and
    :meth:`to_pandas`). In a notebook a ranking shows as a table of its first 20 examples.
    """

    ids: list[str]
    scores: torch.Tensor
    rows: torch.Tensor
    layer: int | tuple[int, ...]
    stat: str
    score: str
    n_nonfinite: int = 0
    rule: str | None = None
    cache: Cache | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def method(self) -> str:
        """The method that ranked, as ``"query|stat|score"`` (``?`` for an unknown rule)."""
        return f"{self.rule or '?'}|{self.stat}|{self.score}"

    def describe(self) -> str:
        """One line: how many examples, the method and the layer (or layers)."""
        n = f" of {len(self.cache)}" if self.cache is not None else ""
        if self.score == ENSEMBLE_SCORE:  # each member at its own layer
            return (
                f"{len(self)}{n} examples ranked by the mean standardised score of an "
                f"{self.rule} (statistics {self.stat}, layers {layer_text(self.layer)})"
            )
        where = f"layer {self.layer}" if isinstance(self.layer, int) else "the mean of layers "
        where += "" if isinstance(self.layer, int) else layer_text(self.layer)
        return f"{len(self)}{n} examples ranked by {self.method} at {where}"

    def __repr__(self) -> str:
        top = ", ".join(
            f"{i} {s:+.3f}" for i, s in zip(self.ids, self.scores[:3].tolist(), strict=False)
        )
        more = ", ..." if len(self) > 3 else ""
        return f"Ranking({self.describe()}: {top}{more})"

    def table(self, n: int | None = None) -> list[dict[str, Any]]:
        """The first ``n`` rows (default: all) as dicts: ``rank``, ``id``, ``score``, and when
        the ranking knows its cache the reply (``text``) and the record's other fields
        (``label``, ``source``, ...)."""
        ids = self.ids[:n]
        out = [
            {"rank": i + 1, "id": eid, "row": row, "score": score}
            for i, (eid, row, score) in enumerate(
                zip(ids, self.rows.tolist(), self.scores.tolist(), strict=False)
            )
        ]
        if self.cache is not None and ids:
            for row, ex in zip(out, self.cache.examples(ids), strict=True):
                row["text"] = ex.response
                row.update({k: v for k, v in ex.extra.items() if k not in row and k[0] != "_"})
        return out

    def to_pandas(self) -> Any:
        """The ranking as a ``pandas.DataFrame``, one row per ranked example: ``rank``, ``id``,
        ``row`` (the cache row, which is the example's place in the data the cache was built
        from), ``score``, and (from the cache) ``text``, the reply, and the record's other
        fields. Join it to your own data on ``id`` (``df.merge(mine, on="id")``), or put it in
        data order with ``.sort_values("row")`` after ``rank(..., top_k=None)``.
        """
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("rank")

    def _repr_html_(self) -> str:
        rows = [{**r, "text": excerpt(str(r.get("text", "")))} for r in self.table(20)]
        columns = ["rank", "id", "score", *(["label"] if any("label" in r for r in rows) else [])]
        columns += ["text"] if self.cache is not None else []
        more = f" (the first 20 of {len(self)})" if len(self) > 20 else ""
        return html_table(rows, columns, caption=self.describe() + more)

    def scores_of(self, rows: Any) -> torch.Tensor:
        """The scores of cache ``rows``, in that order (e.g. ``range(len(cache))`` after
        ``top_k=None``: every example's score in cache order, for metrics).

        Raises:
            KeyError: a row that is not in this ranking.
        """
        want = torch.as_tensor(rows, dtype=torch.long)
        order = torch.argsort(self.rows)
        have = self.rows[order]
        pos = torch.searchsorted(have, want).clamp(max=max(len(have) - 1, 0))
        if len(want) and (len(have) == 0 or not torch.equal(have[pos], want)):
            raise KeyError("some rows are not in this ranking (rank with top_k=None)")
        return self.scores[order[pos]]


def _layers_arg(layer: Any, query: Query, n_layers: int) -> tuple[int, ...]:
    """The layers to score, in the order given, from ``layer`` as
    :func:`~lensattr.layers.parse_layers` reads it for a model of ``n_layers`` blocks
    (negative ints count from its last block), or ``"best"`` / ``None`` (the query's own, see
    :meth:`~lensattr.query.Query.best_layer`).

    Raises:
        QueryError: a layer the query was not built at.
    """
    if layer is None or layer == "best":
        layer = query.best_layer()
    layers = tuple(parse_layers(layer, n_layers))
    missing = [la for la in layers if la not in query.layers]
    if missing:
        raise QueryError(
            f"layer={layer!r} is layer {layer_text(tuple(missing))} of this {n_layers}-block "
            f"model, which the query lacks (it has layers {layer_text(tuple(query.layers))})"
        )
    return layers


def rank(
    cache: Any,
    query: Any,
    *,
    layer: Any = None,
    stat: str | None = None,
    score: str | None = None,
    top_k: int | None = 100,
    bottom: bool = False,
    rows: Any = None,
    method: str | None = None,
    model: Any = None,
    chunk_rows: int | None = None,
) -> Ranking:
    """Score every cached example against ``query`` and keep the top (or bottom) ``top_k``.

    Scores follow the registered score ``score`` (default: the query's, cosine unless chosen by
    :func:`~lensattr.select`); higher = more associated with the treatment side. The cache is
    streamed in blocks of ``chunk_rows`` rows (never a full fp32 copy); a layer sweep calls this
    once per layer on the same cache.

    Args:
        cache: an opened :class:`~lensattr.store.cache.Cache` or its directory.
        query: a :class:`~lensattr.query.Query`, an :class:`~lensattr.ensemble.Ensemble`
            (each row scored by the mean of the members' standardised scores, each member at
            its own layer), a saved file of either, a :class:`~lensattr.select.Selection` (its
            ensemble when it has one), or (with ``method="auto"``) query pairs.
        layer: a layer as :func:`~lensattr.layers.parse_layers` reads it (an int,
            negative from the model's last block; a TransformerLens hook name; a range
            ``"a:b"``), or ``"best"``; default: the layer (or layers) chosen for the query, else
            its best by held-out accuracy. Several layers (a list, ``"12,15"``, ``"12:16"``)
            score each row by the mean of its scores at those layers (each layer's query
            against that layer's cached statistic), as a gradient method scores all its
            modules at once.
        stat: cached statistic (default: the query's ``stat``).
        score: registered score name (default: the query's ``score``).
        top_k: how many to keep (``None``: all, sorted).
        bottom: keep the lowest scores instead.
        rows: rank only these cache rows: indices (``0 <= r < len(cache)``) or a boolean mask
            of ``len(cache)`` (default: all).
        method: ``"auto"``: choose statistic, query, score and layer with :func:`~lensattr.select`
            from the pairs given as ``query`` and this cache (needs ``model``).
        model: the model, for ``method="auto"``.
        chunk_rows: rows converted to fp32 at a time (default: about 32 MiB worth; rounded up
            to a multiple of :data:`SCORE_BLOCK`). The scores do not depend on it: each row is
            scored in the same block of :data:`SCORE_BLOCK` rows whatever it is.

    Raises:
        CacheError: the query was built with another model, settings, pool or statistic
            function than the cache, or has another dimension.
        QueryError: ``stat`` is not the statistic the query was built on.
        ValueError: ``top_k``, ``chunk_rows`` or ``rows`` out of range (one line naming it).
        MethodError: the score returned something else than one score per row.

    Examples:
        >>> # r = rank(cache, query, top_k=10); list(zip(r.ids, r.scores.tolist()))
    """
    top_k = positive_int("top_k", top_k, none=True)
    chunk_rows = positive_int("chunk_rows", chunk_rows, none=True)
    if not isinstance(bottom, bool):
        raise ValueError(f"bottom must be True or False, not {bottom!r}")
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    keep = row_indices(rows, len(cache))
    if method is not None:
        if method != "auto":
            raise ValueError(f"method {method!r}: only 'auto' is known (or pass a Query)")
        if model is None:
            raise ValueError("method='auto' builds the query from pairs: pass model=")
        from lensattr.select import select

        query = select(model, cache, query, rows=keep)
    ranked = as_ranked(query)
    if isinstance(ranked, Ensemble):
        if layer is not None or stat is not None or score is not None:
            raise ValueError(
                "an ensemble ranks each member at its own layer with its own statistic and "
                "score; rank one member (ensemble.members[i], or selection.query) to set them"
            )
        return _rank_ensemble(cache, ranked, top_k, bottom, keep, chunk_rows)
    query = ranked
    check_query(cache, query)
    layers = _layers_arg(layer, query, cache.n_layers)
    if stat is not None and stat != query.stat:
        raise QueryError(
            f"stat={stat!r}, but the query was built on {query.stat!r}: its vectors live in that "
            f"statistic's space; build a query on {stat!r} to rank it"
        )
    stat = query.stat
    score = score or query.score
    scorer = get_score(score)
    vectors = [query.vector(la).float() for la in layers]
    ctxs = [ScoreContext(cache=cache, stat=stat, layer=la) for la in layers]
    views = [cache.stat(stat, la) for la in layers]
    n_rows = len(views[0])
    keep_rows = None
    if keep is not None:
        keep_rows = torch.zeros(n_rows, dtype=torch.bool)
        keep_rows[keep] = True
    n_total = n_rows if keep is None else len(keep)
    if n_total == 0:
        raise ValueError("nothing to rank: the cache (or the rows asked for) is empty")
    block = SCORE_BLOCK
    chunk_rows = chunk_rows or max(1024, (32 << 20) // (4 * views[0].d_model))
    chunk_rows = -(-chunk_rows // block) * block  # whole blocks, aligned to row 0
    k = n_total if top_k is None else min(top_k, n_total)
    cand_s: list[torch.Tensor] = []  # each chunk's k best, in ranking order
    cand_i: list[torch.Tensor] = []
    nonfinite = 0
    for start in range(0, n_rows, chunk_rows):  # never a full fp32 copy
        stop = min(start + chunk_rows, n_rows)
        idx = torch.arange(start, stop)
        sel = None if keep_rows is None else keep_rows[start:stop]
        if sel is not None and not sel.any():
            continue
        s = torch.zeros(stop - start)
        for view, vec, ctx in zip(views, vectors, ctxs, strict=True):
            rows_, norms = view.span(start, stop)
            rows_ = rows_.to(torch.float32, copy=True)  # a fresh buffer: blocks stay aligned
            for b in range(0, stop - start, block):  # every row in its own block of row 0's grid
                if sel is None or sel[b : b + block].any():
                    part = slice(b, b + block)
                    s[part] += scorer.apply(rows_[part], norms[part], vec, ctx).float()
        s /= len(layers)
        if sel is not None:
            s, idx = s[sel], idx[sel]
        bad = ~torch.isfinite(s)
        nonfinite += int(bad.sum())
        s = (-s if bottom else s).masked_fill(bad, -torch.inf)  # non-finite: always last
        keep = torch.sort(-s, stable=True).indices[:k]
        cand_s.append(s[keep])
        cand_i.append(idx[keep])
    # one stable sort of the candidates: chunks ascend in row order, so ties keep the lower row
    s_all = torch.cat(cand_s) if cand_s else torch.empty(0)
    i_all = torch.cat(cand_i) if cand_i else torch.empty(0, dtype=torch.long)
    top = torch.sort(-s_all, stable=True).indices[:k]
    best_s, best_i = s_all[top], i_all[top]
    scores = -best_s if bottom else best_s
    if nonfinite:
        logger.warning("%d scores are not finite; they are ranked last", nonfinite)
        scores = torch.where(torch.isinf(best_s) & (best_s < 0), torch.nan, scores)
    return Ranking(
        ids=[cache.ids[i] for i in best_i.tolist()],
        scores=scores,
        rows=best_i,
        layer=layers[0] if len(layers) == 1 else layers,
        stat=stat,
        score=score,
        n_nonfinite=nonfinite,
        rule=query.rule,
        cache=cache,
    )


def _rank_ensemble(
    cache: Cache,
    ensemble: Ensemble,
    top_k: int | None,
    bottom: bool,
    rows: Any,
    chunk_rows: int | None,
) -> Ranking:
    """:func:`rank` for an :class:`~lensattr.ensemble.Ensemble`: each member ranks every row,
    its scores are standardised over the ranked rows, and each row's score is their mean."""
    ranked = [
        rank(cache, q, top_k=None, rows=rows, chunk_rows=chunk_rows) for q in ensemble.members
    ]
    idx = torch.sort(ranked[0].rows).values  # the ranked rows, in row order
    total = torch.zeros(len(idx), dtype=torch.float64)
    for r in ranked:
        total += standardised(r.scores_of(idx))
    s = (total / len(ranked)).float()
    bad = ~torch.isfinite(s)
    key = (s if bottom else -s).masked_fill(bad, torch.inf)  # non-finite: always last
    order = torch.sort(key, stable=True).indices  # ties keep the lower row
    order = order if top_k is None else order[:top_k]
    return Ranking(
        ids=[cache.ids[i] for i in idx[order].tolist()],
        scores=s[order],
        rows=idx[order],
        layer=ensemble.layers[0] if len(ensemble.layers) == 1 else ensemble.layers,
        stat="+".join(ensemble.stats),
        score=ENSEMBLE_SCORE,
        n_nonfinite=int(bad.sum()),
        rule=f"ensemble of {len(ensemble.members)}",
        cache=cache,
    )


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` ``[1, ...]`` as ``n`` identical rows (a view)."""
    return x.expand(n, *x.shape[1:])


def check_query(cache: Cache, query: Query) -> None:
    """Raise :class:`CacheError` naming the field where ``query`` does not fit ``cache``: the
    model, the capture settings, the function that computed its statistic, its dimension, or
    (for a pool-aware query) the pool it was built against."""
    check_fits(
        cache, query.model, query.capture, "the query's pairs", {query.stat: query.stat_module}
    )
    dims = sorted({int(v.shape[0]) for v in query.vectors.values()})
    if dims != [cache.d_model]:
        raise CacheError(
            f"{cache.path}: the query's vectors have {', '.join(map(str, dims))} dimensions, the "
            f"cache's rows {cache.d_model}: build the query with the cache's model"
        )
    if query.pool is not None and query.pool != content_digest(cache):
        raise CacheError(
            f"{cache.path}: the query contrasts with another pool (its moments came from a "
            "different cache); rebuild it with pool= this cache"
        )


@dataclass
class Explanation:
    """Per-token contributions of one example's response to its score."""

    tokens: list[str]
    contributions: torch.Tensor  # [n_response] = s_token . q
    total: float  # mean of contributions = <s(x), q>

    def __repr__(self) -> str:
        return f"Explanation({len(self.tokens)} tokens, total {self.total:+.4g}: {self.text()!r})"

    def text(self, color: bool = False) -> str:
        """The reply with its tokens highlighted by contribution (see
        :func:`~lensattr.tables.tokens_text`): ANSI colours with ``color``, else the strongest
        tokens in ``[[ ]]`` (raise the score) or ``(( ))`` (lower it)."""
        return tokens_text(self.tokens, self.contributions.tolist(), color=color)

    def _repr_html_(self) -> str:
        return tokens_html(self.tokens, self.contributions.tolist())


def explain(
    model: Any,
    example: Any,
    query: Query,
    layer: Any = None,
    *,
    stat: str | None = None,
    max_length: int | None = 512,
    config: CaptureConfig | None = None,
) -> Explanation:
    """Which response tokens of ``example`` drive its score: each token's statistic dotted with
    the query.

    The statistic of token ``p`` is the statistic (``stat``, default: the query's) evaluated
    with the response mask restricted to ``p``; for the mean-pooled built-ins the contributions
    average exactly to ``<s(x), q>``. At a layer set (``layer`` a list, or a query whose
    chosen layer is one) each token's contribution is the mean of its contributions at those
    layers.

    ``config`` (e.g. the cache's ``capture_config``) gives the truncation as the build and the
    pairs took it, instead of ``max_length`` (:func:`~lensattr.config.resolve_config`).

    Raises:
        QueryError: the query's pairs were captured with another ``max_length`` or pooling
            (:func:`~lensattr.config.check_capture`); a single example has no padding.
        ValueError: ``config=`` next to a ``max_length`` off its default.

    Examples:
        >>> from lensattr import behavior_query, load_model
        >>> m = load_model("tiny-random")
        >>> q = behavior_query(m, [{"prompt": "Q", "treatment": "Yes", "control": "No"}], layers=2)
        >>> e = explain(m, {"id": "x", "prompt": "Q", "response": "Sure"}, q, 2)
        >>> len(e.tokens) == len(e.contributions)
        True
    """
    max_length = resolve_config(config, "explain", max_length=max_length).max_length
    model = load_model(model)
    query = as_query(query)
    layers = _layers_arg(layer, query, model.n_layers)
    spec = get_stat(stat or query.stat)
    if spec.pooling != POOLINGS[0]:  # each reply token's term is the statistic at a one-hot mask
        raise QueryError(
            f"explain splits a mean over the reply tokens; {spec.name} pools by {spec.pooling!r}"
        )
    check_capture(  # one example has no padding: its side cannot differ
        query.capture,
        CaptureConfig(max_length=max_length),
        what="the query's pairs",
        other="this explain",
        error=lambda text: QueryError(f"{text}; pass the query's setting"),
        fields=("max_length", "pooling"),
    )
    ex = example if isinstance(example, Example) else load_examples([example])[0]
    enc = encode(model.tokenizer, ex, max_length)
    batch = collate([enc], model.pad_id, "right", str(model.device))
    # From the first position that predicts a reply token on: acts.mask says where the reply is.
    by_layer = capture(
        model,
        batch,
        list(layers),
        grad=spec.needs_grad,
        sites=spec.sites,
        keep_prompt=spec.reads_prompt,  # the authors' residual change reads the prompt too
    )
    per_layer = []
    for la in layers:  # a layer set: the mean of each layer's contributions, as rank scores it
        acts = by_layer[la]
        positions = acts.mask[0].nonzero()[:, 0]
        n = len(positions)
        one_hot = torch.zeros((n, acts.mask.shape[1]), dtype=torch.bool, device=acts.mask.device)
        one_hot[torch.arange(n), positions] = True
        single = acts.map(functools.partial(_repeat, n=n), mask=one_hot)
        per_layer.append(spec.apply(single).float().cpu() @ query.vector(la))
    contrib = torch.stack(per_layer).mean(0)
    tokens = [model.tokenizer.decode([t]) for t in enc.ids[enc.n_prompt :]]
    return Explanation(tokens=tokens, contributions=contrib, total=float(contrib.mean()))
