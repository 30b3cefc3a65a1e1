"""Deprecated: moved to :mod:`lensattr.store.records` (this path is kept for one release)."""

from lensattr._deprecated import moved

moved(__name__)
