"""The built-in scores: how a cached statistic row ``s`` compares with a query ``q``.

Every built-in score takes one query vector ``[d]`` or several as columns ``[d, q]`` (batched).
"""

from typing import Any

import torch

from lensattr.moments import Moments, ScoreContext
from lensattr.registry import register_score
from lensattr.types import Queries, QueryScores, Scores, Vecs


def _cos(x: torch.Tensor, x_norms: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``<x_i, p> / (||x_i|| ||p||)`` for one query ``[d]`` or several ``[d, q]`` (0 for zeros)."""
    pn = p.norm(dim=0)
    den = x_norms[:, None] * pn if p.ndim == 2 else x_norms * pn
    return (x @ p) / den.clamp(min=torch.finfo(x.dtype).tiny)


@register_score("dot", batched=True)
def dot(rows: Vecs, norms: Scores, query: Queries, ctx: Any = None) -> QueryScores:
    """``<s, q>``."""
    return rows @ query


@register_score("cosine", batched=True)
def cosine(rows: Vecs, norms: Scores, query: Queries, ctx: Any = None) -> QueryScores:
    """``<s, q> / (||s|| ||q||)`` (0 for a zero row). The default.

    Examples:
        >>> rows = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> cosine(rows, rows.norm(dim=1), torch.tensor([2.0, 0.0]))
        tensor([1.0000, 0.7071])
    """
    return _cos(rows, norms, query)


def _pool(rows: torch.Tensor, ctx: ScoreContext | None) -> Moments:
    """The pool's moments from the context; without one, the moments of the rows given."""
    return ctx.moments() if ctx is not None else Moments.of_rows(rows)


@register_score("centered_cosine", batched=True)
def centered_cosine(
    rows: Vecs, norms: Scores, query: Queries, ctx: ScoreContext | None = None
) -> QueryScores:
    """``cos(s - mu, q)`` with ``mu`` the pool mean of ``s``. Removes the shared offset that the
    few huge outlier dimensions of the residual stream put into every row.

    Examples:
        >>> rows = torch.tensor([[1.0, 5.0], [3.0, 5.0]])  # mean (2, 5)
        >>> centered_cosine(rows, rows.norm(dim=1), torch.tensor([1.0, 0.0]))
        tensor([-1.,  1.])
    """
    x = rows - _pool(rows, ctx).mean32
    return _cos(x, x.norm(dim=1), query)


@register_score("whitened_cosine", batched=True, full_rank=True)
def whitened_cosine(
    rows: Vecs, norms: Scores, query: Queries, ctx: ScoreContext | None = None
) -> QueryScores:
    """``cos(W (s - mu), W q)`` with ``W = (Sigma + lam I)^(-1/2)``, ``Sigma`` the pool
    covariance of ``s`` and ``lam = 0.01 trace(Sigma) / d`` (ridge).

    The inner product is ``(s - mu)^T (Sigma + lam I)^(-1) q``: the activation-space analogue
    of TRAK's ``(X^T X)^(-1)`` preconditioner, so no single high-variance direction dominates.

    It needs a pool of many more rows than dimensions: a covariance of ``n <= d`` rows is
    singular, and in the ``d - n + 1`` directions no pool row varies along, the ridge alone
    divides, so the query's part there, which no pool row shares, dominates its whitened
    direction; a little above ``d`` rows the smallest eigenvalues are still close to zero
    (registered ``full_rank``; ``auto`` offers it from
    :data:`~lensattr.select.ROWS_PER_DIMENSION` rows a dimension).
    """
    m = _pool(rows, ctx)
    x = (rows - m.mean32) @ m.whitener.T  # W (s - mu), row by row
    return _cos(x, x.norm(dim=1), m.whitener @ query)


@register_score("deflated_cosine", batched=True)
def deflated_cosine(
    rows: Vecs, norms: Scores, query: Queries, ctx: ScoreContext | None = None
) -> QueryScores:
    """``cos(P (s - mu), P q)`` with ``P = I - U U^T`` removing the pool's ``m = 10`` leading
    principal directions ``U`` (see :data:`lensattr.moments.DEFLATE`).

    What every training example varies along (length, format, topic) is taken out before the
    angle is measured; unlike whitening, the remaining directions keep their scale.

    Examples:
        >>> rows = torch.randn(40, 16)
        >>> s = deflated_cosine(rows, rows.norm(dim=1), torch.randn(16))
        >>> s.shape
        torch.Size([40])
    """
    m = _pool(rows, ctx)
    u = m.top
    x = rows - m.mean32
    x = x - (x @ u) @ u.T
    p = query - u @ (u.T @ query)
    return _cos(x, x.norm(dim=1), p)
