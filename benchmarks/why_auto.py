"""Why did ``auto`` choose what it chose? Its criterion next to precision among the pool.

    python benchmarks/why_auto.py --cache CACHE --pairs PAIRS.jsonl --labels PLANTS.jsonl \
        [--prefix medhallu/] [--top 12]

The pairs are captured with the cache's own settings (``cache.capture_config``). ``select``
runs on the cache and the pairs exactly as ``rank(..., method="auto")`` would (no
labels). Then, for diagnosis only, every candidate is ranked at every cached layer and judged
with the plant labels (``label`` of each record of ``--labels``, matched by ``--prefix`` + id;
rows without a label count as clean): per candidate, its criterion averaged over layers (what
``select`` orders by), the layer its criterion picks, the precision@k there, and the best
precision@k at any layer (hindsight). The labels never feed the choice.
"""

import argparse
import json

import torch

import lensattr
from lensattr.criterion import best_rows, method_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--pairs", required=True, help="pairs jsonl, or a saved PairStats")
    ap.add_argument("--labels", required=True, help="jsonl records with id and label (1 / 0)")
    ap.add_argument("--prefix", default="", help="prefix of the cache ids of the labelled rows")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--top", type=int, default=12, help="candidates to print")
    args = ap.parse_args()

    cache = lensattr.open_cache(args.cache)
    label_of = {}
    with open(args.labels) as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                label_of[args.prefix + rec["id"]] = int(rec["label"])
    labels = torch.tensor([label_of.get(i, -1) for i in cache.ids])
    model = lensattr.load_model(args.model)
    if args.pairs.endswith(".safetensors"):
        stats = lensattr.PairStats.load(args.pairs)
    else:
        # the pairs captured as the cache was (layers, max_length, padding side)
        stats = lensattr.pair_stats(
            model, args.pairs, stats=cache.stats, config=cache.capture_config
        )
    sel = lensattr.select(model, cache, stats)
    print(sel.summary(top=5))

    means = method_scores(sel.table)  # what select orders the methods by
    chosen = best_rows(sel.table)  # each method's layer, as select picks it
    table = []
    for name in means:
        rule, stat, score = name.split("|")
        query = lensattr.behavior_query(None, stats, query=rule, stat=stat, score=score, pool=cache)
        p_at_k = {}
        for row in sel.table:
            if row["method"] == name:
                scores = lensattr.rank(cache, query, layer=row["layer"], top_k=None).scores_of(
                    range(len(cache))
                )
                p_at_k[row["layer"]] = lensattr.pool_metrics(scores, labels, coding="planted")[
                    "p_at_k"
                ]
        layer = chosen[name]["layer"]
        table.append((means[name][0], name, layer, p_at_k[layer], max(p_at_k.values())))
    table.sort(reverse=True)
    k = int((labels == 1).sum())
    print(
        f"\n{'candidate (by mean criterion)':50s} {'crit':>6s} {'layer':>5s} "
        f"{'P@' + str(k):>6s} {'hindsight':>9s}"
    )
    for mean, name, layer, there, best in table[: args.top]:
        print(f"{name:50s} {mean:6.3f} {layer:5d} {there:6.2f} {best:9.2f}")


if __name__ == "__main__":
    main()
