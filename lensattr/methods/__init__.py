"""The registered methods: the built-in statistics, query rules and scores.

:mod:`~lensattr.methods.statistics` (one vector per example and layer, and the poolings
:func:`pool` and :func:`pool_weighted`), :mod:`~lensattr.methods.queries` (the rules that
build a query from pairs) and :mod:`~lensattr.methods.scores` (how a cached row compares with
a query). Importing this package registers them (``lensattr/__init__.py`` does, before
anything else); every name stays importable from here (``lensattr.methods.pool_weighted``).
"""

from lensattr.methods.queries import contrast, pool_contrast, repsim, unit_contrast
from lensattr.methods.scores import (
    centered_cosine,
    cosine,
    deflated_cosine,
    dot,
    whitened_cosine,
)
from lensattr.methods.statistics import (
    grad,
    pool,
    pool_weighted,
    resid_post,
    residual_change,
    residual_change_diagonal,
    residual_change_printed,
    residual_change_reply,
)

__all__ = [
    "centered_cosine",
    "contrast",
    "cosine",
    "deflated_cosine",
    "dot",
    "grad",
    "pool",
    "pool_contrast",
    "pool_weighted",
    "repsim",
    "resid_post",
    "residual_change",
    "residual_change_diagonal",
    "residual_change_printed",
    "residual_change_reply",
    "unit_contrast",
    "whitened_cosine",
]
