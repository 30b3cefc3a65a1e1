"""The built-in query rules: how a behaviour query is built from its pairs.

A rule maps the statistic ``s`` of each pair's treatment reply ``x'_j`` and control reply
``x_j`` (and, when it is pool-aware, the pool's moments of that statistic) to one contribution
per pair; the query is ``q = norm(mean_j contribution_j)``.
"""

from typing import Any

from lensattr.moments import Moments
from lensattr.registry import register_query
from lensattr.types import Vecs


@register_query("contrast", stat="residual_change")
def contrast(treatment: Vecs, control: Vecs, pool: Moments | None = None) -> Vecs:
    """Treatment-minus-control contrast: ``q = norm(mean_j s(x'_j) - s(x_j))``.

    With ``s`` = pooled ``z_out`` this is the residual-difference query (``residual_diff``);
    ``contrast`` takes any cached statistic.

    Examples:
        >>> import torch
        >>> contrast(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
        tensor([[1., 0.]])
    """
    return treatment - control


register_query("residual_diff", stat="resid_post", stats=("resid_post",))(contrast)


@register_query("unit_contrast", stat="residual_change")
def unit_contrast(treatment: Vecs, control: Vecs, pool: Moments | None = None) -> Vecs:
    """Per-pair normalised contrast: ``q = norm(mean_j norm(s(x'_j) - s(x_j)))``.

    Each pair weighs the same, however large its difference: the authors' query (their
    ``cos_sim`` selection normalises every evaluation row before the mean). With ``s`` the
    authors' residual change it is the paper's query, registered as ``residual_change``.

    Examples:
        >>> import torch
        >>> unit_contrast(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 2))
        tensor([[1., 0.],
                [0., 1.]])
    """
    diff = treatment - control
    return diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-12)


register_query("residual_change", stat="residual_change", stats=("residual_change",))(unit_contrast)


@register_query("repsim", stat="resid_post", stats=("resid_post",))
def repsim(treatment: Vecs, control: Vecs, pool: Moments | None = None) -> Vecs:
    """Representation similarity (RepSim): ``q = norm(mean_j norm(s(x'_j)))``.

    The treatment replies alone, each normalised, the controls unused: scored by cosine, a row's
    score is its cosine to the mean direction of the treatment replies' representations, the
    strongest method of DATE-LM's toxicity filtering. A baseline, not a contrast.

    Examples:
        >>> import torch
        >>> repsim(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2))
        tensor([[0.6000, 0.8000]])
    """
    return treatment / treatment.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@register_query("pool_contrast", stat="resid_post", uses_pool=True)
def pool_contrast(treatment: Vecs, control: Vecs, pool: Moments | None = None) -> Vecs:
    """Treatment-minus-pool contrast: ``q = norm(mean_j s(x'_j) - mu)``, with ``mu`` the mean
    of ``s`` over the training pool (the cache being ranked).

    The control replies do not enter: what sets the behaviour's examples apart from the rest of
    *this* corpus is what the query points at, which is what ranking inside a mostly unrelated
    corpus needs.

    Examples:
        >>> import torch
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


register_query("persona", stat="resid_post", pairs_from=_persona_pairs)(contrast)
