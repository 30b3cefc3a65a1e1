"""The built-in statistics: one vector per example and layer from a
:class:`~lensattr.types.LayerActs`, and the poolings they are built from.

Notation (per layer ``l``, token position ``p`` of example ``x``): ``z_in`` is the block input,
``z_out`` its output, ``g = d loss_x / d z_out`` (the gradient) and ``R(x)`` the response
positions. Every built-in statistic is a mean over ``R(x)`` of a per-token statistic
(:func:`pool`, :func:`pool_weighted`); :func:`residual_change`'s per-token statistic also reads
the prompt positions.
"""

import torch
from einops import einsum

from lensattr.registry import register_stat
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


def _gram_weights(acts: LayerActs) -> torch.Tensor:
    """``<m_R, z_in,s>`` at every position ``s``, with ``m_R = mean_{t in R(x)} z_in,t``."""
    m = pool(acts.z_in, acts.mask)
    return einsum(acts.z_in, m, "b p d, b d -> b p")


@register_stat("residual_change", reads_prompt=True)
def residual_change(acts: LayerActs) -> Vecs:
    """The residual change as the paper's authors ran it (``residual_change_treatment``):

    ``t(x) = -mean_{t in R(x)} sum_s <z_in,t, z_in,s> g_s = -sum_s <m_R, z_in,s> g_s``,

    with ``s`` over every position of the sequence (prompt and reply) and
    ``m_R = mean_{t in R(x)} z_in,t``. It is the change of the block output at the reply
    positions after one gradient step on the linear surrogate ``z_out = z_in W``
    (``dW = -sum_s z_in,s^T g_s``, so ``dz_out,t = z_in,t dW``), averaged over ``R(x)``. It reads
    the gradient at the prompt positions, so its capture runs the backward through the prompt
    (``reads_prompt``): the one built-in that does.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # a prompt position, then the reply
        >>> g = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
        >>> acts = LayerActs(z_in=z, z_out=z, grad=g, mask=torch.tensor([[False, True]]))
        >>> residual_change(acts)  # m_R = (0, 2): weights (0, 4), so -(4 * g_1)
        tensor([[-0., -4.]])
    """
    return -einsum(_gram_weights(acts), _grad(acts), "b p, b p d -> b d")


@register_stat("residual_change_reply")
def residual_change_reply(acts: LayerActs) -> Vecs:
    """:func:`residual_change` with ``s`` over the reply positions only (the authors'
    ``residual_change_treatment_with_mask_corrected``):
    ``-sum_{s in R(x)} <m_R, z_in,s> g_s``.

    Reads the reply positions only, so it costs what the other built-ins cost.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
        >>> g = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
        >>> acts = LayerActs(z_in=z, z_out=z, grad=g, mask=torch.tensor([[True, True]]))
        >>> residual_change_reply(acts)  # m_R = (0.5, 1): weights (0.5, 2)
        tensor([[-0.5000, -2.5000]])
    """
    w = _gram_weights(acts) * acts.mask.to(acts.z_in.dtype)
    return -einsum(w, _grad(acts), "b p, b p d -> b d")


@register_stat("residual_change_printed")
def residual_change_printed(acts: LayerActs) -> Vecs:
    """Ablation: the writeup's printed last line, ``mean_{p in R(x)} -z_in,p <z_in,p, g_p>``.

    It points along ``z_in`` where the derivation (:func:`residual_change`) points along the
    gradients; the two are nearly orthogonal on SmolLM2 (median cosine per example < 0.1).
    Not what the authors ran.

    Examples:
        >>> import torch
        >>> z, g = torch.ones(1, 2, 3), torch.ones(1, 2, 3)
        >>> acts = LayerActs(z_in=z, z_out=z, grad=g, mask=torch.tensor([[False, True]]))
        >>> residual_change_printed(acts)  # -z <z, g> = -(1, 1, 1) * 3
        tensor([[-3., -3., -3.]])
    """
    dot = (acts.z_in * _grad(acts)).sum(-1)
    return pool_weighted(acts.z_in, -dot, acts.mask)


@register_stat("residual_change_diagonal")
def residual_change_diagonal(acts: LayerActs) -> Vecs:
    """Ablation: the ``s = t`` terms of :func:`residual_change`,
    ``mean_{p in R(x)} -||z_in,p||^2 g_p`` (each reply position's own contribution only)."""
    sq = acts.z_in.pow(2).sum(-1)
    return pool_weighted(_grad(acts), -sq, acts.mask)


@register_stat("resid_post", needs_grad=False)
def resid_post(acts: LayerActs) -> Vecs:
    """Pooled block output ``mean_{p in R(x)} z_out,p`` (the activation that persona-vector
    filtering projects)."""
    return pool(acts.z_out, acts.mask)


@register_stat("grad")
def grad(acts: LayerActs) -> Vecs:
    """Pooled output gradient ``mean_{p in R(x)} g_p``."""
    return pool(_grad(acts), acts.mask)
