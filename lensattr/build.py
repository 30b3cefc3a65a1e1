"""The build loop: capture -> statistics -> store, one shard of the training set at a time.

:func:`build_cache` streams the training set once: each chunk of ``shard_size`` examples is
tokenised, batched by length, captured by the model's backend (:mod:`lensattr.backends`), turned
into the registered statistics (:mod:`lensattr.registry`), and written as one shard by the store
(:func:`lensattr.store.cache.write_chunk`); the store then writes the records and the manifest
(:func:`lensattr.store.cache.finish`). This module sits above both: the store imports no
backend, and a backend knows nothing of the cache layout.
"""

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lensattr import heap
from lensattr._version import __version__
from lensattr.backends.capture import capture
from lensattr.backends.models import Model, load_model
from lensattr.backends.prefix import openings_kept
from lensattr.checks import positive_int
from lensattr.config import CaptureConfig, resolve_config
from lensattr.data import DataError, Example, load_examples, source_fingerprint
from lensattr.layers import parse_layers
from lensattr.progress import Progress
from lensattr.registry import get_stat, pooling_of
from lensattr.render import Encoded, TruncationError, collate, encode, length_batches
from lensattr.store.cache import (
    ELSEWHERE,
    chunk_done,
    chunk_sha256,
    finish,
    plan_sha256,
    reopen,
    write_chunk,
    write_lock,
)
from lensattr.store.files import CacheFiles
from lensattr.store.names import dtype_name
from lensattr.store.reader import (
    SCHEMA_VERSION,
    Cache,
    CacheError,
    diff_fields,
    manifest_sha256,
    name_ids,
)
from lensattr.store.shards import atomic_write_json, plain_name

__all__ = ["DEFAULT_STATS", "build_cache", "encode_all"]
logger = logging.getLogger(__name__)
DEFAULT_STATS = ("residual_change", "residual_change_reply", "resid_post", "grad")
"""The statistics a cache holds unless told otherwise."""


def encode_all(
    model: Model,
    examples: Sequence[Example],
    max_length: int | None,
    on_error: str,
    skipped: list[dict[str, str]],
) -> list[Encoded]:
    """Encode every example; a reply cut away by ``max_length`` raises or is listed as skipped."""
    out = []
    for ex in examples:
        try:
            out.append(encode(model.tokenizer, ex, max_length))
        except TruncationError as err:
            where = ex.extra.get("_where", f"example {ex.id!r}")
            if on_error != "skip":
                raise DataError(str(where), "messages", str(err)) from None
            skipped.append({"where": str(where), "id": ex.id, "reason": str(err)})
    return out


def _check_arguments(
    stats: Any,
    batch_size: Any,
    shard_size: Any,
    on_error: Any,
) -> list[str]:
    """Validate build_cache's sizes and choices before any work; return the statistic names."""
    positive_int("batch_size", batch_size)
    positive_int("shard_size", shard_size)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    names = [s.strip() for s in stats.split(",")] if isinstance(stats, str) else list(stats)
    if not names or not all(isinstance(s, str) and s for s in names):
        raise ValueError(f"stats must name at least one statistic, not {stats!r}")
    for s in names:
        plain_name(s, "statistic")
    if len(set(names)) != len(names):
        raise ValueError(f"stats {names} name a statistic twice")
    return names


