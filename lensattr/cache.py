"""Build and open the per-example statistic cache.

Layout of a cache directory::

    build.json                 what is being built (model fingerprint, layers, stats, ...)
    shard-00000.safetensors    rows of chunk 0: "{stat}/{layer}" [rows, d_model] + ".../norm"
    shard-00000.json           that chunk's example ids, skipped examples and SHA-256
    ...
    manifest.json              written last, atomically: the cache is complete

The training set is cut into fixed chunks of ``shard_size`` examples in file order; each chunk is
batched by length, captured, and written as one shard (temporary file + rename), then its
sidecar. A killed build rerun with the same command skips the chunks whose sidecar matches their
shard, so it ends bitwise identical to an uninterrupted build; a finished build is a no-op.
"""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lensattr._version import __version__
from lensattr.capture import capture
from lensattr.data import DataError, Example, load_examples, source_fingerprint
from lensattr.models import Model, load_model
from lensattr.registry import get_phi
from lensattr.render import Encoded, TruncationError, collate, encode, length_batches
from lensattr.store import (
    MappedShard,
    StatView,
    atomic_write_json,
    sha256_file,
    tensor_key,
    write_shard,
)

logger = logging.getLogger(__name__)
SCHEMA_VERSION = 1
DEFAULT_STATS = ("residual_change", "residual_change_exact", "resid_post", "grad")
POOLING = "mean_response"
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


class CacheError(RuntimeError):
    """A cache that is incomplete, corrupt, or built with something other than what is asked."""


def resolve_layers(layers: Any, n_layers: int) -> list[int]:
    """``"all"``, an int, a ``"a:b"`` range string, or a list of ints → sorted block indices."""
    if layers == "all" or layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    elif isinstance(layers, str):
        if ":" in layers:
            a, b = layers.split(":")
            layers = range(int(a or 0), int(b) if b else n_layers)
        else:
            layers = [int(x) for x in layers.split(",")]
    out = sorted({int(x) + n_layers if int(x) < 0 else int(x) for x in layers})
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise ValueError(f"layers {layers!r} out of range for a model with {n_layers} blocks")
    return out


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


_INFORMATIVE = ("name", "path")  # recorded, but a renamed model or moved file is still the same


