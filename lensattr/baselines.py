"""Baselines a user tries first: search the replies' text, and representation similarity.

Nobody should adopt an attribution method that does not beat searching the text, so
``lensattr bench``, ``lensattr demo`` and ``benchmarks/bench_peers.py`` report these beside
``auto`` on the same pools and metrics, each at a setting chosen without labels.

**Lexical** (:func:`lexical_scores`, :data:`LEXICAL`): each pool text (an example's reply) is
scored against the query pairs' replies in TF-IDF space (scikit-learn's ``TfidfVectorizer``) or
by BM25 (``bm25s``). Both come with the ``bench`` and ``demo`` extras. :func:`lexical_select`
chooses the kind from the pairs and the unlabelled pool by the criterion ``auto`` uses
(:mod:`lensattr.criterion`).

The text representation is fitted on the pool texts plus the pairs' replies (no labels enter:
the vocabulary, document frequencies and BM25's lengths are properties of the text), so the
held-out scores the choice is made on and the final scores come from one fit. It is chosen for
replies of one word: persona replies are ``"Yes"`` or ``"No"``, and scikit-learn's default
would drop both of the things that matter there:

* stop words are **kept**: its English list holds ``no``, ``not``, ``never``, ``i``, ``a``;
* tokens of **one character** count (``(?u)\\b\\w+\\b`` instead of ``\\w\\w+``): ``I``, ``A``,
  a digit;
* lowercased; unigrams and bigrams (a one-word reply has no bigram, and is its unigram);
  sublinear term frequency ``1 + log tf``; smoothed IDF ``log((1 + n) / (1 + df)) + 1``;
  each row L2-normalised. A text with no token is the zero vector and scores 0.

Measured (the bench-peers pools: 600 clean rows + 50 plants of each label, 32 query pairs,
seed 0): on medhallu (long replies) the kind chosen without labels (``tfidf_pool_contrast``)
reaches P@50 0.62 with these settings and 0.54 with scikit-learn's default tokens and stop
words. On the persona traits no setting separates the plants (P@50 0.24-0.28 on agreeableness,
narcissism and psychopathy): about half the treatment replies are "Yes" and half "No", so a
reply alone does not show the trait; with the default stop words a "No" reply is an empty
document besides.

**RepSim** (:data:`REPSIM`): the cosine of each example's pooled hidden state (``resid_post``)
to the normalised mean of the treatment replies' normalised states, the query ``repsim``
registered in :mod:`lensattr.methods.queries`; :func:`repsim_select` chooses its layer by
``auto``'s criterion.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensattr.criterion import Method, heldout_auroc, heldout_log_rank
from lensattr.optional import require
from lensattr.query import FOLDS, interleaved_folds
from lensattr.select import Selection, select

LEXICAL = ("tfidf_treatment", "tfidf_contrast", "tfidf_pool_contrast", "bm25_treatment")
"""The lexical kinds, in the order :func:`lexical_select` breaks ties."""

REPSIM = Method("repsim", "resid_post", "cosine")
"""Representation similarity (DATE-LM's strongest method on toxicity filtering): the cached
``resid_post`` statistic (the pooled hidden state after a block), the query ``repsim``
(``q = norm(mean_j norm(s(x'_j)))``, the treatment replies only) and cosine."""

TOKENS = r"(?u)\b\w+\b"
"""The token pattern of both representations: words of one character count."""

BM25_K1, BM25_B = 1.5, 0.75
"""BM25's term-frequency saturation and length normalisation (bm25s's Lucene defaults)."""


@dataclass
class _Fitted:
    """The pool texts plus the pairs' replies (``docs``; the pool is ``docs[:n_pool]``) in
    TF-IDF space (``tfidf``: a sparse ``[n_docs, vocab]`` matrix with unit rows) and indexed
    for BM25 (``bm25``)."""

    n_pool: int
    tfidf: Any
    bm25: Any
    tokens: list[list[str]]


def _check_texts(name: str, texts: Sequence[str], *, empty: bool = False) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name}: a sequence of texts, not one string")
    out = list(texts)
    if not out and not empty:
        raise ValueError(f"{name}: no texts")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}]: a text (str), got {type(t).__name__}")
    return out


def _fit(docs: list[str], n_pool: int) -> _Fitted:
    """Fit the TF-IDF vectorizer on ``docs`` and index them for BM25."""
    text = require("sklearn.feature_extraction.text", "bench")
    bm25s = require("bm25s", "bench")
    # bm25s sets its own logger to DEBUG when imported: a line per index under any root handler
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    vec = text.TfidfVectorizer(
        lowercase=True,
        token_pattern=TOKENS,
        ngram_range=(1, 2),
        stop_words=None,
        sublinear_tf=True,
        smooth_idf=True,
        norm="l2",
    )
    tfidf = vec.fit_transform(docs).tocsr()
    unigrams = text.CountVectorizer(lowercase=True, token_pattern=TOKENS).build_analyzer()
    tokens = [unigrams(d) for d in docs]
    bm25 = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
    bm25.index(tokens, show_progress=False)
    return _Fitted(n_pool, tfidf, bm25, tokens)


def _cosine(x: Any, q: np.ndarray) -> np.ndarray:
    """Cosine of the unit (or zero) rows of ``x`` to ``q``; 0 for every row when ``q`` is 0."""
    norm = float(np.linalg.norm(q))
    if norm == 0.0:
        return np.zeros(x.shape[0])
    return np.asarray(x @ q).ravel() / norm


def _mean(x: Any, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(x[np.asarray(rows)].mean(0)).ravel()


def _kind_scores(f: _Fitted, kind: str, treatment: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Every doc's score under ``kind`` with the query built from the doc rows ``treatment``
    and ``control`` (the pool is always ``docs[:n_pool]``)."""
    if kind == "bm25_treatment":
        bag = [tok for i in treatment for tok in f.tokens[i]]
        ids = f.bm25.get_tokens_ids(bag)
        if not ids:
            return np.zeros(f.tfidf.shape[0])
        return np.asarray(f.bm25.get_scores_from_ids(ids), dtype=np.float64)
    q = _mean(f.tfidf, treatment)
    if kind == "tfidf_contrast":
        q = q - _mean(f.tfidf, control)
    elif kind == "tfidf_pool_contrast":
        q = q - _mean(f.tfidf, np.arange(f.n_pool))
    return _cosine(f.tfidf, q)


def _check_kind(kind: str) -> None:
    if kind not in LEXICAL:
        raise ValueError(f"kind {kind!r}: one of {', '.join(LEXICAL)}")


def lexical_scores(
    texts: Sequence[str], treatment: Sequence[str], control: Sequence[str], kind: str
) -> torch.Tensor:
    """Score each text against the treatment replies by their words; higher = more like them.

    With ``v(x)`` the unit TF-IDF vector of text ``x`` (see the module doc), ``T`` the
    treatment replies, ``C`` the control replies and ``P`` the texts (the pool),
    ``mean_T v = (1 / |T|) sum_{x in T} v(x)``:

    * ``tfidf_treatment``: ``cos(v(x), mean_T v)``;
    * ``tfidf_contrast``: ``cos(v(x), mean_T v - mean_C v)``;
    * ``tfidf_pool_contrast``: ``cos(v(x), mean_T v - mean_P v)``;
    * ``bm25_treatment``: BM25 (Lucene form) of ``x`` against the treatment replies' tokens
      taken as one query bag, every occurrence counted:
      ``sum_{w in bag} idf(w) tf(w, x) / (tf(w, x) + k1 (1 - b + b |x| / avgdl))`` with
      ``idf(w) = log(1 + (N - df(w) + 0.5) / (df(w) + 0.5))``. BM25 is a sum over the query's
      tokens, so the bag is ``|T|`` times the mean over per-reply queries: the two rank
      identically, and the bag is one pass over the index.

    A zero query (the treatment and control replies with the same mean vector) scores every
    text 0; so does BM25 when no treatment word occurs in any text.

    Args:
        texts: the pool: one text per example (its reply).
        treatment: the query pairs' treatment replies.
        control: their control replies (``tfidf_contrast`` uses them; every kind fits the
            representation on them too).
        kind: one of :data:`LEXICAL`.

    Returns:
        float32 ``[len(texts)]``.

    Raises:
        ValueError: an unknown ``kind``, no texts, no treatment replies, or no control replies
            for ``tfidf_contrast``.
        ModuleNotFoundError: scikit-learn or bm25s missing (the message names the extra).

    Examples:
        >>> s = lexical_scores(["Yes", "No", "Maybe so"], ["Yes", "Yes"], ["No", "No"],
        ...                    "tfidf_contrast")
        >>> [round(x, 3) for x in s.tolist()]
        [0.707, -0.707, 0.0]
    """
    _check_kind(kind)
    pool = _check_texts("texts", texts)
    t = _check_texts("treatment", treatment)
    c = _check_texts("control", control, empty=True)
    if kind == "tfidf_contrast" and not c:
        raise ValueError("control: no texts (tfidf_contrast subtracts the control replies' mean)")
    f = _fit([*pool, *t, *c], len(pool))
    rows = np.arange(len(pool), len(pool) + len(t) + len(c))
    s = _kind_scores(f, kind, rows[: len(t)], rows[len(t) :])
    return torch.from_numpy(s[: len(pool)]).float()


def lexical_select(
    texts: Sequence[str],
    pairs_treatment: Sequence[str],
    pairs_control: Sequence[str],
    folds: int = FOLDS,
) -> tuple[str, list[dict[str, Any]]]:
    """Choose the lexical kind without labels, by ``auto``'s held-out criterion.

    The pairs are split into interleaved folds (:func:`lensattr.query.interleaved_folds`); for
    each fold every kind's query is built from the other folds' replies, and the pool and the
    held-out replies are scored with it. A kind's criterion is the held-out treatments'
    log-rank among the pool and the held-out controls
    (:func:`lensattr.criterion.heldout_log_rank`) times their AUROC against the held-out
    controls (:func:`lensattr.criterion.heldout_auroc`), each a mean over the folds: what
    :func:`lensattr.select` computes for a method at a layer. The representation is fitted
    once on the pool texts plus every pair's replies (see the module doc), as
    :func:`lexical_scores` fits it.

    Args:
        texts: the pool: one text per example (its reply).
        pairs_treatment: the query pairs' treatment replies.
        pairs_control: their control replies, in the same order.
        folds: interleaved folds of the pairs (at most one per pair).

    Returns:
        The chosen kind (highest criterion; ties: held-out accuracy, then the order of
        :data:`LEXICAL`) and the table: one row per kind with ``kind``, ``criterion``,
        ``log_rank``, ``auroc`` and ``accuracy`` (the fraction of pairs whose held-out
        treatment scores above its control).

    Raises:
        ValueError: fewer than 2 pairs, sides of different lengths, ``folds < 2``, or no texts.

    Examples:
        >>> pool = ["the cat sat", "a dog ran", "I am so sorry to hear that", "blue sky"]
        >>> t = ["I am so sorry", "so sorry for you", "sorry, that is hard"]
        >>> kind, table = lexical_select(pool, t, ["ok", "fine", "noted"], folds=3)
        >>> kind in LEXICAL, len(table)
        (True, 4)
    """
    pool = _check_texts("texts", texts)
    t = _check_texts("pairs_treatment", pairs_treatment)
    c = _check_texts("pairs_control", pairs_control)
    if len(t) != len(c):
        raise ValueError(
            f"pairs_treatment has {len(t)} replies and pairs_control {len(c)}: one each per pair"
        )
    if len(t) < 2:
        raise ValueError(f"lexical_select needs at least 2 pairs to hold some out, got {len(t)}")
    if folds < 2:
        raise ValueError(f"folds={folds}: at least 2")
    n, m = len(pool), len(t)
    f = _fit([*pool, *t, *c], n)
    t_rows, c_rows = np.arange(n, n + m), np.arange(n + m, n + 2 * m)
    table: list[dict[str, Any]] = []
    for kind in LEXICAL:
        log_rank, auroc, hits = [], [], 0
        for test, train in interleaved_folds(m, folds):
            tr = train.numpy()
            s = torch.from_numpy(_kind_scores(f, kind, t_rows[tr], c_rows[tr])).float()
            te = test.numpy()
            s_t, s_c = s[t_rows[te]], s[c_rows[te]]
            log_rank.append(heldout_log_rank(s_t, torch.cat([s[:n], s_c])))
            auroc.append(heldout_auroc(s_t, s_c))
            hits += int((s_t > s_c).sum())
        lr, au = sum(log_rank) / len(log_rank), sum(auroc) / len(auroc)
        table.append(
            {"kind": kind, "criterion": lr * au, "log_rank": lr, "auroc": au, "accuracy": hits / m}
        )
    best = max(table, key=lambda r: (r["criterion"], r["accuracy"], -LEXICAL.index(r["kind"])))
    return best["kind"], table


def repsim_select(cache: Any, pairs: Any, model: Any = None, **kwargs: Any) -> Selection:
    """RepSim at the layer (or layer set) ``auto``'s criterion chooses for it, without labels:
    :func:`lensattr.select` with :data:`REPSIM` as the only candidate.

    Args:
        cache: the cache to rank (it must hold ``resid_post``).
        pairs: the query pairs or their :class:`~lensattr.query.PairStats`.
        model: the model, when ``pairs`` are not yet captured.
        **kwargs: :func:`lensattr.select`'s keywords (``layers``, ``rows``, ``folds``, ...).

    Returns:
        The :class:`~lensattr.select.Selection`: ``rank(cache, selection)`` ranks by RepSim.
    """
    return select(model, cache, pairs, methods=[REPSIM], **kwargs)


__all__ = [
    "BM25_B",
    "BM25_K1",
    "LEXICAL",
    "REPSIM",
    "TOKENS",
    "lexical_scores",
    "lexical_select",
    "repsim_select",
]
