"""lensattr's rankings against bergson's best mode on one finished ``bench_peers`` run, paired.

    python -m benchmarks.peers_paired --work runs/medhallu9
    python -m benchmarks.peers_paired --work runs/medhallu8 --bergson runs/medhallu8b --select
    python -m benchmarks.peers_paired --work runs/medhallu10 --select --pair-stats PAIRS.safetensors

Reads the run's working directory: the pool's order (``train.jsonl``), its labels
(``labels.json``, which ``bench_peers.py`` writes; for an older run, rebuilt from the shared
behaviour's ``plant.jsonl`` with ``--data``), lensattr's scores (``full-0.json``: ``auto`` and
the paper's query as they ran) and bergson's (``bergson-0-scores.json``, from ``--bergson`` when
bergson ran in another directory). ``--select`` also runs :func:`lensattr.select` again on the
run's cache and pairs (``auto`` as the code now chooses; it loads the model and captures the
pairs, unless ``--pair-stats`` names their saved :class:`lensattr.PairStats`). Each lensattr
ranking's precision@k and average precision minus those of bergson's best mode (picked with the
labels) are printed with 95% paired bootstrap intervals (:func:`lensattr.pool_metrics_difference`).
"""

import argparse
import json
from pathlib import Path

import torch

import lensattr
from benchmarks.bench_peers import print_paired
from lensattr.layers import layer_text


def pool_labels(work: Path, data: str | None, shared: Path) -> torch.Tensor:
    """One label per pool row: ``labels.json`` if the run wrote it, else the shared plants'."""
    if (work / "labels.json").exists():
        return torch.tensor(json.loads((work / "labels.json").read_text()))
    if data is None:
        raise SystemExit(f"{work}: no labels.json; pass --data (the behaviour) to rebuild them")
    plants = shared / "behaviors" / data / "plant.jsonl"
    label = {json.loads(x)["id"]: json.loads(x)["label"] for x in plants.open() if x.strip()}
    ids = [json.loads(x)["id"] for x in (work / "train.jsonl").open() if x.strip()]
    return torch.tensor(
        [label[i.split("/", 1)[1]] if i.startswith(f"{data}/") else -1 for i in ids]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a finished bench_peers working directory")
    ap.add_argument("--bergson", help="where bergson's round 0 ran (default: --work)")
    ap.add_argument("--data", help="the shared behaviour, for a run without labels.json")
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--select", action="store_true", help="also rank with auto as it now chooses")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the run's (with --select)")
    ap.add_argument(
        "--pair-stats", help="with --select: the pairs' saved PairStats, not recaptured"
    )
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    work = Path(args.work)
    labels = pool_labels(work, args.data, Path(args.shared))
    got = json.loads((work / "full-0.json").read_text())
    mine = {f"{k} ({v['choice']})": torch.tensor(v["scores"]) for k, v in got["results"].items()}
    if args.select:
        cache = lensattr.open_cache(work / "full-0")
        if args.pair_stats:
            model, pairs = None, lensattr.PairStats.load(args.pair_stats)
        else:
            model = lensattr.load_model(args.model, device="cpu", compute_dtype="float32")
            pairs = work / "pairs.jsonl"
        sel = lensattr.select(model, cache, pairs, progress=False)
        print(sel.summary(top=3))
        r = lensattr.rank(cache, sel, top_k=None)
        what = f"{sel.method} @ L{layer_text(sel.layer)}"
        if sel.ensemble is not None:
            what = f"ensemble of {len(sel.ensemble.members)}, best {what}"
        mine[f"auto now ({what})"] = r.scores_of(range(len(cache))).float()
    scored = Path(args.bergson or work) / "bergson-0-scores.json"
    theirs = {m: torch.tensor(s) for m, s in json.loads(scored.read_text())["scores"].items()}

    def metrics(s: torch.Tensor) -> dict:
        return {**lensattr.pool_metrics(s, labels, coding="planted"), "scores": s}

    modes = {f"bergson {m}": metrics(s) for m, s in theirs.items()}
    mine = {name: metrics(s) for name, s in mine.items()}
    k = int((labels == 1).sum())
    for name, m in {**modes, **mine}.items():
        print(f"{name:<66} P@{k} {m['p_at_k']:.2f}  AP {m['ap']:.3f}")
    print_paired(mine, modes, labels, n_boot=args.n_boot)


if __name__ == "__main__":
    main()
