"""Write a cache directory: shards, sidecars, records and the manifest, from plain tensors.

:func:`write_cache` writes a whole cache from ``{stat: {layer: rows}}`` tensors (what a test or a
benchmark needs); :func:`write_chunk` and :func:`finish` are the steps the build loop
(:func:`lensattr.build.build_cache`, which captures the rows) takes, one shard at a time, with
:func:`chunk_done` to resume a killed build and :func:`write_lock` against a second writer.
Every file name comes from :class:`~lensattr.store.files.CacheFiles` (the layout).

A killed build rerun with the same command skips the chunks whose sidecar matches their shard,
their examples and the build's settings, so it ends bitwise identical to an uninterrupted build;
a finished build is a no-op (after a verification).

Integrity: the manifest holds the SHA-256 of its own canonical JSON, and every shard's size and
the SHA-256 of its header, of each tensor and of the whole file; each shard's header repeats its
row ids. :func:`~lensattr.store.reader.open_cache` checks the manifest, the sizes, the headers
and the shapes (before any allocation) and, once per open, the hash of each tensor the first
time it is read.
"""

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lensattr._version import __version__
from lensattr.config import CaptureConfig
from lensattr.data import Example
from lensattr.store.files import CacheFiles
from lensattr.store.names import STORAGE_DTYPES, dtype_name, parse_dtype
from lensattr.store.reader import (
    INFORMATIVE,
    SCHEMA_VERSION,
    Cache,
    CacheError,
    canonical_sha256,
    diff_fields,
    manifest_sha256,
    open_cache,
    write_manifest,
)
from lensattr.store.records import write_records
from lensattr.store.shards import (
    atomic_write_json,
    describe_shard,
    remove_temporary_files,
    sha256_file,
    tensor_key,
    write_shard,
)

__all__ = [
    "IDENTITY",
    "SCHEMA_VERSION",
    "STORAGE_DTYPES",
    "Cache",
    "CacheError",
    "chunk_done",
    "chunk_sha256",
    "dtype_name",
    "finish",
    "identity",
    "manifest_entry",
    "manifest_sha256",
    "open_cache",
    "parse_dtype",
    "plan_sha256",
    "reopen",
    "write_cache",
    "write_chunk",
    "ELSEWHERE",
    "write_lock",
    "write_manifest",
]
logger = logging.getLogger(__name__)
# Fields of build.json that must match for a resume or an `expect=` check.
IDENTITY = (
    "schema_version",
    "model",
    "layers",
    "stats",
    "pooling",
    "max_length",
    "storage_dtype",
    "train",
    "shard_size",
    "batch_size",
    "padding_side",
    "stat_modules",
)


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in IDENTITY}


