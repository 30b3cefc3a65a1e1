"""Build and open the per-example statistic cache.

Layout of a cache directory::

    build.json                 what is being built (model fingerprint, layers, stats, ...)
    shard-00000.safetensors    rows of chunk 0: "{stat}/{layer}" [rows, d_model] + ".../norm"
    shard-00000.json           that chunk's ids, skipped examples, fingerprint and checksums
    ...
    records.jsonl.gz           the cached examples themselves (what ``rank`` prints)
    manifest.json              written last, atomically, with its own checksum: complete
    .lock                      held by a writer (``flock``) while it builds

The training set is cut into fixed chunks of ``shard_size`` examples in file order; each chunk is
tokenised, batched by length, captured, and written as one shard (temporary file + rename), then
its sidecar. A killed build rerun with the same command skips the chunks whose sidecar matches
their shard, their examples and the build's settings, so it ends bitwise identical to an
uninterrupted build; a finished build is a no-op (after a verification).

Integrity: the manifest holds the SHA-256 of its own canonical JSON, and every shard's size and
the SHA-256 of its header, of each tensor and of the whole file; each shard's header repeats its
row ids. :func:`open_cache` checks the manifest, the sizes, the headers and the shapes (before any
allocation) and, once per open, the hash of each tensor the first time it is read.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lensattr import heap
from lensattr._version import __version__
from lensattr.backends.capture import capture
from lensattr.backends.models import Model, load_model
from lensattr.backends.prefix import openings_kept
from lensattr.config import POOLINGS, CaptureConfig
from lensattr.data import DataError, Example, load_examples, source_fingerprint
from lensattr.progress import Progress
from lensattr.registry import get_phi, pooling_of
from lensattr.render import Encoded, TruncationError, collate, encode, length_batches
from lensattr.store.names import (
    STORAGE_DTYPES,
    dtype_name,
    layer_index,
    parse_dtype,
    resolve_layers,
)
from lensattr.store.reader import (
    INFORMATIVE,
    SCHEMA_VERSION,
    Cache,
    CacheError,
    canonical_sha256,
    diff_fields,
    manifest_sha256,
    name_ids,
    open_cache,
    write_manifest,
)
from lensattr.store.records import RECORDS_FILE, write_records
from lensattr.store.shards import (
    atomic_write_json,
    describe_shard,
    remove_temporary_files,
    sha256_file,
    tensor_key,
    write_shard,
)

__all__ = [
    "DEFAULT_STATS",
    "POOLING",
    "SCHEMA_VERSION",
    "STORAGE_DTYPES",
    "Cache",
    "CacheError",
    "build_cache",
    "dtype_name",
    "encode_all",
    "layer_index",
    "manifest_sha256",
    "open_cache",
    "parse_dtype",
    "resolve_layers",
    "write_lock",
    "write_manifest",
]
logger = logging.getLogger(__name__)
DEFAULT_STATS = ("residual_change", "residual_change_reply", "resid_post", "grad")
POOLING = POOLINGS[0]
# Fields of build.json that must match for a resume or an `expect=` check.
IDENTITY = (
    "schema_version",
    "model",
    "layers",
    "stats",
    "pooling",
    "max_length",
    "dtype",
    "train",
    "shard_size",
    "batch_size",
    "padding_side",
)


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


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in IDENTITY}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def _check_arguments(
    stats: Any,
    batch_size: Any,
    shard_size: Any,
    on_error: Any,
) -> list[str]:
    """Validate build_cache's sizes and choices before any work; return the statistic names."""
    _positive_int("batch_size", batch_size)
    _positive_int("shard_size", shard_size)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    names = [s.strip() for s in stats.split(",")] if isinstance(stats, str) else list(stats)
    if not names or not all(isinstance(s, str) and s for s in names):
        raise ValueError(f"stats must name at least one statistic, not {stats!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"stats {names} name a statistic twice")
    return names


@contextlib.contextmanager
def write_lock(out: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold ``out/.lock`` (``flock``) while building; a second writer gets a :class:`CacheError`.

    The ranks of one multi-process build share the lock (``shared=True``); a single-process build
    holds it alone. Without ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"{out}: another lensattr build is writing to this directory; wait for it to "
                "finish, or build into another directory"
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: this file system has no file locks; building unlocked", out)
        yield
    finally:
        os.close(fd)  # releases the lock


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

    cfg = _capture_config(config, layers, max_length, padding_side, storage_dtype)
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
    cfg = dataclasses.replace(cfg, layers=resolve_layers(cfg.layers, model.n_layers))
    layer_list, max_length, padding_side = list(cfg.layers), cfg.max_length, cfg.padding_side
    phis = [get_phi(s) for s in stats]
    pooling = pooling_of(phis)  # the statistics' own; a config naming another is refused
    if cfg.pooling not in (pooling, CaptureConfig().pooling):
        raise ValueError(f"config pooling {cfg.pooling!r}, but the statistics pool by {pooling!r}")
    cfg = dataclasses.replace(cfg, pooling=pooling)
    plan = _plan(model, train, cfg, stats, shard_size, batch_size, examples)
    known = _reusable(reuse, plan, examples) if reuse is not None else {}
    if (out / "manifest.json").exists():
        return _reopen(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    with write_lock(out, shared=world_size > 1):
        if (out / "manifest.json").exists():  # finished by a writer that just let go
            return _reopen(out, plan)
        build_file = out / "build.json"
        if build_file.exists():
            problems = diff_fields(json.loads(build_file.read_text()), plan)
            if problems:
                raise CacheError(
                    f"{out} holds a different, unfinished build: " + "; ".join(problems)
                )
        elif rank == 0:
            atomic_write_json(build_file, plan)
        store_dtype = getattr(torch, dtype_name(cfg.storage_dtype))
        chunks = [examples[i : i + shard_size] for i in range(0, len(examples), shard_size)]
        mine = [i for i in range(len(chunks)) if i % world_size == rank]
        plan_sha = _plan_sha256(plan)
        needs_grad = any(p.needs_grad for p in phis)
        sites = sorted({s for p in phis for s in p.sites})
        reused = manifest_sha256(reuse.manifest) if reuse is not None else None
        sides = {
            i: {"chunk_sha256": _chunk_sha256(chunks[i]), "plan_sha256": plan_sha}
            | ({"reused": reused} if reused else {})
            for i in mine
        }
        todo = [i for i in mine if not _chunk_done(out, i, sides[i])]
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
                    phis,
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
        return _finish(out, plan, chunks, skipped)


def _reusable(reuse: Cache, plan: dict[str, Any], examples: Sequence[Example]) -> dict[str, int]:
    """``{example id: row of reuse}`` for the examples ``reuse`` holds with the same messages,
    after checking that its rows are what this build would compute."""
    keys = ("model", "pooling", "max_length", "dtype", "padding_side")  # what the rows depend on
    problems = diff_fields({k: reuse.manifest.get(k) for k in keys}, {k: plan[k] for k in keys})
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


def _reopen(out: Path, plan: dict[str, Any]) -> "Cache":
    """A finished cache at ``out``: verified like any open, then compared with ``plan``."""
    cache = open_cache(out)
    problems = diff_fields(_identity(cache.manifest), _identity(plan))
    if problems:
        raise CacheError(f"{out} holds a different cache: " + "; ".join(problems))
    logger.info("%s is complete; nothing to do", out)
    return cache


def _capture_config(
    config: CaptureConfig | None,
    layers: Any,
    max_length: Any,
    padding_side: Any,
    storage_dtype: Any,
) -> CaptureConfig:
    """build_cache's capture settings: ``config``, or one made of its keywords (not both)."""
    given = CaptureConfig(
        layers=layers,
        max_length=max_length,
        padding_side=padding_side,
        storage_dtype=storage_dtype,
    )
    if config is None:
        return given
    if not isinstance(config, CaptureConfig):
        raise TypeError(f"config must be a CaptureConfig, not {type(config).__name__}")
    changed = [
        f.name
        for f in dataclasses.fields(given)
        if getattr(given, f.name) != getattr(CaptureConfig(), f.name)
    ]
    if changed:
        raise ValueError(
            f"build_cache got config= and {', '.join(changed)}=: give the capture settings once"
        )
    return config


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
        **config.to_manifest(),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "d_model": model.d_model,
    }
    plan["train"] = {**source_fingerprint(train, examples), "n_examples": len(examples)}
    return plan


def _plan_sha256(plan: dict[str, Any]) -> str:
    """What a shard's numbers depend on besides its examples (not the training file's hash)."""
    ident = {k: v for k, v in _identity(plan).items() if k != "train"}
    ident["model"] = {k: v for k, v in plan["model"].items() if k not in INFORMATIVE}
    return canonical_sha256(ident)


def _chunk_sha256(chunk: Sequence[Example]) -> str:
    """Fingerprint of a chunk's examples: ids and messages, in order."""
    return canonical_sha256([[ex.id, [dict(m) for m in ex.messages]] for ex in chunk])


def _chunk_done(out: Path, index: int, want: dict[str, str]) -> bool:
    """Whether chunk ``index`` is on disk for these examples and settings, and intact."""
    side = out / f"shard-{index:05d}.json"
    shard = out / f"shard-{index:05d}.safetensors"
    if not (side.exists() and shard.exists()):
        return False
    try:
        info = json.loads(side.read_text())
        if any(info.get(k) != v for k, v in want.items()):
            logger.info("%s is from other examples or settings: rebuilding it", side)
            return False
        return bool(info["sha256"] == sha256_file(shard))
    except (ValueError, KeyError, TypeError, AttributeError):  # an unreadable sidecar: redo
        return False


def _build_chunk(
    model: Model,
    out: Path,
    index: int,
    chunk: Sequence[Encoded],
    layers: list[int],
    phis: list[Any],
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
        (p.name, layer): torch.zeros((n, d), dtype=store_dtype) for p in phis for layer in layers
    }
    bad: dict[int, str] = {}
    dname = str(store_dtype).removeprefix("torch.")
    keep_prompt = any(p.reads_prompt for p in phis)
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
                for p in phis:
                    vec = p.fn(acts[layer]).float().cpu().to(store_dtype)  # checked as stored
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
    keep = torch.tensor([i for i in range(n) if i not in bad], dtype=torch.long)
    ids = [chunk[i].id for i in keep.tolist()]
    tensors: dict[str, torch.Tensor] = {}
    for (stat, layer), mat in rows.items():
        mat = mat[keep]
        tensors[tensor_key(stat, layer)] = mat
        tensors[tensor_key(stat, layer) + "/norm"] = mat.float().norm(dim=1)
    shard = out / f"shard-{index:05d}.safetensors"
    digest = write_shard(shard, tensors, metadata={"ids": json.dumps(ids)})
    skipped = list(side.get("skipped", []))
    skipped += [{"id": chunk[i].id, "reason": r} for i, r in sorted(bad.items())]
    atomic_write_json(
        out / f"shard-{index:05d}.json",
        {
            **side,
            "index": index,
            "ids": ids,
            "skipped": skipped,
            "sha256": digest,
            **describe_shard(shard),
        },
    )


def _finish(
    out: Path,
    plan: dict[str, Any],
    chunks: Sequence[Sequence[Example]],
    skipped: list[dict[str, str]],
) -> "Cache":
    shards: list[dict[str, Any]] = []
    ids: list[str] = []
    plan_sha = _plan_sha256(plan)
    for i, chunk in enumerate(chunks):
        side = out / f"shard-{i:05d}.json"
        if not side.exists():
            raise CacheError(
                f"{side} is missing: shard {i} was never finished (in a "
                "multi-process build, rerun the same build once every rank is done)"
            )
        info = json.loads(side.read_text())
        if info.get("chunk_sha256") != _chunk_sha256(chunk) or info.get("plan_sha256") != plan_sha:
            raise CacheError(
                f"{side} belongs to other examples or settings: rerun the same build once "
                "every rank is done"
            )
        shards.append(
            {
                "file": f"shard-{i:05d}.safetensors",
                "first_row": len(ids),
                "n_rows": len(info["ids"]),
                "sha256": info["sha256"],
                "size": info["size"],
                "header_sha256": info["header_sha256"],
                "tensors": info["tensors"],
            }
        )
        ids += info["ids"]
        skipped += info["skipped"]
    table = {ex.id: ex for chunk in chunks for ex in chunk}
    records = write_records(out / RECORDS_FILE, (table[i] for i in ids))
    manifest = {
        **plan,
        "n_rows": len(ids),
        "ids": ids,
        "shards": shards,
        "skipped": skipped,
        "records": records,
    }
    write_manifest(out, manifest)
    remove_temporary_files(out)  # left by killed writers; every writer of this build is done
    return open_cache(out)
