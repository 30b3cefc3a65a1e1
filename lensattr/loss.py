"""Deprecated: moved to :mod:`lensattr.backends.loss` (this path is kept for one release)."""

from lensattr._deprecated import moved

moved(__name__)
