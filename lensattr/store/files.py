"""Every file of a cache directory, named in one place: :class:`CacheFiles`.

Layout of a cache directory::

    build.json                 what is being built (model fingerprint, layers, stats, ...)
    shard-00000.safetensors    rows of chunk 0: "{stat}/{layer}" [rows, d_model] + ".../norm"
    shard-00000.json           that chunk's ids, skipped examples, fingerprint and checksums
    ...
    records.jsonl.gz           the cached examples themselves (what ``rank`` prints)
    manifest.json              written last, atomically, with its own checksum: complete
    moments-{stat}-{layer}.safetensors   the pool's moments, once computed (large pools only)
    .lock                      held by a writer (``flock``) while it builds

The writers (:mod:`lensattr.store.cache`), the reader (:mod:`lensattr.store.reader`) and the
moments (:mod:`lensattr.moments`) ask a :class:`CacheFiles` for a file's path: changing the
layout is changing this class (and ``SCHEMA_VERSION`` in :mod:`lensattr.store.reader`).
"""

from dataclasses import dataclass
from pathlib import Path

from lensattr.store.shards import plain_file

RECORDS_FILE = "records.jsonl.gz"


@dataclass(frozen=True)
class CacheFiles:
    """The paths of a cache directory's files.

    Examples:
        >>> files = CacheFiles(Path("c"))
        >>> str(files.shard(3)), str(files.sidecar(3)), files.shard_name(3)
        ('c/shard-00003.safetensors', 'c/shard-00003.json', 'shard-00003.safetensors')
        >>> str(files.moments("grad", 12))
        'c/moments-grad-12.safetensors'
    """

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def build(self) -> Path:
        return self.root / "build.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def records(self) -> Path:
        return self.root / RECORDS_FILE

    @staticmethod
    def shard_name(index: int) -> str:
        """The file name of shard ``index`` (as the manifest lists it)."""
        return f"shard-{index:05d}.safetensors"

    def shard(self, index: int) -> Path:
        return self.root / self.shard_name(index)

    def sidecar(self, index: int) -> Path:
        """Shard ``index``'s sidecar: its ids, skipped examples and checksums."""
        return self.root / f"shard-{index:05d}.json"

    def moments(self, stat: str, layer: int) -> Path:
        """The pool's moments of ``stat`` at ``layer`` (see :mod:`lensattr.moments`), through the
        plain-name check: a statistic's name never leads out of the cache directory."""
        return plain_file(self.root, f"moments-{stat}-{int(layer)}.safetensors", "moments")
