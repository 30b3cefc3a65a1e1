"""Deprecated: moved to :mod:`lensattr.backends.sites` (this path is kept for one release)."""

from lensattr._deprecated import moved

moved(__name__)
