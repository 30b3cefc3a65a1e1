"""Several queries ranked together: what ``auto`` ranks with by default.

Each member is a :class:`~lensattr.query.Query` with its own statistic, score and chosen layer
(or layer set). A row's score is the mean over the ``M`` members of its standardised score,

    s(x) = 1/M sum_m (s_m(x) - mean_P s_m) / std_P s_m,

the mean and standard deviation taken over the ranked rows ``P``. Standardising puts cosines,
dot products and whitened scores on one scale. Each member is a method whose held-out treatment
replies rank high among the pool and above their controls; averaging many of them averages out
the luck of choosing any one on a few held-out pairs. Left out of one behaviour at a time, the
mean of the 30 best methods found more of each behaviour's examples than the single best method
did (the generalisation study, ``docs/results.md``).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lensattr.query import Query, QueryError, as_query

SCORE = "mean_zscore"
"""The name a ranking by an ensemble reports as its score."""


@dataclass
class Ensemble:
    """Queries ranked together by the mean of their standardised scores.

    Attributes:
        members: the queries, best first, each with its ``layer`` chosen.

    Examples:
        >>> import torch
        >>> q = Query({1: torch.tensor([1.0, 0.0])}, "contrast", "resid_post", {}, 4, layer=1)
        >>> Ensemble([q, q]).layers, Ensemble([q]).stats
        ((1,), ('resid_post',))
    """

    members: list[Query]

    def __post_init__(self) -> None:
        if not self.members:
            raise QueryError("an ensemble needs at least one member query")
        for i, q in enumerate(self.members):
            if not isinstance(q, Query):
                raise QueryError(f"ensemble member {i} is a {type(q).__name__}, not a Query")
            if q.layer is None:
                raise QueryError(f"ensemble member {i} ({q.rule}|{q.stat}|{q.score}) has no layer")
            q.best_layer()  # its layer is one of its vectors

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer a member is ranked at (what a cache for the ensemble must hold)."""
        found = {la for q in self.members for la in _layers(q)}
        return tuple(sorted(found))

    @property
    def stats(self) -> tuple[str, ...]:
        """Every statistic a member is ranked with."""
        return tuple(sorted({q.stat for q in self.members}))

    def save(self, path: str | Path) -> None:
        """Write every member into one safetensors file (``member/{i}/layer/{k}`` tensors and
        each member's metadata)."""
        tensors = {
            f"member/{i}/layer/{k}": v.contiguous()
            for i, q in enumerate(self.members)
            for k, v in q.vectors.items()
        }
        meta = {"ensemble": json.dumps([q.metadata() for q in self.members])}
        save_file(tensors, str(path), meta)

    @classmethod
    def load(cls, path: str | Path) -> "Ensemble":
        """Read a saved ensemble, validating every member as :meth:`Query.load` does."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                metas = json.loads((fh.metadata() or {})["ensemble"])
            tensors = load_file(str(path))
            members = []
            for i, meta in enumerate(metas):
                prefix = f"member/{i}/layer/"
                vectors = {
                    int(k.removeprefix(prefix)): v
                    for k, v in tensors.items()
                    if k.startswith(prefix)
                }
                members.append(Query.from_saved(meta, vectors))
            return cls(members)
        except QueryError as err:
            raise QueryError(f"{path}: {err}") from None
        except (KeyError, ValueError, TypeError, IndexError, OSError, SafetensorError) as err:
            raise QueryError(
                f"{path}: not a lensattr ensemble ({type(err).__name__}: {err})"
            ) from None


def _layers(q: Query) -> tuple[int, ...]:
    layer = q.best_layer()
    return (layer,) if isinstance(layer, int) else tuple(layer)


def as_ranked(query: Any) -> "Query | Ensemble":
    """What :func:`~lensattr.rank` ranks with: a :class:`Query` or an :class:`Ensemble`, given
    as itself, a :class:`~lensattr.select.Selection` (its ensemble when it has one), or a saved
    file of either."""
    if isinstance(query, Query | Ensemble):
        return query
    ensemble = getattr(query, "ensemble", None)
    if isinstance(ensemble, Ensemble):
        return ensemble
    if isinstance(query, str | Path):
        try:
            with safe_open(str(query), framework="pt") as fh:
                if "ensemble" in (fh.metadata() or {}):
                    return Ensemble.load(query)
        except (OSError, ValueError, SafetensorError):
            pass  # Query.load names the problem
    return as_query(query)


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` over the finite scores (float64); non-finite ones stay NaN.

    Examples:
        >>> standardised(torch.tensor([1.0, 2.0, 3.0, float("nan")])).tolist()[:3]
        [-1.0, 0.0, 1.0]
    """
    s = scores.double()
    ok = torch.isfinite(s)
    if int(ok.sum()) < 2:
        return torch.where(ok, torch.zeros_like(s), torch.nan)
    mu, sd = s[ok].mean(), s[ok].std()
    out = (s - mu) / sd if sd > 0 else s - mu
    return torch.where(ok, out, torch.nan)


__all__ = ["SCORE", "Ensemble", "as_ranked", "standardised"]
