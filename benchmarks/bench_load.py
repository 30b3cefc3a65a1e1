"""Load benchmark: resident memory of a cache build over many tiny examples stays flat.

Builds a cache of ``--n`` generated chat examples (default 100,000) with the tiny random model and
samples this process's resident set size (RSS) every ``--interval`` seconds from a background
thread, next to the number of finished shards. It prints the samples, the peak, and how much RSS
grew *during the shard loop* (the highest RSS of the loop's last fifth minus that of its first
fifth): a flat build holds only one shard's rows at a time, so that growth should stay near zero
however large ``--n`` is. (The
examples and their token ids are loaded before the loop and are held throughout; that part is
O(n): about 3 KiB per example here, ~300 MiB for 100,000.)

Usage::

    .venv/bin/python benchmarks/bench_load.py               # 100,000 examples (~10 min, 1 CPU)
    .venv/bin/python benchmarks/bench_load.py --n 5000      # a quick run
    .venv/bin/python benchmarks/bench_load.py --json runs/bench_load.json

Exit status 1 when the in-loop growth exceeds ``--max-growth-mib`` (default 64 MiB).
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "runs",
    "quickly",
    "over",
    "lazy",
    "river",
    "stone",
    "blue",
    "seven",
    "answer",
    "because",
    "why",
    "how",
    "many",
    "is",
    "are",
    "was",
    "green",
    "small",
    "large",
    "tree",
    "house",
    "light",
    "dark",
]


def rss_mib() -> float:
    """Current resident set size of this process in MiB (``/proc``, else ``psutil``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # pragma: no cover - not Linux

    return psutil.Process().memory_info().rss / 2**20


def write_examples(path: Path, n: int, seed: int = 0) -> None:
    """``n`` short chat examples (2-10 word prompts, 1-6 word replies), streamed to jsonl."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            fh.write(json.dumps({"id": f"ex{i}", "prompt": prompt, "response": reply}) + "\n")


class Sampler(threading.Thread):
    """Samples ``(seconds, finished shards, RSS MiB)`` until stopped."""

    def __init__(self, out: Path, interval: float) -> None:
        super().__init__(daemon=True)
        self.out, self.interval = out, interval
        self.samples: list[tuple[float, int, float]] = []
        self.t0 = time.perf_counter()
        self._stop_event = threading.Event()

    def sample(self) -> tuple[float, int, float]:
        shards = len(list(self.out.glob("shard-*.json"))) if self.out.exists() else 0
        s = (time.perf_counter() - self.t0, shards, rss_mib())
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def slope_mib_per_10k(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS (MiB) against examples done, per 10,000 examples."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 10_000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="examples (default 100,000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--layers", default="all")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--out", default=None, help="cache directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the cache and training file")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--max-growth-mib", type=float, default=64.0)
    args = p.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from lensattr import build_cache, load_model

    work = Path(tempfile.mkdtemp(prefix="lensattr-bench-load-"))
    out = Path(args.out) if args.out else work / "cache"
    train = work / "train.jsonl"
    sampler = Sampler(out, args.interval)
    phases: dict[str, float] = {"start": rss_mib()}
    try:
        model = load_model("tiny-random", device="cpu")
        phases["model loaded"] = rss_mib()
        write_examples(train, args.n)
        phases["data written"] = rss_mib()
        sampler.start()
        t0 = time.perf_counter()
        cache = build_cache(
            model,
            train,
            out=out,
            layers=args.layers,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            max_length=args.max_length,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        sampler.stop()
        phases["built"] = rss_mib()
        assert cache is not None and len(cache) == args.n, "the cache lost examples"
        n_shards = len(cache.manifest["shards"])
        disk = sum(f.stat().st_size for f in out.iterdir())
    finally:
        if not sampler._stop_event.is_set() and sampler.is_alive():
            sampler.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if args.out:
                shutil.rmtree(out, ignore_errors=True)

    samples = sampler.samples
    per_shard = args.shard_size
    # The shard loop: samples taken after the first shard was finished and before the last.
    # RSS swings by a few hundred MiB within a batch (autograd buffers come and go), so compare
    # the highest RSS of the loop's first fifth with that of its last fifth, not two samples.
    loop = [(min(k * per_shard, args.n), r) for _, k, r in samples if 0 < k < n_shards]
    fifth = max(1, len(loop) // 5)
    first = max((r for _, r in loop[:fifth]), default=float("nan"))
    last = max((r for _, r in loop[-fifth:]), default=float("nan"))
    peak = max([r for *_, r in samples] + list(phases.values()))
    growth = last - first
    result = {
        "n": args.n,
        "shards": n_shards,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "seconds": round(seconds, 1),
        "examples_per_s": round(args.n / seconds, 1),
        "cache_mib": round(disk / 2**20, 1),
        "rss_mib": {k: round(v, 1) for k, v in phases.items()},
        "rss_peak_mib": round(peak, 1),
        "rss_loop_first_fifth_max_mib": round(first, 1),
        "rss_loop_last_fifth_max_mib": round(last, 1),
        "rss_growth_in_loop_mib": round(growth, 1),
        "rss_slope_mib_per_10k": round(slope_mib_per_10k(loop), 2),
        "samples": [(round(t, 1), k, round(r, 1)) for t, k, r in samples],
    }

    print(
        f"{args.n} examples, {n_shards} shards, {seconds:.0f} s ({args.n / seconds:.0f} ex/s), "
        f"cache {disk / 2**20:.1f} MiB"
    )
    print("RSS by phase (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    print(f"{'seconds':>8} {'shards':>7} {'examples':>9} {'RSS MiB':>8}")
    step = max(1, len(samples) // 25)
    for t, k, r in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{t:8.1f} {k:7d} {min(k * per_shard, args.n):9d} {r:8.1f}")
    print(
        f"peak RSS {peak:.1f} MiB; shard loop: highest RSS {first:.1f} MiB in its first fifth, "
        f"{last:.1f} MiB in its last (growth {growth:+.1f} MiB; least-squares slope "
        f"{result['rss_slope_mib_per_10k']:+.2f} MiB per 10k examples)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    flat = not growth > args.max_growth_mib  # NaN (too few samples) counts as flat
    print("flat" if flat else f"NOT flat: grew more than {args.max_growth_mib} MiB")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
