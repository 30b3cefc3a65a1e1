"""Open and verify a finished cache (the layout: :mod:`lensattr.store.files`; the writer:
:mod:`lensattr.store.cache`).

Opening checks the manifest's own checksum and fields, each file's name, size and header, and
every tensor's name, dtype and shape against the manifest, before anything is allocated. Each
tensor's SHA-256 (and that its values are finite) is checked the first time it is read, once per
open; :meth:`Cache.verify` checks every byte at once.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lensattr.config import CaptureConfig
from lensattr.data import Example
from lensattr.layers import layer_index
from lensattr.store.files import CacheFiles
from lensattr.store.names import SAFETENSORS_CODES
from lensattr.store.records import RecordsError, example_of, read_records
from lensattr.store.shards import (
    MappedShard,
    StatView,
    atomic_write_json,
    nonfinite_rows,
    plain_file,
    plain_name,
    sha256_file,
    tensor_key,
)
from lensattr.tables import layers_text

SCHEMA_VERSION = 3  # bumped on any change to the cache's files or manifest fields


class CacheError(RuntimeError):
    """A cache that is incomplete, corrupt, or built with something other than what is asked."""


INFORMATIVE = ("name", "path")  # recorded, but a renamed model or moved file is still the same


def diff_fields(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Human-readable differences between manifest fields ``have`` and ``want``."""
    out = []
    for k, v in want.items():
        h = have.get(k)
        if isinstance(v, dict) and isinstance(h, dict):
            fields = [kk for kk, vv in v.items() if kk not in INFORMATIVE and h.get(kk) != vv]
            if fields and k == "model" and (h.get("name") or v.get("name")):
                hn, vn = h.get("name"), v.get("name")
                out.append(
                    f"model: cache built with {hn!r}, not {vn!r}"
                    if hn != vn
                    else f"model: cache built with another {hn!r} (same name, other files)"
                )
            out += [f"{k}.{kk}: cache has {h.get(kk)!r}, expected {v[kk]!r}" for kk in fields]
        elif h != v:
            out.append(f"{k}: cache has {h!r}, expected {v!r}")
    return out


def canonical_sha256(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """The checksum a manifest stores in ``"manifest_sha256"``: of everything else in it."""
    return canonical_sha256({k: v for k, v in manifest.items() if k != "manifest_sha256"})


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write ``out/manifest.json`` atomically, with its checksum."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    atomic_write_json(
        CacheFiles(Path(out)).manifest, {**body, "manifest_sha256": canonical_sha256(body)}
    )


def name_ids(ids: list[str]) -> str:
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return ", ".join(repr(i) for i in ids[:5]) + more


