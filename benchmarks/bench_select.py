"""Cost of ``auto`` (:func:`lensattr.select`): the whole choice over a cache, pairs captured.

    python -m benchmarks.bench_select                   # 4,000 rows x 30 layers x 4 statistics
    python -m benchmarks.bench_select --n 500 --layers 3   # plumbing check (seconds)

Writes a synthetic bf16 cache (d_model 576, the built-in statistics' names), random statistics
for 48 query pairs, and times ``select`` with every built-in candidate at every layer: the
first call (pool moments computed and written into the cache) and a second one (moments read
back). The target of issue 10 is under 60 s for the first call on 2 cores.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_perf import synthetic_cache
from lensattr import PairStats, candidates, open_cache, select
from lensattr.build import DEFAULT_STATS
from lensattr.layers import layer_text
from lensattr.moments import clear_memo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(2)
    layers = tuple(range(args.layers))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        model = synthetic_cache(path, args.n, args.d, layers=layers, stats=DEFAULT_STATS)
        cache = open_cache(path, verify=False)
        gen = torch.Generator().manual_seed(0)
        side = {
            s: {la: torch.randn(args.pairs, args.d, generator=gen) for la in layers}
            for s in DEFAULT_STATS
        }
        other = {
            s: {la: v + 0.3 * torch.randn(v.shape, generator=gen) for la, v in d.items()}
            for s, d in side.items()
        }
        ps = PairStats(side, other, model, {})
        n_cand = len(candidates(cache.stats))
        out = {"rows": args.n, "layers": args.layers, "candidates": n_cand, "pairs": args.pairs}
        for label in ("first", "second"):
            if label == "second":
                clear_memo()  # read the moments back from the cache directory
            t = time.perf_counter()
            sel = select(None, cache, ps)
            out[f"{label}_s"] = round(time.perf_counter() - t, 2)
        out["evaluations"] = len(sel.table)
        out["chose"] = f"{sel.method} L{layer_text(sel.layer)}"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
