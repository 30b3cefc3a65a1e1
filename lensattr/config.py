"""The capture settings, one frozen dataclass recorded end to end.

A :class:`CaptureConfig` says how the activations behind a statistic were captured: at which
layers, truncated to what length, padded on which side, pooled how, and stored in which dtype.
:func:`~lensattr.build_cache` builds one from its keywords and writes its fields into the
manifest; :func:`~lensattr.pair_stats` records one for the query pairs, and a saved
:class:`~lensattr.query.Query` carries it. :func:`check_capture` is the one comparison:
``rank`` (query against cache) and ``explain`` (query against its own capture) call it, and a
mismatch names the field and both values. The command line's flags, help and defaults for these
settings are generated from the fields (:func:`add_arguments`), so they cannot drift apart.
Every step that captures takes one as ``config=`` (:func:`~lensattr.build_cache`,
:func:`~lensattr.pair_stats`, :func:`~lensattr.behavior_query`,
:func:`~lensattr.select_then_cache`), with the same rule (:func:`resolve_config`).
"""

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lensattr.store.names import STORAGE_DTYPES, dtype_name

POOLINGS = ("mean_response",)
"""The built-in statistics' pooling: the mean over the reply's token positions. A statistic
registered with another ``pooling=`` name brings its own (``register_stat``)."""
PADDING_SIDES = ("right", "left")


def _max_length(text: str) -> int | None:
    """The CLI's ``--max-length``: an integer, or ``none`` (no truncation)."""
    return None if text.strip().lower() == "none" else int(text)


