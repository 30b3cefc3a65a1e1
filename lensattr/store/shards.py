"""Shard files: atomic safetensors writes and zero-copy memory-mapped reads.

Each shard holds, for a block of consecutive rows, one ``[rows, d_model]`` matrix per
(statistic, layer) named ``"{stat}/{layer}"`` in the storage dtype, and its fp32 row norms
``"{stat}/{layer}/norm"``. Writing goes through ``safetensors.torch.save_file``. Reading maps the
file and views its tensors in place (``torch.frombuffer`` over the documented safetensors layout:
8-byte header length, JSON header, raw data), because ``safetensors``' own loaders copy every
tensor they return and a query over millions of rows must not.
"""

import errno
import hashlib
import json
import mmap
import os
import re
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save, save_file

from lensattr.store.names import SAFETENSORS_CODES

_DTYPES = {code: getattr(torch, name) for name, code in SAFETENSORS_CODES.items()}


def tensor_key(stat: str, layer: int) -> str:
    return f"{stat}/{layer}"


# A plain name: what a manifest may list as a file (inside the cache directory, not hidden), and
# what a registered statistic, query or score may be called (it reaches file and tensor names).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def plain_name(name: Any, what: str = "file") -> str:
    """``name`` when it is a plain name: a non-empty string of letters, digits, ``.``, ``_`` and
    ``-`` that does not start with ``.`` (so no path separator, no ``..``, no hidden name).

    Raises:
        ValueError: anything else (``None``, a number, ``""``, ``"a/b"``, ``".."``).

    Examples:
        >>> plain_name("residual_change", "statistic")
        'residual_change'
    """
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name.strip(".") == "":
        raise ValueError(
            f"{what} name {name!r} is not a plain name (letters, digits, '.', '_' and '-', not "
            "starting with '.')"
        )
    return name


def file_mode() -> int:
    """The mode a new file gets under the process's umask (``0o666 & ~umask``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_name(path: Path) -> Path:
    """A hidden temporary sibling of ``path`` unique to this writer (pid + random)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_temporary_files(directory: Path) -> None:
    """Delete the hidden ``*.tmp`` files writers leave when killed (call under the write lock)."""
    for p in directory.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def plain_file(directory: Path, name: Any, what: str = "file") -> Path:
    """``directory / name`` when ``name`` is a plain file name inside ``directory``.

    Raises:
        ValueError: a path with a separator, ``..``, a hidden name, or a symlink leading out.
    """
    try:
        plain_name(name, what)
    except ValueError:
        raise ValueError(f"{directory}: {what} name {name!r} is not a plain file name") from None
    path = directory / name
    if path.is_symlink() and path.resolve().parent != directory.resolve():
        raise ValueError(f"{path}: {what} is a symlink that leads out of {directory}")
    return path


def write_error(path: Path, err: BaseException) -> OSError:
    """An ``OSError`` naming ``path`` (not a writer's temporary file) for a failed write: the
    error's errno (also out of a ``SafetensorError``'s text) and reason."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"\(os error (\d+)\)|code: (\d+)", str(err))  # Rust's io::Error
        code = int(found.group(1) or found.group(2)) if found else errno.EIO
    reason = getattr(err, "strerror", None) or os.strerror(code)
    return OSError(code, f"could not write it ({reason})", str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, with the umask's mode.

    Raises:
        OSError: naming ``path`` (the temporary file is removed).
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a small safetensors file (a query, pair statistics) atomically, with the umask's
    mode (``safetensors`` alone creates it ``0600``); a failure names ``path``."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write ``tensors`` to ``path`` atomically (temporary file + rename); return its SHA-256.

    The file gets the umask's mode (``safetensors`` alone creates it ``0600``).
    """
    tmp = temporary_name(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # e.g. a full disk or `ulimit -f`: name the shard
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    return digest


# Integer view and exponent mask per float dtype: all exponent bits set = inf or NaN.
_EXPONENT = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}


def nonfinite_rows(t: torch.Tensor) -> list[int]:
    """Indices of the rows (or elements, for a vector) of ``t`` holding an inf or NaN.

    Tests the exponent bits through an integer view first (several times faster than
    ``torch.isfinite`` on bf16), and looks for the rows only when one is found.
    """
    int_dtype, mask = _EXPONENT[t.dtype]
    if t.numel() == 0 or int((t.view(int_dtype) & mask).max()) != mask:
        return []
    bad = ~torch.isfinite(t)
    bad = bad.any(1) if bad.ndim == 2 else bad
    return bad.nonzero()[:, 0].tolist()


