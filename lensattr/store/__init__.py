"""The store: building, writing, opening and verifying a cache of statistics.

:mod:`~lensattr.store.cache` (``build_cache``, the layout), :mod:`~lensattr.store.shards`
(atomic shard writes and memory-mapped reads), :mod:`~lensattr.store.reader` (``open_cache``,
``Cache``), :mod:`~lensattr.store.records` (the cached examples) and
:mod:`~lensattr.store.names` (the spellings of storage dtypes and layers).

This package's path was the module now at :mod:`~lensattr.store.shards`; that module's names
stay reachable here for one release, with a ``DeprecationWarning``.
"""

import importlib
import warnings
from typing import Any

_SUBMODULES = ("cache", "names", "reader", "records", "shards")
_OLD = "lensattr" + ".store"  # the old module's path, spelled so that renames pass it by


def __getattr__(name: str) -> Any:
    """A name of the old module (now :mod:`~lensattr.store.shards`), with a warning."""
    if name.startswith("__") or name in _SUBMODULES:  # the import system finds these
        raise AttributeError(f"module {_OLD!r} has no attribute {name!r}")
    shards = importlib.import_module(f"{_OLD}.shards")
    if not hasattr(shards, name):
        raise AttributeError(f"module {_OLD!r} has no attribute {name!r}")
    warnings.warn(f"{_OLD}.{name} moved to {_OLD}.shards", DeprecationWarning, stacklevel=2)
    return getattr(shards, name)
