"""Plain dict registries of the statistics (``STAT``), the behaviour queries' rules (``QUERY``),
the scores (``SCORE``) and the criteria ``auto`` chooses a method by (``CRITERION``).

Register your own with the decorators. A name is a plain name (letters, digits, ``.``, ``_``
and ``-``, not starting with ``.``: it becomes part of tensor and file names). A name belongs to
the module that registered it first: registering it again from the same module (re-running a
notebook cell, reloading a module) replaces the old function; from anywhere else it raises unless
``override=True``. The built-ins (:mod:`lensattr.methods`) register themselves when ``lensattr``
is imported: the package's ``__init__`` imports them first, so this module imports nothing above
it. Third-party packages register through the entry-point group ``lensattr.methods``: each entry
point names a module that lensattr imports lazily, once, the first time a registry is read; a
plugin that fails to import is logged as a warning and skipped, so one broken plugin cannot break
every lookup. A plugin may replace a built-in (``override=True``) only when the user allows it by
name in the environment variable ``LENSATTR_PLUGIN_OVERRIDES`` (comma-separated names, or ``*``
for any); otherwise the built-in stays and a warning says so. Either way the replacement is
logged.

What a registered function returns is checked where lensattr calls it (:meth:`Stat.apply`,
:meth:`QueryRule.apply`, :meth:`Score.apply`): a float tensor of the documented shape, else a
:class:`MethodError` naming the function.

Examples:
    >>> import torch
    >>> from lensattr.registry import register_stat, STAT
    >>> @register_stat("last_token_resid", needs_grad=False)
    ... def last_token_resid(acts):
    ...     idx = acts.mask.int().cumsum(1).argmax(1)  # last response position
    ...     return acts.z_out[torch.arange(len(idx)), idx]
    >>> "last_token_resid" in STAT
    True
"""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

import torch

from lensattr.config import POOLINGS
from lensattr.store.shards import plain_name

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "lensattr.methods"
OVERRIDES_ENV = "LENSATTR_PLUGIN_OVERRIDES"
"""The environment variable that lets plugins replace built-ins: comma-separated names, or ``*``."""


class MethodError(ValueError):
    """A registered function returned something other than what lensattr documents for it."""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _checked(kind: str, item: Any, out: Any, shape: tuple[int, ...], meaning: str) -> torch.Tensor:
    """``out`` when it is a floating-point tensor of ``shape``, else a :class:`MethodError`."""
    if (
        isinstance(out, torch.Tensor)
        and out.is_floating_point()
        and tuple(out.shape) == tuple(shape)
    ):
        return out
    where = f"{item.module}.{getattr(item.fn, '__qualname__', item.fn)}"
    raise MethodError(
        f"{kind} {item.name!r} ({where}) returned {_describe(out)}; lensattr expects a float "
        f"tensor of shape {tuple(shape)} ({meaning})"
    )


@runtime_checkable
class StatFn(Protocol):
    def __call__(self, acts: Any, /) -> torch.Tensor: ...


@runtime_checkable
class QueryFn(Protocol):
    def __call__(self, treatment: torch.Tensor, control: torch.Tensor, pool: Any, /) -> Any: ...


