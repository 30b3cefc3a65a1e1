"""The built-in statistics (phi in the math): one vector per example and layer from a
:class:`~lensattr.types.LayerActs`, and the poolings they are built from.

Notation (per layer ``l``, token position ``p`` of example ``x``): ``z_in`` is the block input,
``z_out`` its output, ``g = d loss_x / d z_out`` (the gradient) and ``R(x)`` the response
positions. Every built-in statistic is a mean over ``R(x)`` of a per-token statistic
(:func:`pool`, :func:`pool_weighted`).
"""

import torch
from einops import einsum

from lensattr.registry import register_phi
from lensattr.types import Acts, LayerActs, Mask, Vecs


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