def _diff(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Human-readable differences between manifest fields ``have`` and ``want``."""
    out = []
    for k, v in want.items():
        h = have.get(k)
        if isinstance(v, dict) and isinstance(h, dict):
            out += [
                f"{k}.{kk}: cache has {h.get(kk)!r}, expected {vv!r}"
                for kk, vv in v.items()
                if kk not in _INFORMATIVE and h.get(kk) != vv
            ]
        elif h != v:
            out.append(f"{k}: cache has {h!r}, expected {v!r}")
    return out


def build_cache(
    model: Any,
    train: Any,
    *,
    out: str | Path,
    layers: Any = "all",
    stats: Sequence[str] = DEFAULT_STATS,
    batch_size: int = 8,
    max_length: int | None = 512,
    dtype: str = "bfloat16",
    shard_size: int = 1024,
    padding_side: str = "right",
    on_error: str = "raise",
    progress: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> "Cache | None":
    """Stream ``train`` once and cache every statistic at every layer.

    Args:
        model: a :class:`~lensattr.models.Model` or anything :func:`~lensattr.load_model` takes.
        train: training examples (path, ``datasets.Dataset``, list of dicts or examples).
        out: cache directory (created).
        layers: ``"all"``, an int, a list, or ``"a:b"``.
        stats: registered phi names.
        batch_size: examples per forward/backward (batched by length).
        max_length: truncate longer examples (prompt from the left, then reply from the right).
        dtype: storage dtype, ``"bfloat16"`` (default; fp16 underflows on small gradients) or
            ``"float32"``.
        shard_size: examples per shard (the unit of resumption).
        padding_side: ``"right"`` or ``"left"``.
        on_error: ``"raise"`` or ``"skip"`` (skip and list bad records in the manifest).
        progress: show a progress bar (default: when stderr is a terminal).
        rank, world_size: data-parallel slice of the chunks (see :mod:`lensattr.distributed`);
            default: the running process group's, else ``RANK`` / ``WORLD_SIZE`` (a single
            process when unset). Under ``torchrun`` a process group is started for the barrier.

    Returns:
        The opened :class:`Cache` (on rank 0; other ranks return ``None`` after their shards).

    Examples:
        >>> import tempfile
        >>> exs = [{"id": f"e{i}", "prompt": "Hi", "response": "Yo" * (i + 1)} for i in range(3)]
        >>> cache = build_cache("tiny-random", exs, out=tempfile.mkdtemp(), layers=[1, 2])
        >>> cache.stat("residual_change", 2).shape
        (3, 32)
    """
    from lensattr import distributed

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
    layer_list = resolve_layers(layers, model.n_layers)
    phis = [get_phi(s) for s in stats]
    plan = _plan(
        model,
        train,
        layer_list,
        stats,
        max_length,
        dtype,
        shard_size,
        batch_size,
        padding_side,
        examples,
    )
    if (out / "manifest.json").exists():
        cache = open_cache(out, verify=False)
        problems = _diff(_identity(cache.manifest), _identity(plan))
        if problems:
            raise CacheError(f"{out} holds a different cache: " + "; ".join(problems))
        logger.info("%s is complete; nothing to do", out)
        return cache
    encoded = encode_all(model, examples, max_length, on_error, skipped)
    out.mkdir(parents=True, exist_ok=True)
    build_file = out / "build.json"
    if build_file.exists():
        problems = _diff(json.loads(build_file.read_text()), plan)
        if problems:
            raise CacheError(f"{out} holds a different, unfinished build: " + "; ".join(problems))
    elif rank == 0:
        atomic_write_json(build_file, plan)
    store_dtype = getattr(torch, dtype)
    chunks = [encoded[i : i + shard_size] for i in range(0, len(encoded), shard_size)]
    mine = [i for i in range(len(chunks)) if i % world_size == rank]
    todo = [i for i in mine if not _chunk_done(out, i)]
    needs_grad = any(p.needs_grad for p in phis)
    sites = sorted({s for p in phis for s in p.sites})
    total = sum(len(chunks[i]) for i in todo)
    disable = None if progress is None else not progress  # None: only on a terminal
    with tqdm(total=total, desc="caching", unit="ex", disable=disable) as bar:
        for i in todo:
            _build_chunk(
                model,
                out,
                i,
                chunks[i],
                layer_list,
                phis,
                store_dtype,
                batch_size,
                padding_side,
                needs_grad,
                sites,
                on_error,
                bar,
            )
    if world_size > 1:
        distributed.barrier()  # every rank's shards are written before rank 0 merges
    if rank != 0:
        return None
    return _finish(out, plan, len(chunks), skipped)


def _plan(
    model: Model,
    train: Any,
    layers: Any,
    stats: Sequence[str],
    max_length: int | None,
    dtype: str,
    shard_size: int,
    batch_size: int,
    padding_side: str,
    examples: Sequence[Example],
) -> dict[str, Any]:
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be 'bfloat16', 'float32' or 'float16', not {dtype!r}")
    plan: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "lensattr_version": __version__,
        "model": model.fingerprint(),
        "layers": resolve_layers(layers, model.n_layers),
        "stats": list(stats),
        "pooling": POOLING,
        "max_length": max_length,
        "dtype": dtype,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "padding_side": padding_side,
        "d_model": model.d_model,
    }
    plan["train"] = {**source_fingerprint(train, examples), "n_examples": len(examples)}
    return plan


def _chunk_done(out: Path, index: int) -> bool:

    side = out / f"shard-{index:05d}.json"
    shard = out / f"shard-{index:05d}.safetensors"
    if not (side.exists() and shard.exists()):
        return False
    try:
        return json.loads(side.read_text())["sha256"] == sha256_file(shard)
    except (ValueError, KeyError, TypeError):  # an unreadable sidecar: redo the chunk
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
) -> None:
    n, d = len(chunk), model.d_model
    rows = {
        (p.name, layer): torch.zeros((n, d), dtype=store_dtype) for p in phis for layer in layers
    }
    bad: dict[int, str] = {}
    for idx in length_batches(chunk, batch_size):
        batch = collate([chunk[i] for i in idx], model.pad_id, padding_side, str(model.device))
        acts = capture(model, batch, layers, grad=needs_grad, sites=sites)
        for layer in layers:
            for p in phis:
                vec = p.fn(acts[layer]).float().cpu()
                finite = torch.isfinite(vec).all(1)
                for j in (~finite).nonzero()[:, 0].tolist():
                    bad[idx[j]] = f"non-finite {p.name} at layer {layer}"
                rows[p.name, layer][idx] = vec.to(store_dtype)
        bar.update(len(idx))
    if bad and on_error != "skip":
        first = min(bad)
        raise CacheError(f"example {chunk[first].id!r}: {bad[first]} (use on_error='skip')")
    keep = torch.tensor([i for i in range(n) if i not in bad], dtype=torch.long)
    tensors: dict[str, torch.Tensor] = {}
    for (stat, layer), mat in rows.items():
        mat = mat[keep]
        tensors[tensor_key(stat, layer)] = mat
        tensors[tensor_key(stat, layer) + "/norm"] = mat.float().norm(dim=1)
    digest = write_shard(out / f"shard-{index:05d}.safetensors", tensors)
    atomic_write_json(
        out / f"shard-{index:05d}.json",
        {
            "index": index,
            "ids": [chunk[i].id for i in keep.tolist()],
            "skipped": [{"id": chunk[i].id, "reason": r} for i, r in sorted(bad.items())],
            "sha256": digest,
        },
    )


def _finish(
    out: Path, plan: dict[str, Any], n_chunks: int, skipped: list[dict[str, str]]
) -> "Cache":

    shards: list[dict[str, Any]] = []
    ids: list[str] = []
    for i in range(n_chunks):
        side = out / f"shard-{i:05d}.json"
        if not side.exists():
            raise CacheError(
                f"{side} is missing: shard {i} was never finished (in a "
                "multi-process build, rerun the same build once every rank is done)"
            )
        info = json.loads(side.read_text())
        shards.append(
            {
                "file": f"shard-{i:05d}.safetensors",
                "first_row": len(ids),
                "n_rows": len(info["ids"]),
                "sha256": info["sha256"],
            }
        )
        ids += info["ids"]
        skipped += info["skipped"]
    manifest = {**plan, "n_rows": len(ids), "ids": ids, "shards": shards, "skipped": skipped}
    atomic_write_json(out / "manifest.json", manifest)
    return open_cache(out, verify=False)


@dataclass
class Cache:
    """An opened cache (see :func:`open_cache`)."""

    path: Path
    manifest: dict[str, Any]
    _shards: list[MappedShard] = field(repr=False, default_factory=list)

    @property
    def ids(self) -> list[str]:
        return self.manifest["ids"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def stats(self) -> list[str]:
        return self.manifest["stats"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def stat(self, name: str, layer: int) -> StatView:
        """The cached ``[n, d_model]`` matrix of statistic ``name`` at ``layer`` (lazy)."""
        if name not in self.stats:
            raise KeyError(f"statistic {name!r} is not in this cache (it has {self.stats})")
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this cache (it has {self.layers})")
        key = tensor_key(name, layer)
        parts = [
            (info["first_row"], shard[key], shard[key + "/norm"])
            for info, shard in zip(self.manifest["shards"], self._shards, strict=True)
        ]
        return StatView(parts, self.d_model)

    def check(self, expect: Any) -> None:
        """Raise :class:`CacheError` naming every field where the cache differs from ``expect``.

        ``expect`` is a :class:`~lensattr.models.Model` or a dict of manifest fields (``model``
        may itself be a Model).
        """
        want = {"model": expect} if isinstance(expect, Model) else dict(expect)
        if isinstance(want.get("model"), Model):
            want["model"] = want["model"].fingerprint()
        problems = _diff(self.manifest, want)
        if problems:
            raise CacheError(f"{self.path} does not match: " + "; ".join(problems))


def open_cache(path: str | Path, *, expect: Any = None, verify: bool = True) -> Cache:
    """Open a finished cache, memory-mapped.

    Args:
        path: the cache directory.
        expect: a :class:`~lensattr.models.Model` or dict of manifest fields that must match.
        verify: check every shard's SHA-256 against the manifest (reads every byte once).

    Raises:
        CacheError: incomplete build, missing or corrupt shard, or a mismatch with ``expect``.
    """

    path = Path(path)
    mfile = path / "manifest.json"
    if not mfile.exists():
        hint = (
            " (an unfinished build: rerun the same build to resume)"
            if (path / "build.json").exists()
            else ""
        )
        raise CacheError(f"{path}: no manifest.json, not a finished lensattr cache{hint}")
    try:
        manifest = json.loads(mfile.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("no shard list")
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{mfile}: corrupt manifest ({err})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"{mfile}: schema version {manifest.get('schema_version')} "
            f"(this lensattr reads {SCHEMA_VERSION})"
        )
    shards = []
    for info in manifest["shards"]:
        f = path / info["file"]
        if not f.exists():
            raise CacheError(f"{f}: shard missing")
        if verify and sha256_file(f) != info["sha256"]:
            raise CacheError(f"{f}: checksum mismatch, the shard is corrupt")
        try:
            shards.append(MappedShard(f))
        except ValueError as err:
            raise CacheError(str(err)) from None
    cache = Cache(path=path, manifest=manifest, _shards=shards)
    if expect is not None:
        cache.check(expect)
    return cache


def world_from_env() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torchrun`` / ``accelerate launch`` environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
