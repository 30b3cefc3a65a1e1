"""The numeric arguments of the public entry points, checked once, in one place.

``rank``, ``select``, ``build_cache`` and the metrics take sizes, counts and row selections from
users; each is checked here before any work, and a wrong one is a ``ValueError`` of one line
naming the argument (never a silent empty result, a wrapped index or a raw ``IndexError``).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def positive_int(name: str, value: Any, *, none: bool = False, least: int = 1) -> Any:
    """``value`` when it is an integer of at least ``least`` (or ``None`` when ``none``).

    Examples:
        >>> positive_int("top_k", 5), positive_int("chunk_rows", None, none=True)
        (5, None)
        >>> positive_int("chunk_rows", -5)
        Traceback (most recent call last):
        ...
        ValueError: chunk_rows must be a positive integer, not -5
    """
    if value is None and none:
        return None
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not ok or value < least:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name} must be {what}{' or None' if none else ''}, not {value!r}")
    return int(value)


def _integer(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def row_indices(rows: Any, n: int, name: str = "rows") -> torch.Tensor | None:
    """The cache rows that ``rows`` names, sorted and distinct (``None`` stays ``None``: all).

    ``rows`` is either row indices (integers ``0 <= r < n``; a list, range, integer tensor or
    array) or a boolean mask of length ``n`` (a list of bools, a ``torch.bool`` tensor or a bool
    array). A float, a negative or out-of-range index, a mask of another length or a mix of
    booleans and integers is refused, naming the first offending value.

    Examples:
        >>> row_indices([3, 1, 3], 5).tolist(), row_indices([True, False, True], 3).tolist()
        ([1, 3], [0, 2])
        >>> row_indices([5], 5)
        Traceback (most recent call last):
        ...
        ValueError: rows: 5 is out of range for 5 rows (give indices 0 to 4, or a boolean mask)
    """
    if rows is None:
        return None
    hint = f"give indices 0 to {n - 1}, or a boolean mask" if n else "there are no rows"
    if isinstance(rows, str | bytes | Mapping) or not hasattr(rows, "__iter__"):
        raise ValueError(f"{name}: {rows!r} is not a list of row indices or a boolean mask")
    if isinstance(rows, torch.Tensor | np.ndarray):
        arr = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        if arr.ndim != 1:
            raise ValueError(f"{name}: a {arr.ndim}-d array; give a 1-d list of rows or a mask")
        kind = arr.dtype.kind
        items = arr.tolist()
        if kind == "b":
            mask = True
        elif kind in "iu":
            mask = False
        else:
            raise ValueError(f"{name}: {arr.dtype} values are not row indices ({hint})")
    else:
        items = list(rows)
        flags = [isinstance(x, bool | np.bool_) for x in items]
        mask = bool(items) and all(flags)
        if not mask and any(flags):
            raise ValueError(f"{name}: a boolean among integers; {hint}")
        bad = next((x for x in items if not _integer(x)), None) if not mask else None
        if bad is not None:
            raise ValueError(f"{name}: {bad!r} is not an integer; {hint}")
    if mask:
        if len(items) != n:
            raise ValueError(f"{name}: a boolean mask of length {len(items)}, for {n} rows")
        return torch.tensor(items, dtype=torch.bool).nonzero()[:, 0]
    idx = torch.tensor([int(x) for x in items], dtype=torch.long)
    if len(idx) and int(idx.min()) < 0:
        raise ValueError(f"{name}: {int(idx.min())} is negative ({hint})")
    if len(idx) and int(idx.max()) >= n:
        raise ValueError(f"{name}: {int(idx.max())} is out of range for {n} rows ({hint})")
    return torch.unique(idx)


def same_length(what: str, **tensors: Any) -> None:
    """Refuse 1-d tensors of different lengths (one line naming them).

    Examples:
        >>> same_length("pool_metrics", scores=torch.ones(3), labels=torch.ones(2))
        Traceback (most recent call last):
        ...
        ValueError: pool_metrics: scores has shape (3,) and labels (2,); give one per example
    """
    shapes = {k: tuple(torch.as_tensor(v).shape) for k, v in tensors.items()}
    (a, sa), (b, sb) = list(shapes.items())[:2]
    if len(sa) != 1 or sa != sb:
        raise ValueError(f"{what}: {a} has shape {sa} and {b} {sb}; give one per example")
