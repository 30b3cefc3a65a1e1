"""Behaviour queries: one unit vector per layer, built from treatment/control pairs.

Building a query has two steps. :func:`pair_stats` runs the model once over every pair's
treatment and control reply and keeps the cached statistics of both sides at every layer (the
only model work). :func:`behavior_query` then applies a registered query rule to those rows (and,
for a pool-aware rule, to the training pool's moments): a query for any rule, statistic or layer
costs a mean over pairs, and the held-out accuracy a few matrix-vector products.
"""

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lensattr._version import __version__
from lensattr.backends.capture import capture
from lensattr.backends.models import load_model
from lensattr.backends.prefix import openings_kept
from lensattr.checks import positive_int
from lensattr.config import CaptureConfig, check_capture, resolve_config
from lensattr.data import Pair, load_pairs
from lensattr.layers import layer_text, parse_layers
from lensattr.moments import Moments, ScoreContext, content_digest, pool_moments
from lensattr.progress import Progress
from lensattr.registry import QueryRule, Score, get_query, get_score, get_stat, pooling_of
from lensattr.render import Encoded, collate, encode, length_batches
from lensattr.store.cache import Cache, CacheError, open_cache
from lensattr.store.reader import name_ids
from lensattr.store.shards import plain_name, save_tensors
from lensattr.tables import layers_text
from lensattr.types import LayerActs, Vec

FOLDS = 4
"""Interleaved folds of the query pairs for held-out measurements (fewer with fewer pairs)."""


class QueryError(ValueError):
    """A query that is invalid, or that does not fit the cache it is used with."""


# ------------------------------------------------------------------------------ pair statistics


