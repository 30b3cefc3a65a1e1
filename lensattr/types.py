"""Shape aliases used across lensattr (checked at run time in the tests by jaxtyping + beartype)."""

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
"""One vector, e.g. a behaviour query psi at one layer."""
Queries = Float[Tensor, "d_model *q"]
"""One query psi ``[d_model]``, or several as columns ``[d_model, q]`` (batched scores)."""
QueryScores = Float[Tensor, "n *q"]
"""Scores of ``n`` rows against one query ``[n]`` or several ``[n, q]``."""
Scores = Float[Tensor, " n"]
"""One score (or one row norm) per cached example."""

__all__ = ["Acts", "Mask", "TokenIds", "Vecs", "Vec", "Queries", "QueryScores", "Scores"]
