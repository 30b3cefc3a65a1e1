"""Plain dict registries of training-side statistics (phi), behaviour queries (psi) and scores (g).

Register your own with the decorators; names are unique (a duplicate raises). Third-party packages
register through the entry-point group ``lensattr.methods``: each entry point names a module that
lensattr imports lazily, once, the first time a registry is read; its decorators do the registering.

Examples:
    >>> import torch
    >>> from lensattr.registry import register_phi, PHI
    >>> @register_phi("last_token_resid", doc_only=True)
    ... def last_token_resid(acts):
    ...     idx = acts.mask.int().cumsum(1).argmax(1)  # last response position
    ...     return acts.z_out[torch.arange(len(idx)), idx]
    >>> "last_token_resid" in PHI
    True
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "lensattr.methods"


@dataclass(frozen=True)
class Phi:
    """A training-side statistic: ``fn(acts: LayerActs) -> Float[Tensor, "batch d_model"]``.

    ``needs_grad``: whether it reads ``acts.grad`` (else the capture may skip the backward);
    ``sites``: extra sites to capture (``"attn_out"``, ``"mlp_out"``).
    """

    name: str
    fn: Callable[..., Any]
    needs_grad: bool = True
    sites: tuple[str, ...] = ()


@dataclass(frozen=True)
class Psi:
    """A behaviour query from pairs: ``fn(treatment, control, stat) -> Float[Tensor, "batch d"]``.

    ``fn`` receives the captured :class:`~lensattr.capture.LayerActs` of a batch of treatment
    examples and of their controls and returns one contribution per pair; lensattr averages them
    over all pairs and normalises (``psi = norm(mean_j fn(x'_j, x_j))``). ``stat`` is the phi whose
    cached rows the query is compared with by default. ``pairs_from`` optionally turns the
    user's source (e.g. a trait spec) into pairs first.
    """

    name: str
    fn: Callable[..., Any]
    stat: str
    pairs_from: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Score:
    """A scoring rule ``fn(rows, norms, psi, ctx) -> Float[Tensor, "n"]``; higher = treatment."""

    name: str
    fn: Callable[..., Any]


PHI: dict[str, Phi] = {}
PSI: dict[str, Psi] = {}
SCORE: dict[str, Score] = {}
_loaded = False


def _add(table: dict[str, Any], kind: str, item: Any) -> None:
    if item.name in table:
        raise ValueError(f"a {kind} named {item.name!r} is already registered")
    table[item.name] = item


def register_phi(
    name: str, *, needs_grad: bool = True, sites: tuple[str, ...] = (), doc_only: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a training-side statistic (decorator). Duplicate names raise ``ValueError``.

    ``doc_only`` skips the registration when the name is taken (for re-run doctests/notebooks).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not (doc_only and name in PHI):
            _add(PHI, "phi", Phi(name, fn, needs_grad, tuple(sites)))
        return fn

    return deco


def register_psi(
    name: str, *, stat: str, pairs_from: Callable[..., Any] | None = None, doc_only: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a behaviour query (decorator); ``stat`` names the phi it is compared with."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not (doc_only and name in PSI):
            _add(PSI, "psi", Psi(name, fn, stat, pairs_from))
        return fn

    return deco


def register_score(
    name: str, *, doc_only: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a scoring rule g (decorator)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not (doc_only and name in SCORE):
            _add(SCORE, "score", Score(name, fn))
        return fn

    return deco


def load_plugins() -> None:
    """Import the built-ins and every ``lensattr.methods`` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import lensattr.builtins  # noqa: F401  (registers the built-ins)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        logger.debug("loading lensattr plugin %s", ep.value)
        ep.load()


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    load_plugins()
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]


def get_phi(name: str) -> Phi:
    return _lookup(PHI, "phi", name)


def get_psi(name: str) -> Psi:
    return _lookup(PSI, "psi", name)


def get_score(name: str) -> Score:
    return _lookup(SCORE, "score", name)