@dataclass
class PairStats:
    """Statistics of every pair's treatment and control reply: ``side[stat][layer]`` is
    ``[n_pairs, d_model]`` (fp32), row ``j`` from pair ``j`` on both sides; ``capture``: the
    capture settings (``None``: not recorded, nothing is checked); ``sources``: the module of
    the function that computed each statistic (``None``: not recorded)."""

    treatment: dict[str, dict[int, torch.Tensor]]
    control: dict[str, dict[int, torch.Tensor]]
    model: dict[str, str]
    capture: CaptureConfig | None = None
    sources: dict[str, str] | None = None

    @property
    def stats(self) -> list[str]:
        return list(self.treatment)

    def __repr__(self) -> str:
        return (
            f"PairStats({self.n_pairs} pairs, stats {', '.join(self.stats)}, layers "
            f"{layers_text(self.layers)}, model {self.model.get('name', '?')})"
        )

    @property
    def layers(self) -> list[int]:
        return sorted(next(iter(self.treatment.values()))) if self.treatment else []

    @property
    def n_pairs(self) -> int:
        first = next(iter(self.treatment.values()), {})
        return len(next(iter(first.values()))) if first else 0

    def sides(self, stat: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(treatment, control)`` rows of ``stat`` at ``layer``."""
        if stat not in self.treatment:
            raise QueryError(f"the pair statistics have no {stat!r} (they have {self.stats})")
        if layer not in self.treatment[stat]:
            raise QueryError(f"the pair statistics have no layer {layer} (they have {self.layers})")
        return self.treatment[stat][layer], self.control[stat][layer]

    def save(self, path: str | Path) -> None:
        """Write as safetensors (no pickle); :meth:`load` reads it back."""
        tensors = {
            f"{side}/{stat}/{layer}": v.contiguous()
            for side, table in (("t", self.treatment), ("c", self.control))
            for stat, by_layer in table.items()
            for layer, v in by_layer.items()
        }
        meta = {
            "model": json.dumps(self.model),
            "capture": _capture_json(self.capture),
            "sources": json.dumps(self.sources),
        }
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "PairStats":
        """Read pair statistics saved by :meth:`save`.

        Raises:
            QueryError: not a readable pair-statistics file (naming it).
            OSError: the file cannot be opened (missing, no permission).
        """
        with open(path, "rb"):  # a missing or unreadable file: its own OSError, naming it
            pass
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            sides: dict[str, dict[str, dict[int, torch.Tensor]]] = {"t": {}, "c": {}}
            for key, v in load_file(str(path)).items():
                side, stat, layer = key.split("/")
                sides[side].setdefault(plain_name(stat, "statistic"), {})[int(layer)] = v
            ps = cls(sides["t"], sides["c"], json.loads(meta["model"]))
            ps.capture = _capture_of(meta)
            ps.sources = _sources_of(json.loads(meta["sources"]))
        except (KeyError, ValueError, TypeError, AttributeError, SafetensorError) as err:
            raise QueryError(
                f"{path}: not lensattr pair statistics ({type(err).__name__}: {err})"
            ) from None
        return ps


def _sources_of(value: Any) -> dict[str, str] | None:
    """Recorded statistic sources: ``null`` or ``{statistic: module}``."""
    if value is None:
        return None
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return value
    raise ValueError(f"field 'sources': {value!r} is not a map of statistics to modules")


def _check_distinct(pairs: Sequence[Pair], encs: list[list[Encoded]], max_length: Any) -> None:
    """Refuse pairs whose two sides are the same tokens: the same reply, or replies that differ
    only beyond ``max_length`` (truncation cut the difference away). Such a pair contrasts
    nothing, and would dilute the query and the held-out measures without a word."""
    same = [p for p, (t, c) in zip(pairs, encs, strict=True) if t.ids == c.ids]
    if not same:
        return
    text = [p.id for p in same if p.sides()[0].messages == p.sides()[1].messages]
    cut = [p.id for p in same if p.id not in text]
    problems = []
    if text:
        problems.append(f"pairs {name_ids(text)} have the same treatment and control")
    if cut:
        problems.append(
            f"pairs {name_ids(cut)} differ only beyond max_length={max_length} tokens (truncation "
            "makes their two sides identical: raise max_length)"
        )
    raise QueryError(
        "; ".join(problems) + f" ({len(same)} of {len(pairs)} pairs): a pair must contrast two "
        "different replies; fix or drop them"
    )


def _capture_json(config: CaptureConfig | None) -> str:
    return json.dumps({} if config is None else config.to_manifest())


def _capture_of(meta: dict[str, str]) -> CaptureConfig | None:
    """The capture settings a saved query or pair statistics record (``{}``: ``None``, none
    recorded), every field of :class:`~lensattr.config.CaptureConfig` (:func:`_capture_json`)."""
    record = json.loads(meta["capture"])
    if not isinstance(record, dict):
        raise ValueError(f"field 'capture': {record!r} is not a map of capture settings")
    if not record:
        return None
    return CaptureConfig.from_manifest(record, what="field 'capture'")


def pair_stats(
    model: Any,
    pairs: Any,
    *,
    stats: Sequence[str] = ("residual_change",),
    layers: Any = "all",
    batch_size: int = 8,
    max_length: int | None = 512,
    padding_side: str = "right",
    progress: bool | None = None,
    config: CaptureConfig | None = None,
) -> PairStats:
    """Capture the statistics ``stats`` of every pair's two replies at ``layers`` (one pass).

    ``batch_size`` counts sequences, as in :func:`~lensattr.build_cache`: a batch holds
    ``batch_size // 2`` pairs, grouped by length to limit padding (by reply length where the
    backend starts each row's backward at its own prompt's end, as :func:`~lensattr.build_cache`).

    ``config``: the capture settings as one :class:`~lensattr.config.CaptureConfig` (a cache's
    own, ``cache.capture_config``, captures the pairs as the cache was), instead of ``layers``,
    ``max_length`` and ``padding_side``, which then stay at their defaults
    (:func:`~lensattr.config.resolve_config`, as in :func:`~lensattr.build_cache`). Its
    ``storage_dtype`` is the cache's: pair statistics are kept in fp32.

    Examples:
        >>> pairs = [{"prompt": "Is 2+2=5?", "treatment": "Yes!", "control": "No, 4."}]
        >>> s = pair_stats("tiny-random", pairs, stats=["resid_post"], layers=[1, 3])
        >>> s.n_pairs, s.layers, tuple(s.sides("resid_post", 3)[0].shape)
        (1, [1, 3], (1, 32))
    """
    cfg = resolve_config(
        config, "pair_stats", layers=layers, max_length=max_length, padding_side=padding_side
    )
    model = load_model(model)
    pair_list = load_pairs(pairs) if not _is_pair_list(pairs) else list(pairs)
    if not pair_list:
        raise QueryError("no pairs to build the query from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    specs = [get_stat(s) for s in dict.fromkeys(stats)]
    # before any work: statistics captured together share one pooling, the config's
    cfg = cfg.pooled_by(pooling_of(specs))
    layer_list = sorted(parse_layers(cfg.layers, model.n_layers))
    max_length, padding_side = cfg.max_length, cfg.padding_side
    encs = [[encode(model.tokenizer, ex, max_length) for ex in p.sides()] for p in pair_list]
    _check_distinct(pair_list, encs, max_length)
    per = max(1, batch_size // 2)
    n, d = len(pair_list), model.d_model
    out = {
        side: {p.name: {la: torch.empty((n, d)) for la in layer_list} for p in specs}
        for side in ("t", "c")
    }
    sites = tuple(dict.fromkeys(s for p in specs for s in p.sites))
    need_grad = any(p.needs_grad for p in specs)
    keep_prompt = any(p.reads_prompt for p in specs)
    # a pair's two sides share their prompt, so its longer side is its longer reply: batches of
    # similar reply length where each row's graph starts at its own prompt's end, as in a build
    by_reply = need_grad and not keep_prompt and model.cuts_prompt
    longer = [max(pair, key=lambda e: len(e.ids)) for pair in encs]
    bar = Progress(n, "query pairs", "pair", progress)
    with openings_kept():  # the template's system prompt runs once
        for idx in length_batches(longer, per, by_reply=by_reply):
            batch = collate(
                [e for j in idx for e in encs[j]], model.pad_id, padding_side, str(model.device)
            )
            acts = capture(
                model, batch, layer_list, grad=need_grad, sites=sites, keep_prompt=keep_prompt
            )
            for layer, a in acts.items():
                for side, rows in zip(("t", "c"), _split(a), strict=True):
                    for p in specs:
                        out[side][p.name][layer][idx] = p.apply(rows).float().cpu()
            bar.update(len(idx))
    bar.close()
    return PairStats(
        out["t"],
        out["c"],
        model.fingerprint(),
        dataclasses.replace(cfg, layers=layer_list, storage_dtype="float32"),
        {p.name: p.module for p in specs},
    )


def _is_pair_list(pairs: Any) -> bool:
    return isinstance(pairs, list | tuple) and bool(pairs) and isinstance(pairs[0], Pair)


def _split(acts: LayerActs) -> tuple[LayerActs, LayerActs]:
    """Split a capture of interleaved (treatment, control) rows into the two sides."""
    return acts.rows(slice(0, None, 2)), acts.rows(slice(1, None, 2))


# ---------------------------------------------------------------------------------- the query


@dataclass
class Query:
    """A behaviour query: a unit vector per layer, and what it was built from.

    Attributes:
        vectors: ``{layer: q}`` with ``||q|| = 1`` (fp32).
        rule: the registered query rule it was built by (``query=`` of :func:`behavior_query`);
            ``stat``: the cached statistic it is compared with.
        model: the model fingerprint (checked against a cache's manifest when ranking).
        n_pairs: how many pairs went in.
        cv: per-layer held-out accuracy on the query pairs (see :func:`heldout_accuracy`).
        score: the registered score it is ranked with by default.
        layer: the layer chosen for it (by :func:`lensattr.select`), if any: a tuple when
            the query is ranked by the mean of its scores at several layers.
        pool: content digest of the cache whose moments a pool-aware rule used (``None``: none).
        capture: the capture settings of the pairs (``None``: not recorded, nothing checked).
        stat_module: the module of the function that computed the statistic (checked against
            the cache's record; ``None``: not recorded, nothing checked).
    """

    vectors: dict[int, torch.Tensor]
    rule: str
    stat: str
    model: dict[str, str]
    n_pairs: int
    cv: dict[int, float] | None = None
    score: str = "cosine"
    layer: int | tuple[int, ...] | None = None
    pool: str | None = None
    capture: CaptureConfig | None = None
    stat_module: str | None = None

    def __post_init__(self) -> None:
        check_vectors(self.vectors, "the query")
        check_fields(vars(self))

    def __repr__(self) -> str:
        chosen = "" if self.layer is None else f", chosen layer {layer_text(self.layer)}"
        cv = ", ".join(f"L{k} {v:.2f}" for k, v in sorted((self.cv or {}).items())[:8])
        cv += ", ..." if len(self.cv or {}) > 8 else ""
        return (
            f"Query({self.rule}|{self.stat}|{self.score} from {self.n_pairs} pairs, layers "
            f"{layers_text(self.layers)}{chosen}, model {self.model.get('name', '?')}"
            + (f", held-out accuracy {cv})" if cv else ")")
        )

    def best_layer(self) -> int | tuple[int, ...]:
        """The chosen layer (or layers) if :func:`lensattr.select` set one, else the layer whose
        query best separates held-out query pairs (:func:`heldout_accuracy`); ties go to the
        deeper layer.

        Raises:
            QueryError: no layer can be chosen (fewer than 2 pairs give no held-out pair), or
                the chosen layer is not one of the query's.
        """
        if self.layer is not None:
            chosen = (self.layer,) if isinstance(self.layer, int) else tuple(self.layer)
            for la in chosen:
                if la not in self.vectors:
                    raise QueryError(
                        f"the query's chosen layer {la} is not one of its layers {self.layers}"
                    )
            return self.layer if isinstance(self.layer, int) else chosen
        if len(self.layers) == 1:
            return self.layers[0]
        cv = {k: v for k, v in (self.cv or {}).items() if not math.isnan(v)}
        if not cv:
            raise QueryError(
                f"cannot choose a layer: no held-out accuracy ({self.n_pairs} pair(s); at least "
                "2 are needed); pass a layer explicitly"
            )
        return max(cv, key=lambda k: (cv[k], k))

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def vector(self, layer: int) -> Vec:
        if layer not in self.vectors:
            raise KeyError(f"the query has no layer {layer} (it has {self.layers})")
        return self.vectors[layer]

    def metadata(self) -> dict[str, str]:
        """What :meth:`save` writes beside the vectors: every field but ``vectors``, as text."""
        return {
            "rule": self.rule,
            "stat": self.stat,
            "model": json.dumps(self.model),
            "n_pairs": str(self.n_pairs),
            "cv": json.dumps(self.cv),
            "score": self.score,
            "layer": json.dumps(self.layer),
            "pool": json.dumps(self.pool),
            "capture": _capture_json(self.capture),
            "stat_module": json.dumps(self.stat_module),
            "lensattr_version": __version__,
        }

    def save(self, path: str | Path) -> None:
        """Write the query as safetensors (vectors) with JSON metadata, atomically and with the
        umask's mode; a failure names ``path``."""
        save_tensors(path, {f"layer/{k}": v for k, v in self.vectors.items()}, self.metadata())

    @classmethod
    def from_saved(cls, meta: dict[str, str], vectors: dict[int, torch.Tensor]) -> "Query":
        """The query that :meth:`metadata` and the vectors describe (validated field by field
        before the dataclass sees them: :func:`check_fields`)."""
        fields = {
            "vectors": vectors,
            "rule": meta["rule"],
            "stat": meta["stat"],
            "model": json.loads(meta["model"]),
            "n_pairs": int(meta["n_pairs"]),
            "cv": _cv_of(json.loads(meta["cv"])),
            "score": meta["score"],
            "layer": _layer_of(json.loads(meta["layer"])),
            "pool": json.loads(meta["pool"]),
            "capture": _capture_of(meta),
            "stat_module": json.loads(meta["stat_module"]),
        }
        check_fields(fields)
        return cls(**fields)

    @classmethod
    def load(cls, path: str | Path) -> "Query":
        """Read a saved query, validating every vector (finite, unit norm) and field.

        Raises:
            QueryError: not a lensattr query, or a field or vector of the wrong kind (naming the
                file).
            OSError: the file cannot be opened (missing, no permission, a directory).
        """
        with open(path, "rb"):  # a missing or unreadable file: its own OSError, naming it
            pass
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            vectors = {int(k.split("/")[1]): v for k, v in load_file(str(path)).items()}
            return cls.from_saved(meta, vectors)
        except QueryError as err:
            raise QueryError(f"{path}: {err}") from None
        except (
            KeyError,
            ValueError,
            IndexError,
            TypeError,
            AttributeError,
            OSError,
            SafetensorError,
        ) as err:
            raise QueryError(
                f"{path}: not a lensattr query ({type(err).__name__}: {err})"
            ) from None


def _cv_of(value: Any) -> dict[int, Any] | None:
    """A saved query's held-out accuracies: ``null`` or ``{layer: accuracy}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"field 'cv': {value!r} is not a map of layers to accuracies")
    return {int(k): v for k, v in value.items()}


def _layer_of(value: Any) -> int | tuple[int, ...] | None:
    """A saved query's chosen layer: ``null``, an int, or a list of ints (a layer set)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return tuple(value)
    raise ValueError(f"field 'layer': {value!r} is not a layer or a list of layers")


def check_fields(fields: dict[str, Any]) -> None:
    """Refuse a query field of the wrong kind (one line naming the field): the names must be
    plain names, ``model`` a map of strings, ``n_pairs`` a count, ``cv`` a map of layers to
    numbers, ``pool`` and ``stat_module`` strings or ``None``."""

    def bad(field: str, want: str) -> QueryError:
        return QueryError(f"field {field!r}: {fields.get(field)!r} is not {want}")

    for field in ("rule", "stat", "score"):
        try:
            plain_name(fields.get(field), field)
        except ValueError as err:
            raise QueryError(f"field {field!r}: {err}") from None
    model, n_pairs, cv = fields.get("model"), fields.get("n_pairs"), fields.get("cv")
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, str | None) for k, v in model.items()
    ):
        raise bad("model", "a model fingerprint (a map of strings)")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 0:
        raise bad("n_pairs", "a count of pairs")
    if cv is not None and not (
        isinstance(cv, dict)
        and all(
            isinstance(k, int) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in cv.items()
        )
    ):
        raise bad("cv", "a map of layers to held-out accuracies")
    for field in ("pool", "stat_module"):
        if not isinstance(fields.get(field), str | None):
            raise bad(field, "a string or null")
    capture = fields.get("capture")
    if capture is not None and not isinstance(capture, CaptureConfig):
        raise bad("capture", "capture settings")


