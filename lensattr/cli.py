"""The ``lensattr`` command line: ``cache``, ``query``, ``rank``, ``explain``, ``demo`` and
``bench``."""

import argparse
import errno
import json
import logging
import math
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lensattr._version import __version__
from lensattr.build import DEFAULT_STATS
from lensattr.config import add_arguments, from_arguments
from lensattr.layers import layer_text
from lensattr.optional import explain
from lensattr.registry import names

if TYPE_CHECKING:
    from lensattr.query import Query
    from lensattr.rank import Ranking


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (default), tiny-random, a model directory or hf://owner/name",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--compute-dtype",
        default=None,
        help="compute dtype: bf16, float32, ... (default: fp32 on CPU, bf16 on GPU)",
    )
    p.add_argument("--trust-remote-code", action="store_true")


def _capture_args(p: argparse.ArgumentParser, *settings: str) -> None:
    """The capture settings (generated from :class:`~lensattr.config.CaptureConfig`)."""
    add_arguments(p, ("layers", "max_length", "padding_side", *settings))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensattr",
        description="Training-data attribution in activation space (cache, query, rank).",
    )
    parser.add_argument("--version", action="version", version=f"lensattr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="cache per-example statistics for every layer")
    _model_args(p)
    _capture_args(p, "storage_dtype")
    p.add_argument(
        "--train",
        required=True,
        help="training data: .jsonl/.json/.csv/.parquet or hf://owner/name",
    )
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--stats", default=",".join(DEFAULT_STATS), help="comma-separated statistics")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (listed in manifest)")

    p = sub.add_parser("query", help="build a behaviour query from treatment/control pairs")
    _model_args(p)
    _capture_args(p)
    p.add_argument("--pairs", required=True, help="pair file (or a trait spec for --query persona)")
    p.add_argument(
        "--query",
        dest="rule",
        metavar="NAME",
        default="residual_change",
        help=f"registered query rule: {', '.join(names('query'))}",
    )
    p.add_argument("--stat", default=None, help=f"statistic: {', '.join(names('stat'))}")
    p.add_argument("--score", default="cosine", help=f"score: {', '.join(names('score'))}")
    p.add_argument(
        "--method",
        default=None,
        help="'auto': choose statistic, query, score and layer from the pairs and --cache "
        "(no labels); 'query|stat|score': that method; overrides --query/--stat/--score/--layers",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="the cache to be ranked (needed by --method auto and by "
        "pool-aware queries such as pool_contrast)",
    )
    p.add_argument("--out", required=True, help="query file (.safetensors)")

    p = sub.add_parser("rank", help="rank cached examples against a query; prints the top")
    p.add_argument("--cache", required=True)
    p.add_argument("--query", default=None, help="a saved query (from `lensattr query`)")
    p.add_argument(
        "--pairs", default=None, help="query pairs, with --method auto (instead of --query)"
    )
    p.add_argument("--method", default=None, help="'auto' (with --pairs and the model options)")
    p.add_argument(
        "--layer",
        default=None,
        help="a layer (negative: from the model's last block), 'best', or a hook name "
        "(blocks.N.hook_resid_post; blocks.N.hook_resid_pre is layer N-1); several "
        "(12,15,18 or 12:16): the mean of the scores at those layers; default: the layer "
        "chosen for the query (else its best held-out accuracy)",
    )
    p.add_argument("--stat", default=None, help="cached statistic (default: the query's)")
    p.add_argument(
        "--score", default=None, help=f"score (default: the query's): {', '.join(names('score'))}"
    )
    p.add_argument("--top-k", type=int, default=20, help="how many to show (and write)")
    p.add_argument("--bottom", action="store_true", help="lowest scores instead")
    p.add_argument(
        "--out", default=None, help="also write a .jsonl (id, score, rank, method, example)"
    )
    _model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="for capturing --pairs")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser(
        "explain", help="which reply tokens of cached examples drive their score (highlighted)"
    )
    p.add_argument("--cache", required=True, help="the cache holding the examples")
    p.add_argument("--query", required=True, help="a saved query (from `lensattr query`)")
    p.add_argument("--ids", default=None, help="comma-separated example ids (default: the top)")
    p.add_argument("--top", type=int, default=3, help="without --ids: the top this many")
    p.add_argument("--layer", default=None, help="as for `lensattr rank` (default: the query's)")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="highlight with terminal colours (auto: on a terminal)",
    )
    _model_args(p)

    p = sub.add_parser("demo", help="the main job on the embedded SmolLM2 and bundled data")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true")
    _bench_parser(sub)
    return parser