def describe_shard(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a shard file, of its header and of every tensor's bytes."""
    shard = MappedShard(path)
    return {
        "size": shard.size,
        "header_sha256": shard.header_sha256(),
        "tensors": {k: shard.tensor_sha256(k) for k in sorted(shard.keys())},
    }


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class MappedShard:
    """A read-only memory map of one shard; ``shard[key]`` is a tensor viewing the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise ValueError(f"{path}: truncated shard ({size} bytes)")
            # ACCESS_COPY: private pages, so torch gets a writable buffer without copying the file.
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", self._map[:8])
        try:
            header = json.loads(self._map[8 : 8 + n])
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupt shard header ({err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.header_size = 8 + n
        self._base = 8 + n
        self._header = header
        try:
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path}: corrupt shard header (no data offsets)") from None
        self.size = size
        if self._base + end != size:
            raise ValueError(
                f"{path}: truncated or padded shard ({size} bytes, expected {self._base + end})"
            )

    def keys(self) -> list[str]:
        return list(self._header)

    def info(self, key: str) -> dict[str, Any]:
        """The header entry of ``key`` (``dtype``, ``shape``, ``data_offsets``), or ``{}``."""
        return self._header.get(key, {})

    def header_sha256(self) -> str:
        return hashlib.sha256(memoryview(self._map)[: self.header_size]).hexdigest()

    def tensor_sha256(self, key: str) -> str:
        """SHA-256 of the stored bytes of tensor ``key``."""
        begin, end = self._header[key]["data_offsets"]
        view = memoryview(self._map)[self._base + begin : self._base + end]
        try:
            return hashlib.sha256(view).hexdigest()
        finally:
            view.release()

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._header[key]
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + begin)
        return flat.view(info["shape"])


class StatView:
    """A lazy, row-sliceable view of one cached ``[n, d_model]`` matrix across shards.

    Indexing returns the requested rows only (a view when they lie in one shard), in the storage
    dtype; :meth:`chunks` streams the whole matrix. ``norms`` are the precomputed fp32 row norms.
    :meth:`numpy` and ``np.asarray(view)`` give every row in float32.

    Examples:
        >>> # view = cache.stat("residual_change", 12); view[:5].float()
    """

    def __init__(self, parts: list[tuple[int, torch.Tensor, torch.Tensor]], d_model: int) -> None:
        self._parts = parts  # (first row, rows, norms)
        self.n = sum(p[1].shape[0] for p in parts)
        self.d_model = d_model

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.d_model)

    def __len__(self) -> int:
        return self.n

    @property
    def norms(self) -> torch.Tensor:
        return torch.cat([p[2] for p in self._parts]) if self._parts else torch.zeros(0)

    def chunks(self, rows: int = 32768) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(first_row, rows [m, d], norms [m])`` blocks of at most ``rows`` rows."""
        for start, mat, norms in self._parts:
            for i in range(0, mat.shape[0], rows):
                yield start + i, mat[i : i + rows], norms[i : i + rows]

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start:stop`` (``0 <= start <= stop <= n``) and their norms, in the storage
        dtype: views when they lie in one shard, else copies."""
        norms = [
            nm[max(start - s, 0) : max(min(stop - s, mat.shape[0]), 0)]
            for s, mat, nm in self._parts
            if s < stop and s + mat.shape[0] > start
        ]
        norm = norms[0] if len(norms) == 1 else torch.cat(norms) if norms else torch.zeros(0)
        return self[start:stop], norm

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, int):
            index = index + self.n if index < 0 else index
            return self[index : index + 1][0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            if step != 1:
                return self[torch.arange(start, stop, step)]
            out = [
                mat[max(start - s, 0) : max(min(stop - s, mat.shape[0]), 0)]
                for s, mat, _ in self._parts
                if s < stop and s + mat.shape[0] > start
            ]
            return out[0] if len(out) == 1 else torch.cat(out) if out else self._empty()
        idx = torch.as_tensor(index, dtype=torch.long)
        starts = torch.tensor([p[0] for p in self._parts])
        which = torch.searchsorted(starts, idx, right=True) - 1
        result = torch.empty((len(idx), self.d_model), dtype=self._parts[0][1].dtype)
        for k, (s, mat, _) in enumerate(self._parts):
            sel = which == k
            if sel.any():
                result[sel] = mat[idx[sel] - s]
        return result

    def numpy(self) -> np.ndarray:
        """Every row as a float32 numpy array (a copy; the storage dtype may be bf16)."""
        return self[:].float().numpy()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(view)``: float32 rows (or ``dtype``)."""
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def _empty(self) -> torch.Tensor:
        dtype = self._parts[0][1].dtype if self._parts else torch.float32
        return torch.zeros((0, self.d_model), dtype=dtype)