@dataclass(repr=False)
class Cache:
    """An opened cache (see :func:`open_cache`).

    Each tensor's checksum (and that every value is finite) is checked the first time
    :meth:`stat` reads it, once per open; :meth:`verify` checks every byte now.
    """

    path: Path
    manifest: dict[str, Any]
    _shards: list[MappedShard] = field(repr=False, default_factory=list)
    _hash: bool = field(repr=False, default=True)
    _checked: set[tuple[int, str]] = field(repr=False, default_factory=set)

    @property
    def ids(self) -> list[str]:
        return self.manifest["ids"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def stats(self) -> list[str]:
        return self.manifest["stats"]

    @property
    def n_layers(self) -> int:
        """The number of blocks of the model the cache was built with (what a negative layer
        counts back from)."""
        return int(self.manifest.get("n_layers") or max(self.layers) + 1)

    @property
    def capture_config(self) -> CaptureConfig:
        """The capture settings the cache was built with (from its manifest)."""
        return CaptureConfig.from_manifest(self.manifest, what=str(CacheFiles(self.path).manifest))

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        model = (self.manifest.get("model") or {}).get("name", "?")
        return (
            f"Cache({len(self)} rows, layers {layers_text(self.layers)} of {self.n_layers}, "
            f"stats {', '.join(self.stats)}, model {model}, d_model {self.d_model}, "
            f"{self.manifest.get('storage_dtype', '?')}, at {self.path})"
        )

    def layer(self, layer: Any) -> int:
        """The cached layer that ``layer`` names, as
        :func:`~lensattr.layers.layer_index` reads it: an int (negative counts from the
        model's last block), or a hook name such as ``"blocks.12.hook_resid_post"``.

        Raises:
            KeyError: the cache does not hold that layer.
        """
        try:
            index = layer_index(layer, self.n_layers)
        except ValueError as err:
            raise KeyError(f"{err} (this cache has layers {self.layers})") from None
        if index not in self.layers:
            raise KeyError(f"layer {layer} is not in this cache (it has {self.layers})")
        return index

    def stat(self, name: str, layer: Any) -> StatView:
        """The cached ``[n, d_model]`` matrix of statistic ``name`` at ``layer`` (lazy).

        Raises:
            KeyError: a statistic or layer the cache lacks.
            CacheError: the stored bytes do not match their checksum, or a value is not finite.
        """
        if name not in self.stats:
            raise KeyError(f"statistic {name!r} is not in this cache (it has {self.stats})")
        key = tensor_key(name, self.layer(layer))
        for i in range(len(self._shards)):
            self._check(i, key)
            self._check(i, key + "/norm")
        parts = [
            (info["first_row"], shard[key], shard[key + "/norm"])
            for info, shard in zip(self.manifest["shards"], self._shards, strict=True)
        ]
        return StatView(parts, self.d_model)

    def _check(self, i: int, key: str) -> None:
        """Checksum (unless opened with ``verify=False``) and finiteness of one stored tensor."""
        if (i, key) in self._checked:
            return
        info, shard = self.manifest["shards"][i], self._shards[i]
        if self._hash and shard.tensor_sha256(key) != info["tensors"].get(key):
            raise CacheError(
                f"{shard.path}: checksum mismatch in {key!r}, the shard is corrupt (rebuild the "
                "cache: delete the shard, its .json and manifest.json, and rerun the same build)"
            )
        rows = nonfinite_rows(shard[key])
        if rows:
            ids = [self.ids[info["first_row"] + r] for r in rows]
            raise CacheError(f"{shard.path}: {key!r} is not finite in the rows of {name_ids(ids)}")
        self._checked.add((i, key))

    def verify(self) -> None:
        """Check every byte now: each shard's SHA-256, each tensor, the records copy.

        Raises:
            CacheError: naming the first corrupt file.
        """
        for i, (info, shard) in enumerate(zip(self.manifest["shards"], self._shards, strict=True)):
            if sha256_file(shard.path) != info["sha256"]:
                raise CacheError(f"{shard.path}: checksum mismatch, the shard is corrupt")
            for key in sorted(shard.keys()):
                self._check(i, key)
        rec = self.manifest.get("records")
        if rec and sha256_file(self.path / rec["file"]) != rec["sha256"]:
            raise CacheError(f"{self.path / rec['file']}: checksum mismatch, the copy is corrupt")

    def records(self, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The cached training records behind ``ids`` (every record, in row order, if ``None``).

        Read from the cache's own checksummed copy (``records.jsonl.gz``), so neither the
        training file nor its path is needed. Each record holds ``id``, ``messages`` and the
        record's other fields (e.g. ``label``, ``source``).

        Raises:
            KeyError: an id the cache does not hold.
            CacheError: the copy does not match its checksum.
        """
        info = self.manifest.get("records")
        if not info:
            raise CacheError(f"{self.path}: this cache holds no copy of its records")
        try:
            return read_records(self.path / info["file"], info["sha256"], ids)
        except RecordsError as err:
            raise CacheError(str(err)) from None

    def examples(self, ids: Sequence[str] | None = None) -> list[Example]:
        """:meth:`records` as :class:`~lensattr.data.Example` objects (extra fields in
        ``extra``)."""
        where = str(CacheFiles(self.path).records)
        return [example_of(r, where) for r in self.records(ids)]

    def check(self, expect: Any) -> None:
        """Raise :class:`CacheError` naming every field where the cache differs from ``expect``.

        ``expect`` is a :class:`~lensattr.backends.models.Model` or a dict of manifest fields
        (``model`` may itself be a Model).
        """
        want = {"model": expect} if _is_model(expect) else dict(expect)
        if _is_model(want.get("model")):
            want["model"] = want["model"].fingerprint()
        problems = diff_fields(self.manifest, want)
        if problems:
            raise CacheError(f"{self.path} does not match: " + "; ".join(problems))


def _is_model(x: Any) -> bool:
    """A :class:`~lensattr.backends.backend.Model` (anything with a weights ``fingerprint()``;
    the store imports no backend)."""
    return callable(getattr(x, "fingerprint", None))


def _check_manifest(mfile: Path, m: Any) -> None:
    """Refuse a manifest that was edited, or whose fields do not fit together."""
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise CacheError(f"{mfile}: corrupt manifest (no shard list)")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"{mfile}: schema version {m.get('schema_version')} (this lensattr reads "
            f"{SCHEMA_VERSION}): rebuild the cache with this version, into a new directory"
        )
    if m.get("manifest_sha256") != manifest_sha256(m):
        raise CacheError(f"{mfile}: checksum mismatch, the manifest was modified after the build")
    try:
        ids, shards, n = m["ids"], m["shards"], m["n_rows"]
        ok = isinstance(ids, list) and all(isinstance(i, str) for i in ids)
        ok = ok and isinstance(n, int) and n == len(ids) and len(set(ids)) == n
        ok = ok and isinstance(m["d_model"], int) and m["d_model"] > 0
        CaptureConfig.from_manifest(m, what="the manifest")  # every capture setting, valid
        ok = ok and m["storage_dtype"] in SAFETENSORS_CODES
        ok = ok and isinstance(m.get("records", {}), dict)
        ok = ok and all(isinstance(x, int) for x in m["layers"])
        ok = ok and all(isinstance(x, str) for x in m["stats"])
        for stat in m["stats"]:  # a statistic's name reaches file names (its pool moments)
            plain_name(stat, "statistic")
        row = 0
        for s in shards:
            ok = ok and s["first_row"] == row and isinstance(s["n_rows"], int)
            row += s["n_rows"]
        ok = ok and row == n
    except (KeyError, TypeError) as err:
        raise CacheError(f"{mfile}: corrupt manifest (field {err})") from None
    except ValueError as err:
        raise CacheError(f"{mfile}: corrupt manifest ({err})") from None
    if not ok:
        raise CacheError(f"{mfile}: corrupt manifest (ids, rows and shards do not agree)")


def _check_shard(shard: MappedShard, info: dict[str, Any], m: dict[str, Any]) -> None:
    """The header of ``shard`` holds exactly the rows, ids and shapes the manifest says."""
    if shard.header_sha256() != info["header_sha256"]:
        raise CacheError(f"{shard.path}: checksum mismatch in the header, the shard is corrupt")
    first, n, d = info["first_row"], info["n_rows"], m["d_model"]
    try:
        ids = json.loads(shard.metadata.get("ids", "null"))
    except ValueError:
        ids = None
    if ids != m["ids"][first : first + n]:
        raise CacheError(f"{shard.path}: holds other ids than the manifest lists for it")
    code = SAFETENSORS_CODES[m["storage_dtype"]]
    for stat in m["stats"]:
        for layer in m["layers"]:
            key = tensor_key(stat, layer)
            want = {key: (code, [n, d]), key + "/norm": ("F32", [n])}
            for k, (dt, shape) in want.items():
                h = shard.info(k)
                if not h:
                    raise CacheError(f"{shard.path}: {k!r} is missing, the manifest lists it")
                if h.get("dtype") != dt or h.get("shape") != shape:
                    raise CacheError(
                        f"{shard.path}: {k!r} is {h.get('dtype')} {h.get('shape')}, the manifest "
                        f"says {dt} {shape}"
                    )


def open_cache(path: str | Path, *, expect: Any = None, verify: bool | str = True) -> Cache:
    """Open a finished cache, memory-mapped.

    Opening always checks the manifest's own checksum and fields, each file's name, size and
    header, and every tensor's shape against the manifest (before anything is allocated).

    Args:
        path: the cache directory.
        expect: a :class:`~lensattr.backends.models.Model` or dict of manifest fields that must
            match.
        verify: ``True`` (default): each tensor's SHA-256 is checked the first time it is read
            (once per open); ``"full"``: every byte now (:meth:`Cache.verify`); ``False``: no
            hashes of the data (sizes and headers only).

    Raises:
        CacheError: incomplete build, missing, edited or corrupt file, or a mismatch with
            ``expect``.
    """
    if verify not in (True, False, "full"):
        raise ValueError(f"verify must be True, False or 'full', not {verify!r}")
    path = Path(path)
    files = CacheFiles(path)
    mfile = files.manifest
    if not mfile.exists():
        hint = (
            " (an unfinished build: rerun the same build to resume)" if files.build.exists() else ""
        )
        raise CacheError(f"{path}: no manifest.json, not a finished lensattr cache{hint}")
    try:
        manifest = json.loads(mfile.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{mfile}: corrupt manifest ({err})") from None
    _check_manifest(mfile, manifest)
    shards = []
    try:
        for info in manifest["shards"]:
            f = plain_file(path, info["file"], "shard")
            if not f.exists():
                raise CacheError(f"{f}: shard missing")
            if f.stat().st_size != info["size"]:
                raise CacheError(
                    f"{f}: truncated or padded shard ({f.stat().st_size} bytes, the manifest "
                    f"says {info['size']})"
                )
            shards.append(MappedShard(f))
            _check_shard(shards[-1], info, manifest)
        rec = manifest.get("records")  # written by every build; a hand-made cache may lack it
        f = plain_file(path, rec["file"], "records") if rec else path
        if rec and (not f.exists() or f.stat().st_size != rec["size"]):
            raise CacheError(f"{f}: records copy missing or of the wrong size")
    except KeyError as err:
        raise CacheError(f"{mfile}: corrupt manifest (no field {err})") from None
    except (ValueError, TypeError) as err:
        raise CacheError(str(err)) from None
    cache = Cache(path=path, manifest=manifest, _shards=shards, _hash=verify is not False)
    if verify == "full":
        cache.verify()
    if expect is not None:
        cache.check(expect)
    return cache