def _bench_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The ``bench`` subcommand (see :mod:`lensattr.bench`)."""
    p = sub.add_parser("bench", help="attribution benchmark: planted recovery + fine-tuning effect")
    from lensattr.bench.run import BenchConfig  # its fields are the flags

    add_arguments(p, config=BenchConfig)
    p.add_argument("--out", default="runs/bench", help="output directory (a rerun resumes)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model + synthetic data: checks plumbing only, in seconds",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from lensattr.bench import BenchConfig, run_bench
    from lensattr.bench.smoke import smoke_config, write_synthetic_data

    if args.smoke:
        print("smoke run: tiny random model on synthetic data; checks plumbing only")
        cfg = smoke_config(write_synthetic_data(Path(tempfile.mkdtemp()) / "data"))
    else:
        cfg = from_arguments(args, config=BenchConfig)
    run_bench(cfg, args.out)
    print(f"results: {args.out}/results.json, {args.out}/results.md, figures in {args.out}")
    return 0


def _check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use in one line (CUDA asked of a CPU-only torch would
    otherwise fail deep inside ``Module.to`` with an ``AssertionError``)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU found"
        raise ValueError(f"--device {device!r}: CUDA is not available ({why}); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available; use --device cpu")


def _check_out(out: str, *, inputs: Sequence[str | None] = (), caches: Sequence[str] = ()) -> None:
    """Refuse an output path that is one of the command's inputs or lies inside a cache
    directory (the cache read, or any directory holding a cache or a build): writing there would
    overwrite what the command reads, or a cache's own files."""
    target = Path(out).resolve()
    for given in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve() == target:
            raise ValueError(f"--out {out}: that is an input of this command; write elsewhere")
    for cache in caches:
        if target.is_relative_to(Path(cache).resolve()):
            raise ValueError(
                f"--out {out}: inside the cache directory {cache}; write outside the cache"
            )
    parent = target.parent
    if (parent / "manifest.json").exists() or (parent / "build.json").exists():
        raise ValueError(f"--out {out}: {parent} holds a lensattr cache; write outside it")


def _load(args: argparse.Namespace):  # noqa: ANN202
    from lensattr.backends.models import load_model

    _check_device(args.device)
    return load_model(
        args.model,
        device=args.device,
        compute_dtype=args.compute_dtype,
        trust_remote_code=args.trust_remote_code,
    )


def cmd_cache(args: argparse.Namespace) -> int:
    from lensattr import distributed
    from lensattr.build import build_cache

    # Under torchrun / accelerate launch: a process group, and one GPU per rank of a node.
    rank, world = distributed.init_process_group()
    args.device = args.device or distributed.default_device()
    built = (Path(args.out) / "manifest.json").exists()
    try:
        cache = build_cache(
            _load(args),
            args.train,
            out=args.out,
            config=from_arguments(args),
            stats=[s for s in args.stats.split(",") if s],
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            on_error="skip" if args.skip_bad else "raise",
            progress=False if args.quiet else None,
            rank=rank,
            world_size=world,
        )
    finally:
        distributed.destroy_process_group()
    if cache is not None:
        print(
            f"{'already built, nothing to do:' if built else 'cached'} {len(cache)} examples x "
            f"{len(cache.layers)} layers x {len(cache.stats)} statistics in {args.out}"
        )
    return 0