@contextlib.contextmanager
def write_lock(out: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold ``out/.lock`` (``flock``) while building; a second writer gets a :class:`CacheError`.

    The ranks of one multi-process build share the lock (``shared=True``); a single-process build
    holds it alone. Without ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    lock = CacheFiles(out).lock
    try:  # never through a symlink planted in its place
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise CacheError(
            f"{lock} is a symbolic link; lensattr does not follow it: remove it"
        ) from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"{out}: another lensattr build is writing to this directory; wait for it to "
                "finish, or build into another directory"
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: this file system has no file locks; building unlocked", out)
        yield
    finally:
        os.close(fd)  # releases the lock


ELSEWHERE = "to build this one, choose another out directory (--out), or delete that one"
"""The fix that an error about a directory holding another cache or build names."""


def reopen(out: Path, plan: dict[str, Any]) -> "Cache":
    """A finished cache at ``out``: verified like any open, then compared with ``plan``."""
    cache = open_cache(out)
    have, want = identity(cache.manifest), identity(plan)
    if have["stat_modules"] is None:  # built before they were recorded: nothing to compare
        del have["stat_modules"], want["stat_modules"]
    problems = diff_fields(have, want)
    if problems:
        raise CacheError(
            f"{out} holds a different cache: " + "; ".join(problems) + f"; {ELSEWHERE}"
        )
    logger.info("%s is complete; nothing to do", out)
    return cache


def plan_sha256(plan: dict[str, Any]) -> str:
    """What a shard's numbers depend on besides its examples (not the training file's hash)."""
    ident = {k: v for k, v in identity(plan).items() if k != "train"}
    ident["model"] = {k: v for k, v in plan["model"].items() if k not in INFORMATIVE}
    return canonical_sha256(ident)


def chunk_sha256(chunk: Sequence[Example]) -> str:
    """Fingerprint of a chunk's examples: ids and messages, in order."""
    return canonical_sha256([[ex.id, [dict(m) for m in ex.messages]] for ex in chunk])


def chunk_done(out: Path, index: int, want: dict[str, str]) -> bool:
    """Whether chunk ``index`` is on disk for these examples and settings, and intact."""
    files = CacheFiles(out)
    side, shard = files.sidecar(index), files.shard(index)
    if not (side.exists() and shard.exists()):
        return False
    try:
        info = json.loads(side.read_text())
        if any(info.get(k) != v for k, v in want.items()):
            logger.info("%s is from other examples or settings: rebuilding it", side)
            return False
        return bool(info["sha256"] == sha256_file(shard))
    except (ValueError, KeyError, TypeError, AttributeError):  # an unreadable sidecar: redo
        return False


def write_chunk(
    out: Path,
    index: int,
    ids: Sequence[str],
    rows: Mapping[tuple[str, int], torch.Tensor],
    side: dict[str, Any],
) -> dict[str, Any]:
    """Write shard ``index`` (the ``[len(ids), d_model]`` rows of each ``(stat, layer)``, in
    their storage dtype, and their norms), then its sidecar (``side``, the ids and the
    checksums); return the sidecar. The sidecar is written last: it marks the shard done."""
    files = CacheFiles(out)
    tensors: dict[str, torch.Tensor] = {}
    for (stat, layer), mat in rows.items():
        tensors[tensor_key(stat, layer)] = mat
        tensors[tensor_key(stat, layer) + "/norm"] = mat.float().norm(dim=1)
    shard = files.shard(index)
    digest = write_shard(shard, tensors, metadata={"ids": json.dumps(list(ids))})
    info = {
        **side,
        "index": index,
        "ids": list(ids),
        "skipped": list(side.get("skipped", [])),
        "sha256": digest,
        **describe_shard(shard),
    }
    atomic_write_json(files.sidecar(index), info)
    return info


def manifest_entry(index: int, info: dict[str, Any], first_row: int) -> dict[str, Any]:
    """The manifest's entry for shard ``index`` from its sidecar ``info``."""
    return {
        "file": CacheFiles.shard_name(index),
        "first_row": first_row,
        "n_rows": len(info["ids"]),
        "sha256": info["sha256"],
        "size": info["size"],
        "header_sha256": info["header_sha256"],
        "tensors": info["tensors"],
    }


def finish(
    out: Path,
    plan: dict[str, Any],
    chunks: Sequence[Sequence[Example]],
    skipped: list[dict[str, str]],
) -> "Cache":
    """Write the records and the manifest of a build whose every shard is written (rank 0)."""
    files = CacheFiles(out)
    shards: list[dict[str, Any]] = []
    ids: list[str] = []
    plan_sha = plan_sha256(plan)
    for i, chunk in enumerate(chunks):
        side = files.sidecar(i)
        if not side.exists():
            raise CacheError(
                f"{side} is missing: shard {i} was never finished (in a "
                "multi-process build, rerun the same build once every rank is done)"
            )
        info = json.loads(side.read_text())
        if info.get("chunk_sha256") != chunk_sha256(chunk) or info.get("plan_sha256") != plan_sha:
            raise CacheError(
                f"{side} belongs to other examples or settings: rerun the same build once "
                "every rank is done"
            )
        shards.append(manifest_entry(i, info, len(ids)))
        ids += info["ids"]
        skipped += info["skipped"]
    if not ids:  # every example skipped: an error, never a "finished" cache of 0 rows
        first = f" (first: {skipped[0]['reason']})" if skipped else ""
        raise CacheError(
            f"{out}: all {len(skipped)} examples were skipped, nothing to cache{first}; fix "
            "them (a reply cut away by max_length: raise max_length)"
        )
    table = {ex.id: ex for chunk in chunks for ex in chunk}
    records = write_records(files.records, (table[i] for i in ids))
    manifest = {
        **plan,
        "n_rows": len(ids),
        "ids": ids,
        "shards": shards,
        "skipped": skipped,
        "records": records,
    }
    write_manifest(out, manifest)
    remove_temporary_files(out)  # left by killed writers; every writer of this build is done
    return open_cache(out)


def write_cache(
    out: str | Path,
    ids: Sequence[str],
    rows: Mapping[str, Mapping[int, torch.Tensor]],
    *,
    model: dict[str, str],
    config: CaptureConfig | None = None,
    shard_size: int = 1024,
    examples: Sequence[Example] | None = None,
) -> Cache:
    """Write a finished cache of the given rows: ``rows[stat][layer]`` is ``[len(ids), d_model]``,
    stored in ``config.storage_dtype``; ``model`` is the model's fingerprint (what a query must
    match); ``examples`` (in ``ids`` order), when given, become the cached records.

    The same layout, checksums and manifest as a build (:func:`lensattr.build.build_cache`), so
    every reader works on it: tests and benchmarks write synthetic caches with it.

    Examples:
        >>> import tempfile
        >>> rows = {"resid_post": {0: torch.eye(3)}}
        >>> fp = {"name": "x", "weights_sha256": "0", "tokenizer_sha256": "0",
        ...       "chat_template_sha256": "0"}
        >>> cache = write_cache(tempfile.mkdtemp(), ["a", "b", "c"], rows, model=fp, shard_size=2)
        >>> rows = cache.stat("resid_post", 0)[:]
        >>> rows.float().diagonal().tolist(), rows.dtype, len(cache.manifest["shards"])
        ([1.0, 1.0, 1.0], torch.bfloat16, 2)
    """
    out = Path(out)
    stats = list(rows)
    layers = sorted({layer for per_layer in rows.values() for layer in per_layer})
    cfg = CaptureConfig(layers=tuple(layers)) if config is None else config
    dtype = getattr(torch, dtype_name(cfg.storage_dtype))
    first = rows[stats[0]][layers[0]]
    n, d_model = len(ids), int(first.shape[1])
    for stat in stats:
        for layer in layers:
            shape = tuple(rows[stat][layer].shape)
            if shape != (n, d_model):
                raise ValueError(f"rows[{stat!r}][{layer}] is {shape}, not ({n}, {d_model})")
    out.mkdir(parents=True, exist_ok=True)
    shards, first_row = [], 0
    for index, start in enumerate(range(0, n, shard_size)):
        part = {
            (stat, layer): rows[stat][layer][start : start + shard_size].to(dtype)
            for stat in stats
            for layer in layers
        }
        info = write_chunk(out, index, ids[start : start + shard_size], part, {})
        shards.append(manifest_entry(index, info, first_row))
        first_row += len(info["ids"])
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "lensattr_version": __version__,
        "model": model,
        "stats": stats,
        **cfg.to_manifest(),
        "layers": layers,
        "shard_size": shard_size,
        "d_model": d_model,
        "train": {},
        "n_rows": n,
        "ids": list(ids),
        "shards": shards,
        "skipped": [],
    }
    if examples is not None:
        manifest["records"] = write_records(CacheFiles(out).records, examples)
    write_manifest(out, manifest)
    return open_cache(out)
