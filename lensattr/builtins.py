"""Deprecated: the built-in statistics, queries and scores live in :mod:`lensattr.methods`.

``import lensattr.builtins`` still works (it re-exports those names) and warns once; it will be
removed in a later release.
"""

import warnings

from lensattr.methods import (
    centered_cosine,
    contrast,
    cosine,
    deflated_cosine,
    dot,
    grad,
    pool,
    pool_contrast,
    pool_weighted,
    projection,
    resid_post,
    residual_change,
    residual_change_diagonal,
    residual_change_printed,
    residual_change_reply,
    whitened_cosine,
)

__all__ = [
    "pool",
    "pool_weighted",
    "residual_change",
    "residual_change_diagonal",
    "residual_change_printed",
    "residual_change_reply",
    "resid_post",
    "grad",
    "contrast",
    "pool_contrast",
    "dot",
    "cosine",
    "projection",
    "centered_cosine",
    "whitened_cosine",
    "deflated_cosine",
]

warnings.warn(
    "lensattr.builtins is renamed lensattr.methods; import from lensattr.methods",
    DeprecationWarning,
    stacklevel=2,
)