def _print_choice(q: "Query") -> None:
    acc = ", ".join(f"L{k} {v:.2f}" for k, v in sorted((q.cv or {}).items()))
    print(f"held-out accuracy per layer ({q.score}): {acc}")
    try:
        print(f"layer used by `lensattr rank` by default: {layer_text(q.best_layer())}")
    except ValueError as err:
        print(f"no layer can be chosen: {err}")


def cmd_query(args: argparse.Namespace) -> int:
    from lensattr.query import behavior_query
    from lensattr.select import select

    _check_out(args.out, inputs=[args.pairs], caches=[args.cache] if args.cache else [])
    if args.method not in (None, "auto"):
        from lensattr.select import Method

        m = Method.parse(args.method)
        args.rule, args.stat, args.score = m.query, m.stat, m.score
    if args.method == "auto":
        if not args.cache:
            raise ValueError("--method auto chooses against the cache to be ranked: pass --cache")
        sel = select(
            _load(args),
            args.cache,
            args.pairs,
            batch_size=args.batch_size,
            progress=False if args.quiet else None,
        )
        print(sel.summary())
        if sel.ensemble is not None:
            sel.ensemble.save(args.out)
            print(
                f"ensemble of {len(sel.ensemble.members)} queries from {sel.query.n_pairs} pairs, "
                f"layers {layer_text(sel.layers)}: {args.out}"
            )
            return 0
        sel.query.save(args.out)
        print(
            f"query {sel.method} from {sel.query.n_pairs} pairs, layer "
            f"{layer_text(sel.layer)}: {args.out}"
        )
        return 0
    q = behavior_query(
        _load(args),
        args.pairs,
        query=args.rule,
        stat=args.stat,
        pool=args.cache,
        score=args.score,
        batch_size=args.batch_size,
        progress=False if args.quiet else None,
        config=from_arguments(args),
    )
    q.save(args.out)
    print(
        f"query {q.rule} (stat {q.stat}) from {q.n_pairs} pairs at {len(q.layers)} layers: "
        f"{args.out}"
    )
    _print_choice(q)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from lensattr.rank import rank
    from lensattr.store.cache import open_cache

    if (args.query is None) == (args.pairs is None):
        raise ValueError("give either --query (a saved query) or --pairs with --method auto")
    if args.pairs is not None and args.method != "auto":
        raise ValueError("--pairs ranks with --method auto; for a fixed method build a query")
    if args.out is not None:  # without --out the ranking is only printed
        _check_out(args.out, inputs=[args.query, args.pairs], caches=[args.cache])
    cache = open_cache(args.cache)
    r = rank(
        cache,
        args.query if args.query is not None else args.pairs,
        method=args.method if args.pairs is not None else None,
        model=_load(args) if args.pairs is not None else None,
        layer=args.layer,
        stat=args.stat,
        score=args.score,
        top_k=args.top_k,
        bottom=args.bottom,
    )
    print(f"{r.describe()}:")
    print(ranking_text(r, shutil.get_terminal_size().columns))
    if args.out is None:
        return 0
    records = cache.records(r.ids)  # the cache's own checksummed copy of the training records
    with open(args.out, "w", encoding="utf-8") as fh:
        for i, (eid, score, rec) in enumerate(zip(r.ids, r.scores.tolist(), records, strict=True)):
            row = {
                "id": eid,
                "score": score if math.isfinite(score) else None,  # JSON has no NaN: null
                "rank": i + 1,
                "method": r.method,
                "layer": r.layer,
                "rule": r.rule,
                "stat": r.stat,
                "score_name": r.score,
                "example": {k: v for k, v in rec.items() if k != "id"},
            }
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    print(f"wrote {len(r)} ranked examples to {args.out}")
    return 0


def ranking_text(r: "Ranking", width: int = 100) -> str:
    """A ranking's table for a terminal ``width`` columns wide: rank, id, score, the label if
    the records have one, and as much of each reply as fits."""
    from lensattr.tables import excerpt, text_table

    rows = r.table()
    columns = ["rank", "id", "score", *(["label"] if any("label" in x for x in rows) else [])]
    fixed = len(text_table(rows, columns).splitlines()[0]) if rows else 0
    for x in rows:
        x["text"] = excerpt(str(x.get("text", "")), max(20, width - fixed - 3))
    return text_table(rows, [*columns, "text"])