def build_cache(
    model: Any,
    train: Any,
    *,
    out: str | Path,
    layers: Any = "all",
    stats: Sequence[str] = DEFAULT_STATS,
    batch_size: int = 8,
    max_length: int | None = 512,
    storage_dtype: str | torch.dtype = "bfloat16",
    shard_size: int = 1024,
    padding_side: str = "right",
    on_error: str = "raise",
    progress: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    config: CaptureConfig | None = None,
    reuse: "Cache | None" = None,
) -> "Cache | None":
    """Stream ``train`` once and cache every statistic at every layer.

    Args:
        model: a :class:`~lensattr.backends.models.Model` or anything
            :func:`~lensattr.load_model` takes.
        train: training examples (path, ``datasets.Dataset``, list of dicts or examples).
        out: cache directory (created).
        layers: ``"all"``, an int (negative counts from the end), a list, ``"a:b"``, or
            TransformerLens hook names (``"blocks.12.hook_resid_post"``).
        stats: registered statistic names.
        batch_size: examples per forward/backward (batched by length). The peak memory of a
            gradient build is its largest batch's graph, 1-1.5 MB per position from the
            prompt prefix on for SmolLM2-135M (30 blocks, fp32): lower it for long replies.
        max_length: truncate longer examples (prompt from the left, then reply from the right).
        storage_dtype: how rows are stored: ``"bf16"`` / ``"bfloat16"`` (default; fp16
            underflows on small gradients), ``"fp16"`` / ``"float16"``, ``"fp32"`` /
            ``"float32"``, or a ``torch.dtype``.
        shard_size: examples per shard (the unit of resumption).
        padding_side: ``"right"`` or ``"left"``.
        on_error: ``"raise"`` or ``"skip"`` (skip and list bad records in the manifest).
        progress: ``None``: a bar on a terminal or in Jupyter, a line with rate and ETA every
            30 s elsewhere (:mod:`lensattr.progress`); ``False``: silent.
        rank, world_size: data-parallel slice of the chunks (see :mod:`lensattr.distributed`);
            default: the running process group's, else ``RANK`` / ``WORLD_SIZE`` (a single
            process when unset). Under ``torchrun`` a process group is started for the barrier.
        config: the capture settings as one :class:`~lensattr.config.CaptureConfig`, instead
            of ``layers``, ``max_length``, ``padding_side`` and ``storage_dtype`` (which then
            stay at their defaults). Either way the cache records them in its manifest.
        reuse: a finished cache of the same model, storage dtype, maximum length, padding side
            and pooling that holds every requested statistic and layer: the rows of the
            examples it holds (same id and messages) are copied from it instead of captured
            (the cheap path's sample, :func:`lensattr.select_then_cache`). Its manifest hash is
            part of each shard's settings, so a resumed build reuses the same cache or redoes
            the shard.

    Returns:
        The opened :class:`Cache` (on rank 0; other ranks return ``None`` after their shards).

    Raises:
        ValueError: a size, count or choice out of range (before any work).
        DataError: a malformed record, or no examples at all.
        CacheError: ``out`` holds another cache or build, a corrupt finished cache, or another
            build is writing to it.

    Examples:
        >>> import tempfile
        >>> exs = [{"id": f"e{i}", "prompt": "Hi", "response": "Yo" * (i + 1)} for i in range(3)]
        >>> cache = build_cache("tiny-random", exs, out=tempfile.mkdtemp(), layers=[1, 2])
        >>> cache.stat("residual_change", 2).shape
        (3, 32)
    """
    from lensattr import distributed

    cfg = resolve_config(
        config,
        "build_cache",
        layers=layers,
        max_length=max_length,
        padding_side=padding_side,
        storage_dtype=storage_dtype,
    )
    stats = _check_arguments(stats, batch_size, shard_size, on_error)
    if rank is None or world_size is None:
        env_rank, env_world = distributed.world()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of world_size {world_size}")
    if world_size > 1:
        distributed.init_process_group()  # under a launcher; fails early, not after the work
    model = load_model(model)
    out = Path(out)
    skipped: list[dict[str, str]] = []
    examples = load_examples(train, on_error=on_error, skipped=skipped)
    if not examples:
        where = str(train) if isinstance(train, (str, Path)) else "train"
        why = f"all {len(skipped)} records are bad ({skipped[0]['reason']})" if skipped else ""
        raise DataError(where, None, why or "no examples (empty, or only blank lines)")
    cfg = dataclasses.replace(cfg, layers=sorted(parse_layers(cfg.layers, model.n_layers)))
    layer_list, max_length, padding_side = list(cfg.layers), cfg.max_length, cfg.padding_side
    specs = [get_stat(s) for s in stats]
    cfg = cfg.pooled_by(pooling_of(specs))
    plan = _plan(model, train, cfg, stats, shard_size, batch_size, examples)
    known = _reusable(reuse, plan, examples) if reuse is not None else {}
    files = CacheFiles(out)
    if files.manifest.exists():
        return reopen(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    with write_lock(out, shared=world_size > 1):
        if files.manifest.exists():  # finished by a writer that just let go
            return reopen(out, plan)
        build_file = files.build
        if build_file.exists():
            problems = diff_fields(_read_build(build_file), plan)
            if problems:
                raise CacheError(
                    f"{out} holds a different, unfinished build: "
                    + "; ".join(problems)
                    + f"; {ELSEWHERE}"
                )
        elif rank == 0:
            atomic_write_json(build_file, plan)
        store_dtype = getattr(torch, dtype_name(cfg.storage_dtype))
        chunks = [examples[i : i + shard_size] for i in range(0, len(examples), shard_size)]
        mine = [i for i in range(len(chunks)) if i % world_size == rank]
        plan_sha = plan_sha256(plan)
        needs_grad = any(p.needs_grad for p in specs)
        sites = sorted({s for p in specs for s in p.sites})
        reused = manifest_sha256(reuse.manifest) if reuse is not None else None
        sides = {
            i: {"chunk_sha256": chunk_sha256(chunks[i]), "plan_sha256": plan_sha}
            | ({"reused": reused} if reused else {})
            for i in mine
        }
        todo = [i for i in mine if not chunk_done(out, i, sides[i])]
        if on_error == "raise":  # a record too long for max_length fails now, not hours in
            for i in todo:
                encode_all(model, chunks[i], max_length, on_error, [])
        total = sum(len(chunks[i]) for i in todo)
        with Progress(total, "caching", "ex", progress) as bar:
            for i in todo:
                side = sides[i]
                bad: list[dict[str, str]] = []  # token ids are held for one chunk at a time
                encoded = encode_all(model, chunks[i], max_length, on_error, bad)
                bar.update(len(chunks[i]) - len(encoded))
                _build_chunk(
                    model,
                    out,
                    i,
                    encoded,
                    layer_list,
                    specs,
                    store_dtype,
                    batch_size,
                    padding_side,
                    needs_grad,
                    sites,
                    on_error,
                    bar,
                    side={**side, "skipped": bad},
                    reuse=(reuse, known) if reuse is not None and known else None,
                )
        if world_size > 1:
            distributed.barrier()  # every rank's shards are written before rank 0 merges
        if rank != 0:
            return None
        return finish(out, plan, chunks, skipped)


def _read_build(build_file: Path) -> dict[str, Any]:
    """An unfinished build's record, or a :class:`CacheError` naming it when it is corrupt."""
    try:
        record = json.loads(build_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        record = err
    if not isinstance(record, dict):
        why = f" ({record})" if isinstance(record, Exception) else ""
        raise CacheError(
            f"{build_file}: corrupt build record{why}; delete it and rerun the same build (the "
            "finished shards that match are kept)"
        )
    return record


def _reusable(reuse: Cache, plan: dict[str, Any], examples: Sequence[Example]) -> dict[str, int]:
    """``{example id: row of reuse}`` for the examples ``reuse`` holds with the same messages,
    after checking that its rows are what this build would compute."""
    # what the rows depend on
    keys = ("model", "pooling", "max_length", "storage_dtype", "padding_side")
    problems = diff_fields({k: reuse.manifest.get(k) for k in keys}, {k: plan[k] for k in keys})
    problems += [
        f"its {stat} was computed by {module}, this build's by {plan['stat_modules'][stat]}"
        for stat, module in (reuse.manifest.get("stat_modules") or {}).items()
        if stat in plan["stats"] and module != plan["stat_modules"][stat]
    ]
    missing = [
        f"{stat} at layer {layer}"
        for stat in plan["stats"]
        for layer in plan["layers"]
        if stat not in reuse.stats or layer not in reuse.layers
    ]
    if missing:
        problems.append(f"it lacks {', '.join(missing)}")
    if problems:
        raise CacheError(f"{reuse.path} cannot be reused for this build: " + "; ".join(problems))
    row_of = {i: r for r, i in enumerate(reuse.ids)}
    held = [ex for ex in examples if ex.id in row_of]
    stored = {r["id"]: r["messages"] for r in reuse.records([ex.id for ex in held])}
    return {ex.id: row_of[ex.id] for ex in held if stored[ex.id] == [dict(m) for m in ex.messages]}


def _plan(
    model: Model,
    train: Any,
    config: CaptureConfig,
    stats: Sequence[str],
    shard_size: int,
    batch_size: int,
    examples: Sequence[Example],
) -> dict[str, Any]:
    """build.json: the model, the capture settings (:meth:`CaptureConfig.to_manifest`, with
    ``layers`` resolved), the statistics and the build's own settings."""
    plan: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "lensattr_version": __version__,
        "model": model.fingerprint(),
        "n_layers": model.n_layers,
        "stats": list(stats),
        # the module of each statistic's function: a query computed by another is refused
        "stat_modules": {s: get_stat(s).module for s in stats},
        **config.to_manifest(),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "d_model": model.d_model,
    }
    plan["train"] = {**source_fingerprint(train, examples), "n_examples": len(examples)}
    return plan


def _build_chunk(
    model: Model,
    out: Path,
    index: int,
    chunk: Sequence[Encoded],
    layers: list[int],
    specs: list[Any],
    store_dtype: torch.dtype,
    batch_size: int,
    padding_side: str,
    needs_grad: bool,
    sites: list[str],
    on_error: str,
    bar: Any,
    side: dict[str, Any],
    reuse: tuple[Cache, dict[str, int]] | None = None,
) -> None:
    n, d = len(chunk), model.d_model
    rows = {
        (p.name, layer): torch.zeros((n, d), dtype=store_dtype) for p in specs for layer in layers
    }
    bad: dict[int, str] = {}
    dname = str(store_dtype).removeprefix("torch.")
    keep_prompt = any(p.reads_prompt for p in specs)
    todo = list(range(n))
    if reuse is not None:  # rows another cache already holds are copied, not captured
        src, known = reuse
        copied = [i for i in todo if chunk[i].id in known]
        if copied:
            at = [known[chunk[i].id] for i in copied]
            for (stat, layer), mat in rows.items():
                mat[copied] = src.stat(stat, layer)[at]
            todo = [i for i in todo if chunk[i].id not in known]
            bar.update(len(copied))
    # A backward from each row's own prompt's end: batches of similar replies.
    by_reply = needs_grad and not keep_prompt and model.cuts_prompt
    batches = length_batches([chunk[i] for i in todo], batch_size, by_reply=by_reply)
    with openings_kept():  # the template's system prompt runs once a shard
        for batch_idx in batches:
            idx = [todo[i] for i in batch_idx]
            batch = collate([chunk[i] for i in idx], model.pad_id, padding_side, str(model.device))
            acts = capture(
                model, batch, layers, grad=needs_grad, sites=sites, keep_prompt=keep_prompt
            )
            for layer in layers:
                for p in specs:
                    vec = p.apply(acts[layer]).float().cpu().to(store_dtype)  # checked as stored
                    finite = torch.isfinite(vec).all(1) & torch.isfinite(vec.float().norm(dim=1))
                    for j in (~finite).nonzero()[:, 0].tolist():
                        bad.setdefault(idx[j], f"non-finite {p.name} at layer {layer} in {dname}")
                    rows[p.name, layer][idx] = vec
            bar.update(len(idx))
    heap.trim()  # once per shard: per batch cost 6% of a build in page faults
    if bad and on_error != "skip":
        ids = [chunk[i].id for i in sorted(bad)]
        first = min(bad)
        also = f"; also {name_ids(ids[1:])}" if len(ids) > 1 else ""
        hint = " or storage_dtype='bfloat16'" if store_dtype == torch.float16 else ""
        raise CacheError(f"example {ids[0]!r}: {bad[first]}{also} (use on_error='skip'{hint})")
    keep = [i for i in range(n) if i not in bad]
    kept = torch.tensor(keep, dtype=torch.long)
    skipped = list(side.get("skipped", []))
    skipped += [{"id": chunk[i].id, "reason": r} for i, r in sorted(bad.items())]
    write_chunk(
        out,
        index,
        [chunk[i].id for i in keep],
        {key: mat[kept] for key, mat in rows.items()},
        {**side, "skipped": skipped},
    )
