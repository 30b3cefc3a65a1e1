"""Moments of a cached statistic over the training pool: mean, covariance and its eigenbasis.

Pool-aware queries (``q = norm(mean_j s(x'_j) - mu)``) and scores (centered, whitened and deflated
cosine) read the pool's moments of a statistic at a layer. They are computed in one streaming
pass over the cached rows (fp64 sums), then kept

- in memory, keyed by the cache's *content digest* (the SHA-256 of its row ids and shard
  checksums), never by its path, so a cache rebuilt at the same path is never served stale
  moments;
- on disk, for a cache of at least :data:`PERSIST_ROWS` rows (where one pass over the rows costs
  more than reading the moments back), as ``moments-{stat}-{layer}.safetensors`` in the cache
  directory (when writable; the covariance in fp32), written atomically (temporary file +
  rename), recording the content digest they were computed from and a SHA-256 of their own
  tensors. A file whose digest or checksum does not match (another cache's, a torn or edited
  one) is ignored and recomputed.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lensattr.store.files import CacheFiles

RIDGE = 1e-2
"""Ridge of the whitener, relative to the mean eigenvalue: ``lam = RIDGE * trace(Sigma) / d``."""
DEFLATE = 10
"""Principal directions of the pool removed by ``deflated_cosine``."""
PERSIST_ROWS = 50_000
"""Caches with at least this many rows keep their moments on disk (smaller ones recompute them:
a pass over 4,000 rows of 576 dimensions takes milliseconds, a 576 x 576 file 1.3 MB)."""


@dataclass(frozen=True)
class Moments:
    """Mean and covariance of a statistic over ``n`` pool rows (fp64), with derived quantities.

    Examples:
        >>> x = torch.randn(50, 4, dtype=torch.float64)
        >>> m = Moments.of_rows(x)
        >>> bool(torch.allclose(m.mean, x.mean(0))), m.n
        (True, 50)
    """

    mean: torch.Tensor
    cov: torch.Tensor
    n: int

    @classmethod
    def of_rows(cls, rows: torch.Tensor) -> "Moments":
        """The moments of a row matrix (e.g. a pool held in memory)."""
        x = rows.double()
        mu = x.mean(0)
        xc = x - mu
        return cls(mu, xc.T @ xc / max(len(x) - 1, 1), len(x))

    @cached_property
    def whitener(self) -> torch.Tensor:
        """A whitener ``W`` with ``W^T W = (Sigma + lam I)^(-1)``, ``lam = RIDGE tr(Sigma) / d``:
        the inverse of the Cholesky factor (fp32). Any such ``W`` gives the same inner products
        ``<W a, W b> = a^T (Sigma + lam I)^(-1) b``, hence the same whitened cosines, and the
        factorisation costs a fraction of an eigendecomposition."""
        d = self.cov.shape[0]
        lam = RIDGE * float(torch.trace(self.cov).clamp(min=0)) / d
        lam = lam if lam > 0 else RIDGE
        eye = torch.eye(d, dtype=self.cov.dtype)
        chol = torch.linalg.cholesky(self.cov + lam * eye)
        return torch.linalg.solve_triangular(chol, eye, upper=False).float()

    @cached_property
    def top(self) -> torch.Tensor:
        """The pool's ``DEFLATE`` leading principal directions as orthonormal columns ``[d, m]``
        (fp32), by seeded subspace iteration on the covariance (``m`` eigenvectors of a
        ``d x d`` matrix do not need its full eigendecomposition)."""
        d = self.cov.shape[0]
        m = min(DEFLATE, d)
        q = min(d, 2 * m + 8)
        gen = torch.Generator().manual_seed(0)
        basis = torch.randn(d, q, dtype=self.cov.dtype, generator=gen)
        for _ in range(8):
            basis = torch.linalg.qr(self.cov @ basis)[0]
        evals, evecs = torch.linalg.eigh(basis.T @ self.cov @ basis)  # Rayleigh-Ritz
        return (basis @ evecs.flip(1)[:, :m]).float().contiguous()

    @cached_property
    def mean32(self) -> torch.Tensor:
        return self.mean.float()


def content_digest(cache: Any) -> str:
    """SHA-256 of what a cache holds: its row ids and every shard's checksum.

    Examples:
        >>> class C: manifest = {"ids": ["a"], "shards": [{"sha256": "00"}], "layers": [1]}
        >>> len(content_digest(C()))
        64
    """
    m = cache.manifest
    key = json.dumps([m["ids"], [s["sha256"] for s in m["shards"]]], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()


_MEMO: dict[tuple[str, str, int], Moments] = {}


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _read(fname: Path, digest: str) -> Moments | None:
    """The moments in ``fname`` if they were computed from ``digest`` and are intact."""
    try:
        with safe_open(str(fname), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError):
        return None
    if meta.get("cache_digest") != digest or meta.get("sha256") != _tensor_digest(tensors):
        return None
    if set(tensors) != {"mean", "cov", "n"}:
        return None
    return Moments(tensors["mean"], tensors["cov"].double(), int(tensors["n"]))


def _write(fname: Path, m: Moments, digest: str) -> None:
    tensors = {"mean": m.mean, "cov": m.cov.float(), "n": torch.tensor(m.n)}
    meta = {"cache_digest": digest, "sha256": _tensor_digest(tensors)}
    fd, tmp = tempfile.mkstemp(prefix=f".{fname.name}.", dir=fname.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, fname)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class ScoreContext:
    """What a scoring rule may need beyond a block of rows: the pool's moments of the statistic.

    Either a cache with the statistic and layer being scored (moments read from it, see
    :func:`pool_moments`), or explicit ``pool`` moments (e.g. of rows held in memory).
    """

    cache: Any = None
    stat: str = ""
    layer: int = -1
    pool: Moments | None = None

    def moments(self) -> Moments:
        if self.pool is None:
            if self.cache is None:
                raise ValueError("this score needs the pool's moments: rank a cache, or pass pool=")
            self.pool = pool_moments(self.cache, self.stat, self.layer)
        return self.pool


def clear_memo() -> None:
    """Forget the moments held in memory: the next :func:`pool_moments` reads them from the
    cache directory (or computes them), e.g. to time that."""
    _MEMO.clear()


def pool_moments(cache: Any, stat: str, layer: int) -> Moments:
    """The moments of statistic ``stat`` at ``layer`` over every row of ``cache``.

    Streams the cached rows once (fp64 sums); memoised in memory and in the cache directory,
    both keyed by the cache's content digest (see the module docstring).
    """
    digest = content_digest(cache)
    key = (digest, stat, int(layer))
    if key in _MEMO:
        return _MEMO[key]
    fname = CacheFiles(Path(cache.path)).moments(stat, layer)
    persist = len(cache) >= PERSIST_ROWS
    m = _read(fname, digest) if persist and fname.exists() else None
    if m is None:
        view = cache.stat(stat, layer)
        d = view.shape[1]
        s1 = torch.zeros(d, dtype=torch.float64)
        s2 = torch.zeros((d, d), dtype=torch.float64)
        n = 0
        for _, rows, _ in view.chunks(8192):
            x = rows.double()
            s1 += x.sum(0)
            s2 += x.T @ x
            n += len(x)
        mu = s1 / max(n, 1)
        m = Moments(mu, (s2 - n * torch.outer(mu, mu)) / max(n - 1, 1), n)
        if persist:
            with contextlib.suppress(OSError):  # a read-only cache: the moments stay in memory
                _write(fname, m, digest)
    _MEMO[key] = m
    return m


__all__ = [
    "DEFLATE",
    "RIDGE",
    "Moments",
    "ScoreContext",
    "clear_memo",
    "content_digest",
    "pool_moments",
]
