"""The store: writing, opening and verifying a cache of statistics; it imports no backend.

:mod:`~lensattr.store.files` (the layout: every file's name), :mod:`~lensattr.store.cache`
(writing a cache, shard by shard or from plain tensors; the build loop that captures the rows
sits above, in :mod:`lensattr.build`), :mod:`~lensattr.store.shards` (atomic shard writes and
memory-mapped reads), :mod:`~lensattr.store.reader` (``open_cache``, ``Cache``),
:mod:`~lensattr.store.records` (the cached examples) and :mod:`~lensattr.store.names` (the
spellings of storage dtypes and layers).
"""
