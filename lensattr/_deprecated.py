"""Old spellings kept for one release: a keyword or attribute renamed to the one vocabulary.

Moved modules (:func:`moved`) keep their old import path the same way.

The cached per-example vector is the *statistic* (``stat``; ``phi`` is its symbol in the math)
and the scoring rule is the *score* (``score``); ``phi=`` and ``g=`` were their old keywords.
Each old spelling still works and emits a :class:`DeprecationWarning` naming the new one.
"""

import importlib
import sys
import warnings
from typing import Any, TypeVar

T = TypeVar("T")


def renamed(
    where: str, old: str, old_value: T | None, new: str, new_value: T | None, default: Any = None
) -> T | None:
    """The value of keyword ``new`` of ``where``, taking the deprecated ``old`` into account.

    ``old_value`` given: warn, and use it (a ``new_value`` other than ``default`` too: a
    :class:`TypeError`, the two would disagree).

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     renamed("rank", "g", "dot", "score", None), str(w[0].message)
        ('dot', 'rank(g=...) is deprecated: use score=')
    """
    if old_value is None:
        return new_value
    if new_value is not None and new_value != default and new_value != old_value:
        raise TypeError(f"{where}() got {new}= and its deprecated name {old}=: give {new}= only")
    warnings.warn(f"{where}({old}=...) is deprecated: use {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def alias(old: str, new: str) -> property:
    """A deprecated attribute ``old`` that reads (and writes) the attribute ``new``."""

    def warn(obj: Any) -> None:
        warnings.warn(
            f"{type(obj).__name__}.{old} is deprecated: use .{new}",
            DeprecationWarning,
            stacklevel=3,
        )

    def get(self: Any) -> Any:
        warn(self)
        return getattr(self, new)

    def put(self: Any, value: Any) -> None:
        warn(self)
        setattr(self, new, value)

    return property(get, put, doc=f"Deprecated name of :attr:`{new}`.")


MOVED = {
    "lensattr.backend": "lensattr.backends.backend",
    "lensattr.bridge": "lensattr.backends.bridge",
    "lensattr.capture": "lensattr.backends.capture",
    "lensattr.sites": "lensattr.backends.sites",
    "lensattr.loss": "lensattr.backends.loss",
    "lensattr.models": "lensattr.backends.models",
    "lensattr.cache": "lensattr.store.cache",
    "lensattr.reader": "lensattr.store.reader",
    "lensattr.records": "lensattr.store.records",
    "lensattr.names": "lensattr.store.names",
}
"""Old module path -> where the module lives now (each old path has a shim calling
:func:`moved`)."""


def moved(old: str) -> None:
    """Make the old module path ``old`` the module it moved to (one object: attributes, private
    names and monkeypatches are shared) and warn. Called by the shim at ``old``."""
    new = MOVED[old]
    module = importlib.import_module(new)
    warnings.warn(f"{old} moved to {new}", DeprecationWarning, stacklevel=3)
    sys.modules[old] = module