def check_fits(
    cache: Cache,
    model: dict[str, str],
    capture: CaptureConfig | None,
    what: str,
    sources: Mapping[str, str | None] | None = None,
) -> None:
    """Raise :class:`~lensattr.store.cache.CacheError` naming the field where statistics captured
    with ``model`` and ``capture`` settings (``what``: "the query", "the pairs") do not fit
    ``cache`` (the settings through :func:`~lensattr.config.check_capture`), or where a
    statistic of ``sources`` (``{statistic: module of its function}``) was computed by another
    function than the cache's (an overridden built-in, a plugin). ``None``: not recorded."""
    cache.check({"model": model})

    def error(text: str) -> CacheError:
        return CacheError(f"{cache.path}: {text}; capture them again with the cache's settings")

    check_capture(capture, cache.capture_config, what=what, other="the cache", error=error)
    recorded = cache.manifest.get("stat_modules") or {}
    for stat, module in (sources or {}).items():
        if module and recorded.get(stat) and recorded[stat] != module:
            raise CacheError(
                f"{cache.path}: its {stat!r} rows were computed by {recorded[stat]}, the "
                f"statistic of {what} by {module} (a replaced built-in or a plugin): compute "
                "both with the same function"
            )


def check_vectors(vectors: dict[int, torch.Tensor], what: str) -> None:
    """Refuse empty, non-finite, zero or non-unit query vectors (one line naming the layer)."""
    if not vectors:
        raise QueryError(f"{what} has no layers")
    for layer, v in vectors.items():
        if v.ndim != 1 or not v.is_floating_point():
            raise QueryError(f"{what}: layer {layer} is not a float vector ({tuple(v.shape)})")
        if not bool(torch.isfinite(v).all()):
            raise QueryError(f"{what}: layer {layer} has non-finite entries")
        norm = float(v.double().norm())
        if abs(norm - 1.0) > 1e-3:
            raise QueryError(f"{what}: layer {layer} has norm {norm:.4g}, not 1")


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||`` (fp64 norm); a zero or non-finite vector raises :class:`QueryError`."""
    n = v.double().norm()
    if not torch.isfinite(n) or n == 0:
        raise QueryError("the behaviour query is zero or non-finite: treatment and control agree")
    return (v.double() / n).float()


def fit(rule: QueryRule, t: torch.Tensor, c: torch.Tensor, pool: Moments | None) -> torch.Tensor:
    """The unnormalised query ``mean_j rule.fn(t, c, pool)_j`` (fp32); the function's output is
    checked to be one contribution per pair (:meth:`~lensattr.registry.QueryRule.apply`)."""
    return rule.apply(t, c, pool).double().mean(0).float()


def interleaved_folds(n: int, folds: int = FOLDS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out folds of ``n`` pairs, the one split lensattr uses everywhere: fold ``k``
    holds out pairs ``k, k + folds, ...`` (at most ``n`` folds). Each is ``(test, train)``: the
    held-out indices and a mask of the other pairs.

    Examples:
        >>> [(te.tolist(), tr.tolist()) for te, tr in interleaved_folds(3, 2)]
        [([0, 2], [False, True, False]), ([1], [True, False, True])]
    """
    positive_int("folds", folds, least=2)
    folds = min(folds, n)
    out = []
    for k in range(folds):
        test = torch.arange(k, n, folds)
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        out.append((test, train))
    return out