@runtime_checkable
class ScoreFn(Protocol):
    def __call__(
        self, rows: torch.Tensor, norms: torch.Tensor, query: torch.Tensor, ctx: Any, /
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Stat:
    """A training-side statistic: ``fn(acts: LayerActs) -> Float[Tensor, "batch d_model"]``.

    ``needs_grad``: whether it reads ``acts.grad`` (else the capture skips the backward);
    ``sites``: extra sites to capture (``"attn_out"``, ``"mlp_out"``); ``pooling``: how it turns
    token positions into one vector (``"mean_response"``: the mean over the reply tokens, the
    built-ins'), recorded in the manifest and the query and checked between them;
    ``prompt``: it reads the prompt positions too (their activations or gradients), though it
    pools over the reply (the authors' ``residual_change``).
    """

    name: str
    fn: StatFn
    needs_grad: bool = True
    sites: tuple[str, ...] = ()
    module: str = ""
    pooling: str = POOLINGS[0]
    prompt: bool = False

    def apply(self, acts: Any) -> torch.Tensor:
        """``fn(acts)``, checked to be a float ``[batch, d_model]`` tensor (:class:`MethodError`
        naming the function otherwise)."""
        shape = (acts.mask.shape[0], acts.z_out.shape[-1])
        return _checked("statistic", self, self.fn(acts), shape, "one row per example")

    @property
    def reads_prompt(self) -> bool:
        """Whether it may read positions outside the response: registered with ``prompt=True``,
        or any pooling but ``"mean_response"`` (the other statistics read the response positions
        only, so a capture for them runs the prompt forward-only;
        ``capture(..., keep_prompt=False)``)."""
        return self.prompt or self.pooling != POOLINGS[0]


@dataclass(frozen=True)
class QueryRule:
    """A behaviour query's rule: ``fn(treatment, control, pool) -> Float[Tensor, "pairs d_model"]``.

    ``fn`` receives the statistic of the treatment replies and of their controls
    (``[n_pairs, d_model]`` each, row ``j`` of both from pair ``j``) and, for a pool-aware
    query, the :class:`~lensattr.moments.Moments` of the statistic over the training pool (else
    ``None``). It returns one contribution per pair; lensattr averages them and normalises
    (the :class:`~lensattr.query.Query` ``q = norm(mean_j fn(...)_j)``), and refits them on
    folds of the pairs to choose a method.

    ``stat``: the statistic it is compared with by default; ``stats``: the statistics it may be
    used with (``None``: any). ``uses_pool``: it needs the training pool's moments (a cache).
    ``pairs_from`` optionally turns the user's source (e.g. a trait spec) into pairs first.
    """

    name: str
    fn: QueryFn
    stat: str
    stats: tuple[str, ...] | None = None
    uses_pool: bool = False
    pairs_from: Callable[..., Any] | None = None
    module: str = ""

    def apply(self, treatment: torch.Tensor, control: torch.Tensor, pool: Any) -> torch.Tensor:
        """``fn(treatment, control, pool)``, checked to be a float ``[n_pairs, d_model]`` tensor
        (:class:`MethodError` naming the function otherwise)."""
        out = self.fn(treatment, control, pool)
        return _checked("query", self, out, tuple(treatment.shape), "one contribution per pair")


@dataclass(frozen=True)
class Score:
    """A scoring rule ``fn(rows, norms, query, ctx) -> scores``; higher = more like the treatment.

    ``rows`` is a ``[n, d_model]`` fp32 block of cached rows, ``norms`` their ``[n]`` norms,
    ``query`` one query vector ``[d_model]`` or, when ``batched``, several as columns
    ``[d_model, q]`` (the scores are then ``[n, q]``); ``ctx`` is a
    :class:`~lensattr.rank.ScoreContext` that gives the pool's moments of the statistic
    (``ctx.moments()``). ``full_rank``: the rule
    inverts the pool's covariance, so it needs many more pool rows than the statistic has
    dimensions (``auto`` leaves it out of its default candidates below
    :data:`~lensattr.select.ROWS_PER_DIMENSION` rows a dimension).
    """

    name: str
    fn: ScoreFn
    batched: bool = False
    module: str = ""
    full_rank: bool = False

    def apply(
        self, rows: torch.Tensor, norms: torch.Tensor, query: torch.Tensor, ctx: Any
    ) -> torch.Tensor:
        """``fn(rows, norms, query, ctx)``, checked to be a float tensor of one score per row
        (``[n]``) or, for several queries ``query`` ``[d, q]``, ``[n, q]`` (:class:`MethodError`
        naming the function otherwise: a scalar would give every row the same score)."""
        shape = (rows.shape[0],) if query.ndim == 1 else (rows.shape[0], query.shape[1])
        meaning = "one score per row" if query.ndim == 1 else "one score per row and query"
        return _checked("score", self, self.fn(rows, norms, query, ctx), shape, meaning)


@dataclass(frozen=True)
class Criterion:
    """A rule ``auto`` chooses a method by: ``fn(fold_scores) -> float``, higher is better.

    ``fn`` receives one candidate's :class:`~lensattr.criterion.FoldScores` at one layer (or
    layer set): the pool's, the held-out treatments' and the held-out controls' scores on every
    fold (``fold_scores.heldout(f)``). ``description`` is the phrase
    :meth:`~lensattr.select.Selection.summary` names it by.
    """

    name: str
    fn: Callable[[Any], float]
    description: str
    module: str = ""


STAT: dict[str, Stat] = {}
QUERY: dict[str, QueryRule] = {}
SCORE: dict[str, Score] = {}
CRITERION: dict[str, Criterion] = {}
_loaded = False
_plugin: EntryPoint | None = None  # the entry point being imported, if any


def builtin(item: Any) -> bool:
    """Whether a registered item is one of lensattr's own (its function lives in lensattr)."""
    return item.module == "lensattr" or item.module.startswith("lensattr.")


def _allowed_overrides() -> set[str]:
    return {x.strip() for x in os.environ.get(OVERRIDES_ENV, "").split(",") if x.strip()}


def _add(table: dict[str, Any], kind: str, item: Any, override: bool) -> None:
    plain_name(item.name, kind)
    old = table.get(item.name)
    if old is not None and not override and old.module != item.module:
        raise ValueError(
            f"a {kind} named {item.name!r} is already registered (by {old.module}); "
            "pass override=True to replace it"
        )
    if old is not None and _plugin is not None and builtin(old) and not builtin(item):
        allowed = _allowed_overrides()
        if item.name not in allowed and "*" not in allowed:
            logger.warning(
                "lensattr plugin %s (%s) tried to replace the built-in %s %r; the built-in is "
                "kept (to allow it: %s=%s)",
                _plugin.name,
                _plugin.value,
                kind,
                item.name,
                OVERRIDES_ENV,
                item.name,
            )
            return
        logger.warning(
            "lensattr plugin %s (%s) replaces the built-in %s %r (allowed by %s)",
            _plugin.name,
            _plugin.value,
            kind,
            item.name,
            OVERRIDES_ENV,
        )
    elif old is not None and old.module != item.module:
        logger.info("%s %r of %s replaces the one of %s", kind, item.name, item.module, old.module)
    table[item.name] = item


def register_stat(
    name: str,
    *,
    needs_grad: bool = True,
    sites: tuple[str, ...] = (),
    pooling: str = POOLINGS[0],
    reads_prompt: bool = False,
    override: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a training-side statistic (decorator).

    ``pooling`` names how the function turns token positions into one vector (default
    ``"mean_response"``, the mean over the reply tokens); statistics cached or captured together
    must share it. ``reads_prompt``: the function reads the prompt positions too (so its capture
    keeps them, gradients included). A name taken by another module raises ``ValueError`` unless
    ``override=True``; the same module registering it again replaces it.
    """
    plain_name(name, "statistic")
    if not isinstance(pooling, str) or not pooling:
        raise ValueError(f"pooling must be a non-empty name, not {pooling!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        item = Stat(name, fn, needs_grad, tuple(sites), fn.__module__, pooling, reads_prompt)
        _add(STAT, "statistic", item, override)
        return fn

    return deco


def pooling_of(stats: Sequence[Stat]) -> str:
    """The one pooling of statistics captured together (a cache, a query's pairs).

    Raises:
        ValueError: they pool differently (the message names each statistic's pooling).

    Examples:
        >>> pooling_of([get_stat("residual_change"), get_stat("resid_post")])
        'mean_response'
    """
    kinds = {p.pooling for p in stats}
    if len(kinds) > 1:
        each = ", ".join(f"{p.name} ({p.pooling})" for p in stats)
        raise ValueError(f"statistics captured together must share a pooling; got {each}")
    return kinds.pop() if kinds else Stat.pooling


def register_query(
    name: str,
    *,
    stat: str,
    stats: tuple[str, ...] | None = None,
    uses_pool: bool = False,
    pairs_from: Callable[..., Any] | None = None,
    override: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a behaviour query's rule (decorator); ``stat`` names the statistic it is compared
    with."""
    plain_name(name, "query")
    for s in (stat, *(stats or ())):
        plain_name(s, "statistic")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        item = QueryRule(name, fn, stat, stats, uses_pool, pairs_from, fn.__module__)
        _add(QUERY, "query", item, override)
        return fn

    return deco


def register_score(
    name: str,
    *,
    batched: bool = False,
    full_rank: bool = False,
    override: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a scoring rule (decorator); ``batched``: it scores ``[d, q]`` queries at once;
    ``full_rank``: it inverts the pool's covariance (see :class:`Score`)."""
    plain_name(name, "score")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _add(SCORE, "score", Score(name, fn, batched, fn.__module__, full_rank), override)
        return fn

    return deco


def register_criterion(
    name: str, *, description: str = "", override: bool = False
) -> Callable[[Callable[[Any], float]], Callable[[Any], float]]:
    """Register a criterion for ``select(criterion=name)`` (decorator); see :class:`Criterion`.

    Examples:
        >>> @register_criterion("heldout_accuracy", description="held-out accuracy")
        ... def heldout_accuracy(fs):
        ...     return fs.accuracy()
        >>> get_criterion("heldout_accuracy").description
        'held-out accuracy'
    """

    def deco(fn: Callable[[Any], float]) -> Callable[[Any], float]:
        item = Criterion(name, fn, description or name, fn.__module__)
        _add(CRITERION, "criterion", item, override)
        return fn

    return deco


def load_plugins() -> None:
    """Import every ``lensattr.methods`` entry point, once; a broken one is logged and skipped."""
    global _loaded, _plugin
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        logger.debug("loading lensattr plugin %s", ep.value)
        _plugin = ep
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001  (a plugin's failure must not break lensattr)
            logger.warning("lensattr plugin %s (%s) failed to load: %s", ep.name, ep.value, err)
        finally:
            _plugin = None


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    load_plugins()
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]


def get_stat(name: str) -> Stat:
    return _lookup(STAT, "statistic", name)


def get_query(name: str) -> QueryRule:
    return _lookup(QUERY, "query", name)


def get_score(name: str) -> Score:
    return _lookup(SCORE, "score", name)


def get_criterion(name: str) -> Criterion:
    return _lookup(CRITERION, "criterion", name)


def names(kind: str) -> list[str]:
    """The registered names of ``"stat"``, ``"query"``, ``"score"`` or ``"criterion"`` (plugins
    included)."""
    load_plugins()
    tables: dict[str, dict[str, Any]] = {
        "stat": STAT,
        "query": QUERY,
        "score": SCORE,
        "criterion": CRITERION,
    }
    return sorted(tables[kind])
