"""The store: building, writing, opening and verifying a cache of statistics.

:mod:`~lensattr.store.cache` (``build_cache``, the layout), :mod:`~lensattr.store.shards`
(atomic shard writes and memory-mapped reads), :mod:`~lensattr.store.reader` (``open_cache``,
``Cache``), :mod:`~lensattr.store.records` (the cached examples) and
:mod:`~lensattr.store.names` (the spellings of storage dtypes and layers).
"""