@dataclass(frozen=True)
class CaptureConfig:
    """How the activations behind a statistic are captured.

    ``storage_dtype`` takes any spelling :func:`~lensattr.store.names.dtype_name` takes (or a
    ``torch.dtype``) and holds its name; a list of ``layers`` is held as a tuple.

    Field metadata drives the rest: ``help`` is the CLI help, ``match`` marks the settings that
    change the numbers (a query's pairs and the cache must agree on them), ``cli`` whether the
    CLI has a flag for it. A manifest and a saved query record the fields under their own names.

    Examples:
        >>> CaptureConfig(max_length=256, storage_dtype="bf16").storage_dtype
        'bfloat16'
        >>> record = CaptureConfig(layers=[1, 3]).to_manifest()
        >>> list(record)
        ['layers', 'max_length', 'padding_side', 'pooling', 'storage_dtype']
        >>> CaptureConfig.from_manifest(record, what="the manifest").layers
        (1, 3)
    """

    layers: Any = field(
        default="all",
        metadata={"help": '"all", "12", "0,5,10", "20:30" or TransformerLens hook names'},
    )
    max_length: int | None = field(
        default=512,
        metadata={
            "help": "truncate longer examples (prompt from the left, then reply from the right); "
            "none: no truncation",
            "type": _max_length,
            "match": True,
        },
    )
    padding_side: str = field(
        default="right",
        metadata={"help": "pad batches on this side", "choices": PADDING_SIDES, "match": True},
    )
    pooling: str = field(
        default=POOLINGS[0],
        metadata={
            "help": "how token positions become one vector: the statistics' own (no flag)",
            "match": True,
            "cli": False,
        },
    )
    storage_dtype: str | torch.dtype = field(
        default="bfloat16",
        metadata={
            "help": "how cached rows are stored: bf16/bfloat16, fp16/float16 (underflows on "
            "small gradients) or fp32/float32",
            "metavar": "DTYPE",
            "choices": tuple(STORAGE_DTYPES),
        },
    )

    def __post_init__(self) -> None:
        ml = self.max_length
        if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 1):
            raise ValueError(f"max_length must be a positive integer, not {ml!r}")
        choices = _field("padding_side").metadata["choices"]
        if self.padding_side not in choices:
            raise ValueError(
                f"padding_side must be {' or '.join(map(repr, choices))}, not {self.padding_side!r}"
            )
        if not isinstance(self.pooling, str) or not self.pooling:
            raise ValueError(f"pooling must be a non-empty name, not {self.pooling!r}")
        object.__setattr__(self, "storage_dtype", dtype_name(self.storage_dtype))
        if isinstance(self.layers, list):  # hashable, like the rest of a frozen record
            object.__setattr__(self, "layers", tuple(self.layers))

    def pooled_by(self, pooling: str) -> "CaptureConfig":
        """These settings with the statistics' own ``pooling``
        (:func:`~lensattr.registry.pooling_of`): a config that leaves ``pooling`` at its default
        takes theirs, one naming another is refused with ``ValueError``.

        Examples:
            >>> CaptureConfig().pooled_by("mean_response").pooling
            'mean_response'
            >>> CaptureConfig(pooling="last").pooled_by("mean_response")
            Traceback (most recent call last):
            ...
            ValueError: config pooling 'last', but the statistics pool by 'mean_response'
        """
        if self.pooling not in (pooling, CaptureConfig().pooling):
            raise ValueError(
                f"config pooling {self.pooling!r}, but the statistics pool by {pooling!r}"
            )
        return dataclasses.replace(self, pooling=pooling)

    def to_manifest(self) -> dict[str, Any]:
        """The fields as manifest entries, under their own names (``layers`` as a list)."""
        return {
            f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_manifest(cls, record: Mapping[str, Any], *, what: str) -> "CaptureConfig":
        """The capture settings a manifest (or a saved query's record) holds.

        ``record`` must have every field under its own name (as :meth:`to_manifest` writes
        them); other keys are ignored.

        Raises:
            ValueError: ``what`` (the record, e.g. ``"the manifest"``) lacks a field (naming
                every missing one), or a field's value is refused.

        Examples:
            >>> CaptureConfig.from_manifest({"layers": [0]}, what="the manifest")
            Traceback (most recent call last):
            ...
            ValueError: the manifest lacks 'max_length', 'padding_side', 'pooling', 'storage_dtype'
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in record]
        if missing:
            raise ValueError(f"{what} lacks {', '.join(map(repr, missing))}")
        return cls(**{name: record[name] for name in names})


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(CaptureConfig) if f.name == name)


MATCHED = tuple(f.name for f in dataclasses.fields(CaptureConfig) if f.metadata.get("match"))
"""The settings that change a statistic's numbers: a query's pairs and the cache must agree."""


def check_capture(
    recorded: "CaptureConfig | None",
    used: CaptureConfig,
    *,
    what: str,
    other: str,
    error: Callable[[str], Exception] = ValueError,
    fields: Iterable[str] = MATCHED,
) -> None:
    """Raise ``error`` naming the first of ``fields`` where statistics captured with
    ``recorded`` (``what``, e.g. "the query's pairs") and with ``used`` (``other``, e.g. "the
    cache") differ. ``recorded=None`` (a query that records no capture settings) passes.

    Examples:
        >>> check_capture(CaptureConfig(max_length=256), CaptureConfig(), what="the pairs",
        ...               other="the cache")
        Traceback (most recent call last):
        ...
        ValueError: the pairs were captured with max_length=256, the cache with max_length=512
    """
    if recorded is None:
        return
    for name in fields:
        want, have = getattr(recorded, name), getattr(used, name)
        if want != have:
            raise error(f"{what} were captured with {name}={want!r}, {other} with {name}={have!r}")


def resolve_config(config: "CaptureConfig | None", caller: str, **keywords: Any) -> CaptureConfig:
    """A step's capture settings: ``config``, or the settings its ``keywords`` give (``layers``,
    ``max_length``, ...; the fields they leave out at their defaults), not both.

    With ``config``, each keyword must be at its default: the settings are given once, and a
    keyword next to ``config=`` raises ``ValueError`` naming it and ``caller`` (the step).

    Raises:
        TypeError: ``config`` is not a :class:`CaptureConfig`.
        ValueError: ``config`` and a keyword off its default.

    Examples:
        >>> resolve_config(None, "pair_stats", max_length=256).max_length
        256
        >>> resolve_config(CaptureConfig(max_length=256), "pair_stats", max_length=512).max_length
        256
        >>> resolve_config(CaptureConfig(), "pair_stats", max_length=256)
        Traceback (most recent call last):
        ...
        ValueError: pair_stats got config= and max_length=: give the capture settings once
    """
    given = CaptureConfig(**keywords)
    if config is None:
        return given
    if not isinstance(config, CaptureConfig):
        raise TypeError(f"config must be a CaptureConfig, not {type(config).__name__}")
    default = CaptureConfig()
    changed = [
        f.name
        for f in dataclasses.fields(given)
        if f.name in keywords and getattr(given, f.name) != getattr(default, f.name)
    ]
    if changed:
        raise ValueError(
            f"{caller} got config= and {', '.join(changed)}=: give the capture settings once"
        )
    return config


def names_list(text: str) -> list[str]:
    """A comma-separated command-line list (``"a,b"`` -> ``["a", "b"]``; empty items dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def ints_list(text: str) -> list[int]:
    """A comma-separated list of integers (``"0,1,2"``)."""
    return [int(x) for x in names_list(text)]


def _default(f: "dataclasses.Field[Any]") -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    *,
    config: type = CaptureConfig,
) -> None:
    """Add a flag for each CLI field of the dataclass ``config`` (default :class:`CaptureConfig`;
    or only ``names``): its name with dashes, its help, type, choices and default from the field
    (its ``metadata``), so the CLI cannot drift from the configuration. A ``bool`` field becomes
    ``--name`` / ``--no-name``; a list field takes a comma-separated value."""
    wanted = None if names is None else set(names)
    for f in dataclasses.fields(config):
        if not f.metadata.get("cli", True) or (wanted is not None and f.name not in wanted):
            continue
        default = _default(f)
        extra: dict[str, Any] = (
            {"choices": list(f.metadata["choices"])} if "choices" in f.metadata else {}
        )
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=f.name, default=default, action=action, help=help_text)
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            default=default,
            type=f.metadata.get("type", str),
            metavar=f.metadata.get("metavar"),
            help=help_text,
            **extra,
        )


def from_arguments(
    args: argparse.Namespace, *, config: type = CaptureConfig, **overrides: Any
) -> Any:
    """The ``config`` dataclass (default :class:`CaptureConfig`) of parsed arguments (fields
    without a flag: their default), with ``overrides``."""
    kw: dict[str, Any] = {
        f.name: getattr(args, f.name, _default(f)) for f in dataclasses.fields(config)
    }
    return config(**(kw | overrides))


__all__ = [
    "MATCHED",
    "PADDING_SIDES",
    "POOLINGS",
    "CaptureConfig",
    "add_arguments",
    "check_capture",
    "from_arguments",
    "ints_list",
    "names_list",
    "resolve_config",
]
