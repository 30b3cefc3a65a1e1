"""The built-in phi, psi and g, registered in one place.

Notation (per layer ``l``, token position ``p`` of example ``x``): ``z_in`` is the block input,
``z_out`` its output, ``g = d loss_x / d z_out`` and ``R(x)`` the response positions. Every phi
is a mean over ``R(x)`` of a per-token statistic.
"""

import contextlib
from pathlib import Path
from typing import Any

import torch
from einops import einsum

from lensattr.capture import LayerActs
from lensattr.registry import Phi, register_phi, register_psi, register_score
from lensattr.types import Acts, Mask, Scores, Vec, Vecs


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


def contrast(treatment: LayerActs, control: LayerActs, stat: Phi) -> Vecs:
    """Per-pair ``s(x'_j) - s(x_j)``; the query is ``norm(mean_j (s(x'_j) - s(x_j)))``."""
    return stat.fn(treatment) - stat.fn(control)


register_psi("contrast", stat="residual_change")(contrast)
register_psi("residual_change", stat="residual_change")(contrast)
register_psi("residual_diff", stat="resid_post")(contrast)


def _persona_pairs(model: Any, source: Any, **kwargs: Any) -> Any:
    from lensattr.persona import persona_pairs

    return persona_pairs(model, source, **kwargs)


register_psi("persona", stat="resid_post", pairs_from=_persona_pairs)(contrast)


# -------------------------------------------------------------------------------------------- g


@register_score("dot")
def dot(rows: torch.Tensor, norms: Scores, psi: Vec, ctx: Any = None) -> Scores:
    """``<phi, psi>``."""
    return rows @ psi


@register_score("cosine")
def cosine(rows: torch.Tensor, norms: Scores, psi: Vec, ctx: Any = None) -> Scores:
    """``<phi, psi> / (||phi|| ||psi||)`` (0 for a zero row). The default."""
    return (rows @ psi) / (norms * psi.norm()).clamp(min=torch.finfo(psi.dtype).tiny)


@register_score("projection")
def projection(rows: torch.Tensor, norms: Scores, psi: Vec, ctx: Any = None) -> Scores:
    """``<phi, psi> / ||psi||``."""
    return (rows @ psi) / psi.norm()


# Moments of phi over the training set, memoised per (cache path, stat, layer) in memory and in a
# small ``moments-{stat}-{layer}.safetensors`` file in the cache directory (when writable).
_MOMENTS: dict[tuple[str, str, int, float], tuple[torch.Tensor, torch.Tensor]] = {}


def _row_moments(rows: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, W)`` of a row matrix: the mean and ``W = (Sigma + lam I)^(-1/2)``, fp64."""
    x = rows.double()
    mu = x.mean(0)
    xc = x - mu
    sigma = xc.T @ xc / max(len(x) - 1, 1)
    return mu, _inv_sqrt(sigma, ridge)


def _inv_sqrt(sigma: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(Sigma + lam I)^(-1/2)`` with ``lam = ridge * trace(Sigma) / d`` (symmetric, fp64)."""
    d = sigma.shape[0]
    lam = ridge * float(torch.trace(sigma)) / d
    lam = lam if lam > 0 else ridge
    evals, evecs = torch.linalg.eigh(sigma + lam * torch.eye(d, dtype=sigma.dtype))
    return (evecs * evals.clamp(min=lam).rsqrt()) @ evecs.T


def phi_moments(ctx: Any, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-set mean ``mu`` and whitener ``(Sigma + lam I)^(-1/2)`` of phi at a layer.

    ``ctx`` is a :class:`lensattr.rank.ScoreContext` (``cache``, ``phi``, ``layer``).

    Streams the cached rows once (fp64 sums), then memoises the result in memory and as
    ``moments-{stat}-{layer}.safetensors`` in the cache directory.
    """
    from safetensors.torch import load_file, save_file

    path = Path(ctx.cache.path)
    key = (str(path.resolve()), ctx.phi, int(ctx.layer), float(ridge))
    if key in _MOMENTS:
        return _MOMENTS[key]
    fname = path / f"moments-{ctx.phi}-{ctx.layer}.safetensors"
    if fname.exists():
        t = load_file(str(fname))
        if int(t["n"]) == len(ctx.cache):
            out = (t["mu"], _inv_sqrt(t["sigma"], ridge))
            _MOMENTS[key] = out
            return out
    view = ctx.cache.stat(ctx.phi, ctx.layer)
    d = view.shape[1]
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros((d, d), dtype=torch.float64)
    n = 0
    for _, rows, _ in view.chunks(8192):
        x = rows.double()
        s1 += x.sum(0)
        s2 += x.T @ x
        n += len(x)
    mu = s1 / max(n, 1)
    sigma = (s2 - n * torch.outer(mu, mu)) / max(n - 1, 1)
    with contextlib.suppress(OSError):  # a read-only cache: keep the moments in memory only
        save_file({"mu": mu, "sigma": sigma, "n": torch.tensor(n)}, str(fname))
    out = (mu, _inv_sqrt(sigma, ridge))
    _MOMENTS[key] = out
    return out


def _moments(rows: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(ctx, "moments", None) is not None:  # a context may carry precomputed (mu, W)
        return ctx.moments
    if ctx is None or getattr(ctx, "cache", None) is None:
        return _row_moments(rows, 1e-2)  # no cache: the moments of the rows given
    return phi_moments(ctx)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(a.dtype).tiny
    return (a @ b) / (a.norm(dim=1) * b.norm()).clamp(min=tiny)


@register_score("centered_cosine")
def centered_cosine(rows: torch.Tensor, norms: Scores, psi: Vec, ctx: Any = None) -> Scores:
    """``cos(phi - mu, psi)`` with ``mu`` the training-set mean of phi (read from the cache via
    ``ctx``; without a context, the mean of ``rows``). Removes the shared offset that the few huge
    outlier dimensions of the residual stream put into every row.
    """
    mu, _ = _moments(rows, ctx)
    return _cos(rows.double() - mu, psi.double()).to(rows.dtype)


@register_score("whitened_cosine")
def whitened_cosine(rows: torch.Tensor, norms: Scores, psi: Vec, ctx: Any = None) -> Scores:
    """``cos(W (phi - mu), W psi)`` with ``W = (Sigma + lam I)^(-1/2)``, ``Sigma`` the training-set
    covariance of phi and ``lam = 0.01 trace(Sigma) / d`` (ridge).

    The inner product is ``(phi - mu)^T (Sigma + lam I)^(-1) psi``: the activation-space analogue
    of TRAK's ``(X^T X)^(-1)`` preconditioner, so no single high-variance direction dominates.
    """
    mu, w = _moments(rows, ctx)
    return _cos((rows.double() - mu) @ w, w @ psi.double()).to(rows.dtype)