def cmd_explain(args: argparse.Namespace) -> int:
    from lensattr.query import Query
    from lensattr.rank import explain, rank
    from lensattr.store.cache import open_cache

    cache = open_cache(args.cache)
    query = Query.load(args.query)
    ids = [x for x in (args.ids or "").split(",") if x]
    if not ids:
        ids = rank(cache, query, layer=args.layer, top_k=args.top).ids
    examples = cache.examples(ids)
    model = _load(args)
    color = {"always": True, "never": False}.get(args.color, sys.stdout.isatty())
    for ex in examples:
        e = explain(model, ex, query, args.layer, config=cache.capture_config)
        print(f"{ex.id}: mean token contribution {e.total:+.4g} ({len(e.tokens)} reply tokens)")
        print("  " + e.text(color=color).replace("\n", "\n  "))
    if not color:
        print("[[ ]]: the tokens that raise the score most; (( )): that lower it most")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lensattr.demo import run_demo

    run_demo(
        model=args.model,
        out=Path(args.out),
        max_length=args.max_length,
        batch_size=args.batch_size,
        progress=False if args.quiet else None,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "cache": cmd_cache,
        "query": cmd_query,
        "rank": cmd_rank,
        "explain": cmd_explain,
        "demo": cmd_demo,
        "bench": cmd_bench,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(
            f"lensattr {args.command}: interrupted (rerun the same command to resume)",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        message = describe_error(err, args)
        if message is None:
            raise  # not a failure the CLI foresees: a bug, with its traceback
        if args.verbose:
            traceback.print_exc()
        print(f"lensattr {args.command}: error: {message}", file=sys.stderr)
        return 2


_ERRNO_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space, or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free some space, or write somewhere else",
    errno.EROFS: "read-only file system: choose a writable location",
    errno.EACCES: "permission denied: check its permissions, or choose another location",
    errno.EPERM: "operation not permitted: check its permissions, or choose another location",
    errno.EEXIST: "already exists (and is in the way): remove it, or choose another path",
    errno.ENOTDIR: "a path component is not a directory: check the path",
    errno.EISDIR: "is a directory, a file was expected: check the path",
    errno.ENOENT: "no such file or directory",
}


def describe_error(err: BaseException, args: argparse.Namespace) -> str | None:
    """One line for a failure the CLI foresees (naming the file and what to do), else ``None``."""
    from safetensors import SafetensorError

    from lensattr.data import DataError

    if isinstance(err, ConnectionError) or type(err).__name__ in ("ConnectTimeout", "ReadTimeout"):
        text = (
            f"could not reach the network ({err}): check the connection, or use a local path "
            "(a model already downloaded loads offline with HF_HUB_OFFLINE=1)"
        )
    elif isinstance(err, OSError) and (err.filename or err.errno in _ERRNO_HINTS):
        hint = _ERRNO_HINTS.get(err.errno or 0, err.strerror or str(err))
        where = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
        text = f"{where}: {hint}" if where else hint
    elif isinstance(err, SafetensorError):
        given = [str(getattr(args, a)) for a in ("query", "cache") if getattr(args, a, None)]
        text = (
            f"{', '.join(given) or 'a .safetensors file'}: not a readable safetensors file ({err})"
        )
    elif isinstance(err, KeyError):
        text = str(err.args[0]) if err.args else "missing key"
    elif isinstance(err, TypeError):
        text = f"{err} (a wrong kind of value; rerun with -v for the traceback)"
    elif isinstance(err, (DataError, ValueError, RuntimeError, OSError, ImportError, EOFError)):
        text = explain(err, args.command) or type(err).__name__
    else:
        return None
    return " ".join(text.split())  # one line


if __name__ == "__main__":
    sys.exit(main())