def heldout_accuracy(
    t: torch.Tensor,
    c: torch.Tensor,
    rule: QueryRule,
    score: Score,
    ctx: ScoreContext | None = None,
    folds: int = FOLDS,
) -> float:
    """The held-out accuracy of a method on its own query pairs (the one definition lensattr
    uses everywhere): for each of ``folds`` interleaved folds, fit the query ``q`` by ``rule`` on
    the other folds and count the held-out pairs whose treatment scores above its control,
    ``score(s(x'_j), q) > score(s(x_j), q)``. NaN with fewer than 2 pairs.

    Examples:
        >>> from lensattr.registry import get_query, get_score
        >>> t = torch.tensor([[1.0, 0.1], [2.0, 0.0], [1.5, -0.1], [0.5, 0.0]])
        >>> heldout_accuracy(t, torch.zeros(4, 2) + 0.1, get_query("contrast"), get_score("dot"))
        1.0
    """
    n = len(t)
    if n < 2:
        return float("nan")
    hits = 0
    for test, train in interleaved_folds(n, folds):
        p = fit(rule, t[train], c[train], ctx.moments() if rule.uses_pool and ctx else None)
        st, sc = (score.apply(x[test], x[test].norm(dim=1), p, ctx) for x in (t, c))
        hits += int((st > sc).sum())
    return hits / n


