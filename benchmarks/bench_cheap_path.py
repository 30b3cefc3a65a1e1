"""The cheap path for one behaviour against the full cache, on the bundled demo data.

    python benchmarks/bench_cheap_path.py [--sample 64] [--model smollm2-135m-instruct]

Full path: cache every default statistic at every layer, capture the pairs, ``select``, rank.
Cheap path: ``select_then_cache`` (choose on a seeded sample, then cache the corpus at the chosen
layer for the chosen statistic only), rank. Prints the seconds of each, their ratio, and the
precision@k among the pool of both rankings (labels read for the metric only). One run, in
order full then cheap, on whatever else the machine is doing: a ratio, not an absolute time.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import lensattr
from lensattr.demo import bundled
from lensattr.layers import layer_text


def p_at_k(cache, ranking, labels_by_id) -> float:
    scores = ranking.scores_of(range(len(cache)))
    labels = torch.tensor([labels_by_id.get(i, -1) for i in cache.ids])
    return float(lensattr.pool_metrics(scores, labels, coding="planted")["p_at_k"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sample", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    model = lensattr.load_model(args.model)
    train, pairs = bundled("demo/train.jsonl"), bundled("demo/query.jsonl")
    labels = {ex.id: int(ex.extra.get("label", -1)) for ex in lensattr.load_examples(train)}
    kw = {"config": lensattr.CaptureConfig(max_length=args.max_length)}  # both paths alike
    out: dict = {"n_train": len(labels), "sample": args.sample}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        full = lensattr.build_cache(model, train, out=Path(tmp) / "full", progress=False, **kw)
        sel = lensattr.select(model, full, pairs)
        r_full = lensattr.rank(full, sel, top_k=None)
        out["full_s"] = round(time.perf_counter() - t, 1)
        out["full_choice"] = f"{sel.method} L{layer_text(sel.layer)}"
        out["full_p_at_k"] = p_at_k(full, r_full, labels)
        t = time.perf_counter()
        cache, q, sel2 = lensattr.select_then_cache(
            model, train, pairs, out=Path(tmp) / "cheap", sample=args.sample, progress=False, **kw
        )
        r_cheap = lensattr.rank(cache, q, top_k=None)
        out["cheap_s"] = round(time.perf_counter() - t, 1)
        out["cheap_choice"] = f"{sel2.method} L{layer_text(sel2.layer)}"
        out["cheap_p_at_k"] = p_at_k(cache, r_cheap, labels)
    out["cheap_over_full"] = round(out["cheap_s"] / out["full_s"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
