"""The built-in statistics (phi), queries (psi) and scores, registered in one place.

Notation (per layer ``l``, token position ``p`` of example ``x``): ``z_in`` is the block input,
``z_out`` its output, ``g = d loss_x / d z_out`` and ``R(x)`` the response positions. Every phi
is a mean over ``R(x)`` of a per-token statistic.
"""

from typing import Any

import torch
from einops import einsum

from lensattr.moments import Moments, ScoreContext
from lensattr.registry import register_phi, register_psi, register_score
from lensattr.types import Acts, LayerActs, Mask, Queries, QueryScores, Scores, Vecs


def pool(x: Acts, mask: Mask) -> Vecs:
    """Mean of ``x`` over the response positions: ``1/|R(x)| sum_{p in R(x)} x_p``."""
    weights = mask.to(x.dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    return einsum(x, weights, "b p d, b p -> b d")


def pool_weighted(x: Acts, w: torch.Tensor, mask: Mask) -> Vecs:
    """``mean_{p in R(x)} w_p x_p`` without materialising ``w_p x_p``."""
    weights = w * mask.to(w.dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(w.dtype)
    return einsum(x, weights, "b p d, b p -> b d")


def _grad(acts: LayerActs) -> Acts:
    if acts.grad is None:
        raise ValueError("this statistic needs gradients; capture with grad=True")
    return acts.grad


# ------------------------------------------------------------------------------------------ phi


@register_phi("residual_change")
def residual_change(acts: LayerActs) -> Vecs:
    """Residual change ``t(x) = mean_{p in R(x)} -z_in,p <z_in,p, g_p>`` (the paper's t^l(x)).

    Examples:
        >>> import torch
        >>> z, g = torch.ones(1, 2, 3), torch.ones(1, 2, 3)
        >>> acts = LayerActs(z_in=z, z_out=z, grad=g, mask=torch.tensor([[False, True]]))
        >>> residual_change(acts)  # -z <z, g> = -(1, 1, 1) * 3
        tensor([[-3., -3., -3.]])
    """
    dot = (acts.z_in * _grad(acts)).sum(-1)
    return pool_weighted(acts.z_in, -dot, acts.mask)


@register_phi("residual_change_exact")
def residual_change_exact(acts: LayerActs) -> Vecs:
    """Exact residual change ``mean_{p in R(x)} -||z_in,p||^2 g_p``.

    This is what the linear surrogate's one-step update gives when the algebra is carried
    through consistently; kept as an ablation of :func:`residual_change`.
    """
    sq = acts.z_in.pow(2).sum(-1)
    return pool_weighted(_grad(acts), -sq, acts.mask)


@register_phi("resid_post", needs_grad=False)
def resid_post(acts: LayerActs) -> Vecs:
    """Pooled block output ``mean_{p in R(x)} z_out,p`` (the activation that persona-vector
    filtering projects)."""
    return pool(acts.z_out, acts.mask)


@register_phi("grad")
def grad(acts: LayerActs) -> Vecs:
    """Pooled output gradient ``mean_{p in R(x)} g_p``."""
    return pool(_grad(acts), acts.mask)


# ------------------------------------------------------------------------------------------ psi
# A psi maps the statistic of each pair's treatment and control reply (and, when it is
# pool-aware, the pool's moments of that statistic) to one contribution per pair; the query is
# psi = norm(mean_j contribution_j).


@register_psi("contrast", stat="residual_change")
def contrast(treatment: Vecs, control: Vecs, pool: Moments | None = None) -> Vecs:
    """Treatment-minus-control contrast: ``psi = norm(mean_j s(x'_j) - s(x_j))``.

    With ``s = t`` this is the paper's residual-change query (registered as
    ``residual_change``), with ``s`` = pooled ``z_out`` the residual-difference query
    (``residual_diff``); ``contrast`` takes any cached statistic.

    Examples:
        >>> contrast(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
        tensor([[1., 0.]])
    """
    return treatment - control


register_psi("residual_change", stat="residual_change", stats=("residual_change",))(contrast)
register_psi("residual_diff", stat="resid_post", stats=("resid_post",))(contrast)


@register_psi("pool_contrast", stat="resid_post", uses_pool=True)
def pool_contrast(treatment: Vecs, control: Vecs, pool: Moments | None = None) -> Vecs:
    """Treatment-minus-pool contrast: ``psi = norm(mean_j s(x'_j) - mu)``, with ``mu`` the mean
    of ``s`` over the training pool (the cache being ranked).

    The control replies do not enter: what sets the behaviour's examples apart from the rest of
    *this* corpus is what the query points at, which is what ranking inside a mostly unrelated
    corpus needs.

    Examples:
        >>> m = Moments.of_rows(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
        >>> pool_contrast(torch.tensor([[3.0, 1.0]]), torch.zeros(1, 2), m)
        tensor([[2., 0.]])
    """
    if pool is None:
        raise ValueError("pool_contrast needs the training pool: pass pool=cache")
    return treatment - pool.mean.to(treatment.dtype)


def _persona_pairs(model: Any, source: Any, **kwargs: Any) -> Any:
    from lensattr.persona import persona_pairs

    return persona_pairs(model, source, **kwargs)


register_psi("persona", stat="resid_post", pairs_from=_persona_pairs)(contrast)


# -------------------------------------------------------------------------------------------- g
# Every built-in score takes one query psi [d] or several as columns [d, q] (batched).


def _cos(x: torch.Tensor, x_norms: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``<x_i, p> / (||x_i|| ||p||)`` for one query ``[d]`` or several ``[d, q]`` (0 for zeros)."""
    pn = p.norm(dim=0)
    den = x_norms[:, None] * pn if p.ndim == 2 else x_norms * pn
    return (x @ p) / den.clamp(min=torch.finfo(x.dtype).tiny)


@register_score("dot", batched=True)
def dot(rows: Vecs, norms: Scores, psi: Queries, ctx: Any = None) -> QueryScores:
    """``<phi, psi>``."""
    return rows @ psi


@register_score("cosine", batched=True)
def cosine(rows: Vecs, norms: Scores, psi: Queries, ctx: Any = None) -> QueryScores:
    """``<phi, psi> / (||phi|| ||psi||)`` (0 for a zero row). The default.

    Examples:
        >>> rows = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> cosine(rows, rows.norm(dim=1), torch.tensor([2.0, 0.0]))
        tensor([1.0000, 0.7071])
    """
    return _cos(rows, norms, psi)


@register_score("projection", batched=True)
def projection(rows: Vecs, norms: Scores, psi: Queries, ctx: Any = None) -> QueryScores:
    """``<phi, psi> / ||psi||``."""
    return (rows @ psi) / psi.norm(dim=0)


def _pool(rows: torch.Tensor, ctx: ScoreContext | None) -> Moments:
    """The pool's moments from the context; without one, the moments of the rows given."""
    return ctx.moments() if ctx is not None else Moments.of_rows(rows)


@register_score("centered_cosine", batched=True)
def centered_cosine(
    rows: Vecs, norms: Scores, psi: Queries, ctx: ScoreContext | None = None
) -> QueryScores:
    """``cos(phi - mu, psi)`` with ``mu`` the pool mean of phi. Removes the shared offset that the
    few huge outlier dimensions of the residual stream put into every row.

    Examples:
        >>> rows = torch.tensor([[1.0, 5.0], [3.0, 5.0]])  # mean (2, 5)
        >>> centered_cosine(rows, rows.norm(dim=1), torch.tensor([1.0, 0.0]))
        tensor([-1.,  1.])
    """
    x = rows - _pool(rows, ctx).mean32
    return _cos(x, x.norm(dim=1), psi)


@register_score("whitened_cosine", batched=True)
def whitened_cosine(
    rows: Vecs, norms: Scores, psi: Queries, ctx: ScoreContext | None = None
) -> QueryScores:
    """``cos(W (phi - mu), W psi)`` with ``W = (Sigma + lam I)^(-1/2)``, ``Sigma`` the pool
    covariance of phi and ``lam = 0.01 trace(Sigma) / d`` (ridge).

    The inner product is ``(phi - mu)^T (Sigma + lam I)^(-1) psi``: the activation-space analogue
    of TRAK's ``(X^T X)^(-1)`` preconditioner, so no single high-variance direction dominates.
    """
    m = _pool(rows, ctx)
    x = (rows - m.mean32) @ m.whitener.T  # W (phi - mu), row by row
    return _cos(x, x.norm(dim=1), m.whitener @ psi)


@register_score("deflated_cosine", batched=True)
def deflated_cosine(
    rows: Vecs, norms: Scores, psi: Queries, ctx: ScoreContext | None = None
) -> QueryScores:
    """``cos(P (phi - mu), P psi)`` with ``P = I - U U^T`` removing the pool's ``m = 10`` leading
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
    p = psi - u @ (u.T @ psi)
    return _cos(x, x.norm(dim=1), p)