def behavior_query(
    model: Any,
    pairs: Any,
    *,
    query: str = "residual_change",
    stat: str | None = None,
    layers: Any = "all",
    pool: Any = None,
    score: str = "cosine",
    batch_size: int = 8,
    max_length: int | None = 512,
    padding_side: str = "right",
    progress: bool | None = None,
    config: CaptureConfig | None = None,
    **options: Any,
) -> Query:
    """Build the query ``q = norm(mean_j f(x'_j, x_j))`` at each layer from contrastive pairs.

    ``query="residual_change"`` is the paper's query as its authors ran it
    (``f = norm(t(x') - t(x))``, ``t`` their residual change), ``"residual_diff"``
    the residual difference (pooled ``z_out``), ``"contrast", stat=NAME`` the contrast of any
    registered statistic, ``"pool_contrast"`` contrasts the treatment replies with the mean of the
    training pool (``pool=cache``), and ``"persona"`` takes a trait spec (path or dict) instead of
    pairs and generates the replies first (see :func:`lensattr.persona.persona_pairs`).

    Args:
        model: a :class:`~lensattr.backends.models.Model` or anything
            :func:`~lensattr.load_model` takes.
        pairs: pair records (path, dataset, list), a :class:`PairStats`, or for ``persona`` a
            trait spec.
        query: the registered query rule (``f`` above).
        stat: the statistic (default: the rule's own, e.g. ``residual_change``).
        layers: ``"all"``, an int, a list or ``"a:b"``.
        pool: the cache to be ranked (or its path): required by a pool-aware rule, and gives the
            pool's moments to the held-out accuracy of pool-aware scores.
        score: the registered score the query is ranked with by default (and its held-out
            accuracy measured in).
        batch_size, max_length, padding_side: as in :func:`~lensattr.build_cache`.
        progress: as in :func:`~lensattr.build_cache` (``False``: silent).
        config: the capture settings as one :class:`~lensattr.config.CaptureConfig`, instead
            of ``layers``, ``max_length`` and ``padding_side``, as in :func:`pair_stats`.
        **options: passed to the rule's pair builder (e.g. ``max_new_tokens`` for persona).

    Examples:
        >>> pairs = [{"prompt": "Is 2+2=5?", "treatment": "Yes!", "control": "No, 4."}]
        >>> q = behavior_query("tiny-random", pairs, layers=[1, 3])
        >>> q.layers, round(float(q.vector(3).norm()), 4)
        ([1, 3], 1.0)
    """
    cfg = resolve_config(
        config, "behavior_query", layers=layers, max_length=max_length, padding_side=padding_side
    )
    spec = get_query(query)
    stat_name = stat or spec.stat
    if spec.stats is not None and stat_name not in spec.stats:
        raise QueryError(
            f"query {query!r} is defined for statistics {list(spec.stats)}, not {stat_name!r}; "
            f"use query='contrast' (or 'pool_contrast') with stat={stat_name!r}"
        )
    scorer = get_score(score)
    cache = None if pool is None else pool if isinstance(pool, Cache) else open_cache(pool)
    if spec.uses_pool and cache is None:
        raise QueryError(f"query {query!r} contrasts with the training pool: pass pool=cache")
    if isinstance(pairs, PairStats):
        if options:
            raise TypeError(f"options {sorted(options)} need pairs, not PairStats")
        ps = pairs
        n_layers = max(ps.layers) + 1
        layer_list = (
            ps.layers if cfg.layers == "all" else sorted(parse_layers(cfg.layers, n_layers))
        )
    else:
        model = load_model(model)
        if spec.pairs_from is not None:
            pairs = spec.pairs_from(model, pairs, **options)
        elif options:
            raise TypeError(f"query {query!r} takes no options {sorted(options)}")
        layer_list = sorted(parse_layers(cfg.layers, model.n_layers))
        ps = pair_stats(
            model,
            pairs,
            stats=[stat_name],
            batch_size=batch_size,
            progress=progress,
            config=dataclasses.replace(cfg, layers=layer_list),
        )
    if cache is not None:
        check_fits(cache, ps.model, ps.capture, "the pairs", ps.sources)
    vectors, cv = {}, {}
    for layer in layer_list:
        t, c = ps.sides(stat_name, layer)
        ctx = None if cache is None else ScoreContext(cache, stat_name, layer)
        moments = pool_moments(cache, stat_name, layer) if spec.uses_pool and cache else None
        vectors[layer] = unit(fit(spec, t, c, moments))
        cv[layer] = heldout_accuracy(t, c, spec, scorer, ctx)
    return Query(
        vectors=vectors,
        rule=query,
        stat=stat_name,
        model=ps.model,
        n_pairs=ps.n_pairs,
        cv=cv,
        score=score,
        pool=content_digest(cache) if spec.uses_pool and cache is not None else None,
        capture=ps.capture,
        stat_module=(ps.sources or {}).get(stat_name),
    )


def as_query(query: Any) -> Query:
    """A :class:`Query`, or one loaded from a ``.safetensors`` path."""
    if isinstance(query, Query):
        return query
    if hasattr(query, "query") and isinstance(query.query, Query):  # a Selection
        return query.query
    return Query.load(query)


__all__ = [
    "FOLDS",
    "PairStats",
    "Query",
    "QueryError",
    "as_query",
    "behavior_query",
    "fit",
    "heldout_accuracy",
    "interleaved_folds",
    "pair_stats",
    "unit",
]
