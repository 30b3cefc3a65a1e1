"""Shape aliases used across lensattr (checked at run time in the tests by jaxtyping + beartype),
and :class:`LayerActs`, the one record of a layer's captured activations."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxtyping import Bool, Float, Int
from torch import Tensor

Acts = Float[Tensor, "batch pos d_model"]
"""Activations or gradients at one site for a batch of token sequences."""
Mask = Bool[Tensor, "batch pos"]
"""True at the response positions of each example."""
TokenIds = Int[Tensor, "batch pos"]
Vecs = Float[Tensor, "batch d_model"]
"""One pooled vector per example."""
Vec = Float[Tensor, " d_model"]
"""One vector, e.g. a behaviour query at one layer."""
Queries = Float[Tensor, "d_model *q"]
"""One query vector ``[d_model]``, or several as columns ``[d_model, q]`` (batched scores)."""
QueryScores = Float[Tensor, "n *q"]
"""Scores of ``n`` rows against one query ``[n]`` or several ``[n, q]``."""
Scores = Float[Tensor, " n"]
"""One score (or one row norm) per cached example."""

EXTRA_SITES = ("attn_out", "mlp_out")
"""The extra per-layer sites a :class:`LayerActs` can carry (its optional fields)."""


@dataclass
class LayerActs:
    """Captured activations of one layer for a batch (what a statistic receives).

    Positions are the batch's, or, for a capture with ``keep_prompt=False`` (what lensattr's
    captures for statistics pooled over the response use), each row's from
    :func:`~lensattr.backends.prefix.prompt_cuts` on, left-aligned; ``mask`` is laid out with
    them.

    Every backend returns one per layer; row selection (:meth:`rows`) and element-wise
    transforms (:meth:`map`) keep all fields together, so code that splits or expands a capture
    never lists the fields itself.

    Attributes:
        z_in: block input, ``blocks.{l}.hook_resid_pre``.
        z_out: block output, ``blocks.{l}.hook_resid_post``.
        grad: ``d loss_x / d z_out`` (``None`` for a forward-only capture).
        mask: True at the response positions.
        attn_out: ``blocks.{l}.hook_attn_out``, when a statistic asked for it.
        mlp_out: ``blocks.{l}.hook_mlp_out``, when a statistic asked for it.

    Examples:
        >>> import torch
        >>> z = torch.arange(12.0).reshape(2, 3, 2)
        >>> mask = torch.ones(2, 3, dtype=torch.bool)
        >>> acts = LayerActs(z_in=z, z_out=z + 1, grad=None, mask=mask)
        >>> acts.rows(slice(1, None)).z_out[0, 0].tolist(), acts.extra
        ([7.0, 8.0], {})
    """

    z_in: Acts
    z_out: Acts
    grad: Acts | None
    mask: Mask
    attn_out: Acts | None = None
    mlp_out: Acts | None = None

    @property
    def extra(self) -> dict[str, Acts]:
        """The extra sites present, by kind (``"attn_out"``, ``"mlp_out"``)."""
        found = {kind: getattr(self, kind) for kind in EXTRA_SITES}
        return {kind: x for kind, x in found.items() if x is not None}

    def map(self, fn: Callable[[Tensor], Any], mask: Mask | None = None) -> "LayerActs":
        """A new record with ``fn`` applied to every activation tensor (``None`` stays ``None``).

        Args:
            fn: applied to ``z_in``, ``z_out``, ``grad`` and the extra sites.
            mask: the new record's mask (default: this one's, unchanged).
        """

        def f(x: Tensor | None) -> Any:
            return None if x is None else fn(x)

        return LayerActs(
            z_in=fn(self.z_in),
            z_out=fn(self.z_out),
            grad=f(self.grad),
            mask=self.mask if mask is None else mask,
            **{kind: f(getattr(self, kind)) for kind in EXTRA_SITES},
        )

    def rows(self, index: Any) -> "LayerActs":
        """The record restricted to the batch rows ``index`` (a slice, index or boolean tensor),
        mask included."""
        return self.map(lambda x: x[index], mask=self.mask[index])


__all__ = [
    "EXTRA_SITES",
    "LayerActs",
    "Acts",
    "Mask",
    "TokenIds",
    "Vecs",
    "Vec",
    "Queries",
    "QueryScores",
    "Scores",
]
