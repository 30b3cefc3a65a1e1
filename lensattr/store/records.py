"""The cache's own copy of its training records: ``records.jsonl.gz``.

A cache keeps what ``rank`` prints (id, messages and any extra fields such as ``label`` or
``source``) so that it can be ranked and printed without the training file, whether it was built
from a file, a list or a ``datasets.Dataset``, and whatever happened to that file since. The copy
is gzip-compressed with a fixed header (no time stamp, no file name), so the same records give the
same bytes, and its SHA-256 is in the manifest: :func:`read_records` checks it on every read.
"""

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lensattr.data import Example
from lensattr.store.shards import file_mode, temporary_name


def _plain(value: Any) -> Any:
    """JSON-ready form of an extra field (numpy scalars and arrays, dates, ...)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def record_of(ex: Example) -> dict[str, Any]:
    """The stored record of ``ex``: id, messages and its extra fields (not the private ``_...``)."""
    extra = {k: v for k, v in ex.extra.items() if not str(k).startswith("_")}
    first = ex.messages[0]
    if first["role"] == "system" and extra.get("system") == first["content"]:
        del extra["system"]  # a prompt/response record's system prompt: already in messages
    return {"id": ex.id, "messages": [dict(m) for m in ex.messages], **extra}


def write_records(path: Path, examples: Iterable[Example]) -> dict[str, Any]:
    """Write ``examples`` (in row order) to ``path`` atomically; return the manifest entry."""
    tmp = temporary_name(path)
    n = 0
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            for ex in examples:
                line = json.dumps(
                    record_of(ex), ensure_ascii=True, default=_plain
                )  # any str, even lone surrogates
                gz.write(line.encode("utf-8") + b"\n")
                n += 1
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(tmp, file_mode())
    with open(tmp, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return {"file": path.name, "n": n, "size": size, "sha256": digest}


class _Hashing:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.h = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.h.update(data)
        return data

    def seek(self, n: int, whence: int = 0) -> int:
        raise OSError("the records copy is read front to back once")  # hashing needs every byte

    def finish(self) -> str:
        for block in iter(lambda: self.fh.read(1 << 20), b""):
            self.h.update(block)
        return self.h.hexdigest()


class RecordsError(ValueError):
    """The records copy does not match its checksum or cannot be parsed."""


def iter_records(path: Path, sha256: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, record)`` from ``path``; raise :class:`RecordsError` at the end when the
    bytes do not hash to ``sha256`` (so a caller keeps nothing from a corrupt copy)."""
    with open(path, "rb") as fh:
        reader = _Hashing(fh)
        problem = None
        try:
            with gzip.GzipFile(fileobj=reader, mode="rb") as gz:
                for lineno, line in enumerate(gz, start=1):
                    yield lineno, json.loads(line)
        except (OSError, EOFError, zlib.error, ValueError) as err:
            problem = str(err)
        digest = reader.finish()
    if digest != sha256:
        raise RecordsError(f"{path}: checksum mismatch, the records copy is corrupt")
    if problem:
        raise RecordsError(f"{path}: unreadable records copy ({problem})")


def read_records(path: Path, sha256: str, ids: Sequence[str] | None) -> list[dict[str, Any]]:
    """Records by id (every record, in row order, when ``ids`` is None), checksum verified.

    Raises:
        RecordsError: corrupt copy.
        KeyError: an id the copy does not hold.
    """
    want = None if ids is None else set(ids)
    found: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for _, rec in iter_records(path, sha256):
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not isinstance(rid, str):
            raise RecordsError(f"{path}: a record without a string id")
        if want is None or rid in want:
            found[rid] = rec
            order.append(rid)
    if ids is None:
        return [found[i] for i in order]
    missing = [i for i in ids if i not in found]
    if missing:
        raise KeyError(f"id {missing[0]!r} is not in this cache ({path.parent})")
    return [found[i] for i in ids]


def example_of(record: dict[str, Any], where: str) -> Example:
    """An :class:`~lensattr.data.Example` from a stored record (extra fields kept)."""
    extra = {k: v for k, v in record.items() if k not in ("id", "messages")}
    extra["_where"] = where
    msgs = tuple({"role": m["role"], "content": m["content"]} for m in record["messages"])
    return Example(id=record["id"], messages=msgs, extra=extra)
