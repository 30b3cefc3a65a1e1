"""lensattr against EleutherAI's bergson, side by side in ONE run (issue 14).

    make bench-peers                                   # creates .venv-bergson, then runs this
    python benchmarks/bench_peers.py --n-examples 72 --rounds 1    # a small run
    python benchmarks/bench_peers.py --data medhallu --clean 600 --plants 50 --pairs 32
    python benchmarks/bench_peers.py --data persona-agreeableness --clean 300 --plants 30

Same model (SmolLM2-135M-Instruct, the local safetensors directory lensattr caches: nothing is
downloaded), same examples, same compute dtype (fp32 on CPU), same batch size, and no example
reaches the maximum length (checked), so both sides see the same tokens. Data:

- ``--data demo``: the bundled demo set (every planted and decoy example plus the first clean
  ones, in file order) and its 16 query pairs;
- ``--data medhallu`` (or any behaviour of the shared data: ``persona-agreeableness``, ...): a
  seeded subsample of the shared clean corpus, ``--plants`` treatment and ``--plants`` control
  plants of the behaviour's ``plant`` split, shuffled together (seeded), and ``--pairs`` seeded
  pairs of its ``query`` split.

Every contender runs its whole pipeline for the behaviour in fresh processes, in alternating
rounds (the order reverses every round):

- ``bergson``: ``bergson build`` of the corpus (per-example gradients of every linear module,
  randomly projected to ``--projection-dim`` per side, fp32 store) on a local jsonl with
  ``--conversation_column messages``, in its own virtual environment (``.venv-bergson``); then
  the pairs' two sides through ``bergson build`` and the treatment-minus-control query scored
  in four modes (plain dot, unit-normalised, preconditioned, both; ``peers_bergson_score.py``);
- ``full``: lensattr's ``build_cache`` (all layers, default statistics, bf16 storage), then
  ``auto`` (:func:`lensattr.select`) and ``rank``; then the paper's residual change; then the
  baselines a user tries first (:mod:`lensattr.baselines`): text search of the replies (each
  lexical kind, and the kind chosen without labels) and RepSim at the layer ``auto``'s
  criterion chooses for it, each timed alone (RepSim after the build, text search without it);
- ``gradfree``: :func:`lensattr.select_then_cache` with the whole corpus as the sample: one
  forward-only build of ``resid_post`` at every layer, ``auto`` among the gradient-free
  methods, ``rank``;
- ``cheap``: :func:`lensattr.select_then_cache` with ``--sample`` examples: a forward-only
  sample build, the choice on it, then the corpus at the chosen layer (forward stopped there);
- ``cheapgrad``: the same with the full ``auto``'s statistics (``stats=DEFAULT_STATS``): a
  gradient build of the sample at every layer, the choice among every candidate on it, then the
  corpus for the chosen statistic at the chosen layer (the backward stops there).

Times are wall seconds from process start to exit (imports and model loads included on both
sides); a build's time ends when its cache is written. Peak RSS is each process's ``wait4``
maximum. The plant labels are read for the metrics only: precision@k and average precision
of the label-1 plants among the whole pool (:func:`lensattr.pool_metrics`), and each lensattr
method's difference from bergson's best mode with its 95% paired bootstrap interval
(:func:`lensattr.pool_metrics_difference`: both rankings scored on the same resamples of the
pool; bergson's mode is picked with the labels). ``--out`` gets the
results as JSON, rewritten after every contender, so a long run that is stopped keeps what it
measured.

Without ``.venv-bergson`` this prints one line saying so and exits 0, unless bergson is not
among ``--contenders`` (lensattr's pipelines alone, e.g. after a change to ``auto``; the
ratios then need a bergson run of the same data from another run, and say nothing).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lensattr
from lensattr.demo import bundled

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` to completion: wall seconds, peak RSS (MB) of the process, and its output."""
    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"bench-peers: {cmd[0]} {cmd[1]} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "log": text}


def demo_subset(n: int) -> list[dict]:
    """Every labelled demo example (12 plants, 12 decoys) plus the first clean ones, in file
    order."""
    rows = [json.loads(line) for line in bundled("demo/train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r]
    labelled = sum("label" in r for r in rows)
    budget = n - labelled
    if budget < 0:
        sys.exit(f"bench-peers: --n-examples must be at least {labelled} (the labelled examples)")
    out = []
    for r in rows:
        if "label" in r or budget > 0:
            budget -= "label" not in r
            out.append(r)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def behavior_pool(data: Path, behavior: str, n_clean: int, n_plants: int, seed: int) -> list[dict]:
    """``n_clean`` seeded clean examples and ``n_plants`` seeded treatment (label 1) and control
    (label 0) plants of a shared behaviour (``"medhallu"``, ...), shuffled together (seeded)."""
    import random

    from lensattr.bench.behaviors import clean_subsample

    clean = clean_subsample(data / "train" / "clean.jsonl", n_clean, seed=seed)
    rows = [{"id": ex.id, "messages": [dict(m) for m in ex.messages]} for ex in clean]
    plant_file = data / "behaviors" / behavior / "plant.jsonl"
    plants = [json.loads(x) for x in plant_file.read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    for label in (1, 0):
        pick = [r for r in plants if r["label"] == label]
        if len(pick) < n_plants:
            sys.exit(f"bench-peers: {plant_file} has only {len(pick)} plants of label {label}")
        for r in rng.sample(pick, n_plants):
            rows.append({"id": f"{behavior}/{r['id']}", "messages": r["messages"], "label": label})
    rng.shuffle(rows)
    return rows


def pick_pairs(path: Path, n: int | None, seed: int) -> list[dict]:
    """The pairs of ``path`` (all, or ``n`` of them drawn with ``seed``, in file order)."""
    import random

    pairs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if n is not None and n < len(pairs):
        keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
        pairs = [pairs[i] for i in keep]
    return [{k: p[k] for k in ("id", "prompt", "treatment", "control")} for p in pairs]


# One lensattr pipeline in a fresh process; writes its scores (row order) and wall-clock marks.
LENSATTR_PIPELINE = """
import json, sys, time
import lensattr
from lensattr.layers import layer_text
spec, train, pairs, out, mode, batch_size, max_length, sample, result = sys.argv[1:10]
kw = dict(batch_size=int(batch_size), max_length=int(max_length))
m = lensattr.load_model(spec, device="cpu", compute_dtype="float32")
marks, res = {}, {}
def scores(cache, r):
    return r.scores_of(range(len(cache))).float().tolist()
def choice(sel):  # auto ranks with its ensemble when it has one: say so
    one = f"{sel.method} @ L{layer_text(sel.layer)}"
    return f"mean of {len(sel.ensemble.members)}, best {one}" if sel.ensemble else one
if mode == "full":
    cache = lensattr.build_cache(m, train, out=out, progress=False, **kw)
    marks["build"] = time.time()
    sel = lensattr.select(m, cache, pairs, batch_size=kw["batch_size"], progress=False)
    r = lensattr.rank(cache, sel, top_k=None)
    marks["rank"] = time.time()
    res["auto"] = {"choice": choice(sel), "scores": scores(cache, r)}
    q = lensattr.behavior_query(m, pairs, progress=False, **kw)
    r = lensattr.rank(cache, q, top_k=None)
    marks["paper"] = time.time()
    res["paper"] = {"choice": f"{lensattr.PAPER} @ {r.layer}", "scores": scores(cache, r)}
    # the baselines a user tries first, each timed alone ("build": it needs the cache)
    from lensattr.baselines import LEXICAL, lexical_scores, lexical_select, repsim_select
    t0 = time.time()
    texts = [ex.response for ex in lensattr.load_examples(train)]  # the cache's row order
    pl = lensattr.load_pairs(pairs)
    t, c = [p.treatment for p in pl], [p.control for p in pl]
    kind, _ = lexical_select(texts, t, c)
    text = {k: lexical_scores(texts, t, c, k).tolist() for k in LEXICAL}
    sec = time.time() - t0
    res["text search"] = {"choice": f"{kind}, chosen without labels", "scores": text[kind],
                          "seconds": sec, "build": False}
    for k, s in text.items():
        res[f"text {k}"] = {"choice": k, "scores": s, "seconds": sec, "build": False}
    t0 = time.time()
    sel = repsim_select(cache, pairs, m, batch_size=kw["batch_size"], progress=False)
    r = lensattr.rank(cache, sel, top_k=None)
    res["RepSim"] = {"choice": choice(sel), "scores": scores(cache, r),
                     "seconds": time.time() - t0, "build": True}
else:
    from lensattr.build import DEFAULT_STATS
    n = None if mode == "gradfree" else int(sample)
    stats = DEFAULT_STATS if mode == "cheapgrad" else ("resid_post",)
    cache, q, sel = lensattr.select_then_cache(m, train, pairs, out=out, sample=n, stats=stats,
                                               progress=False, **kw)
    r = lensattr.rank(cache, q, top_k=None)
    marks["rank"] = time.time()
    res[mode] = {"choice": choice(sel), "scores": scores(cache, r)}
json.dump({"marks": marks, "results": res, "ids": list(cache.ids)}, open(result, "w"))
"""
CONTENDERS = ("bergson", "full", "gradfree", "cheap", "cheapgrad")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--venv", default=str(ROOT / ".venv-bergson"), help="bergson's venv")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="demo", help="demo, or a shared behaviour: medhallu, ...")
    ap.add_argument("--n-examples", type=int, default=264, help="demo examples (24 to 264)")
    ap.add_argument("--shared", default="../shared/data", help="the shared data")
    ap.add_argument("--clean", type=int, default=600, help="a behaviour's pool: clean examples")
    ap.add_argument("--plants", type=int, default=50, help="a behaviour's pool: plants per label")
    ap.add_argument("--pairs", type=int, default=None, help="query pairs (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="a behaviour's pool: subsample seed")
    ap.add_argument("--sample", type=int, default=64, help="the cheap path's sample")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None, help="default 512 (medhallu 1024)")
    ap.add_argument("--projection-dim", type=int, default=16)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=", ".join(CONTENDERS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every process")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        sys.exit(f"bench-peers: --contenders: unknown {unknown} (choose from {CONTENDERS})")
    if args.max_length is None:
        args.max_length = 1024 if args.data == "medhallu" else 512
    bergson = Path(args.venv) / "bin" / "bergson"
    if "bergson" in contenders and not bergson.exists():
        print(
            f"bench-peers: skipped: bergson's virtual environment {args.venv} is absent "
            "(`make bench-peers` creates it)"
        )
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model = lensattr.load_model(args.model, device="cpu", compute_dtype="float32")
    model_dir = Path(model.hf.name_or_path)
    if not (model_dir / "config.json").exists():
        sys.exit(f"bench-peers: {args.model} has no local directory for bergson ({model_dir})")
    work = Path(args.work or tempfile.mkdtemp(prefix="lensattr-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data == "demo":
        rows = demo_subset(args.n_examples)
        pair_rows = pick_pairs(bundled("demo/query.jsonl"), args.pairs, args.seed)
        what = f"{len(rows)} demo examples"
    else:
        shared = Path(args.shared)
        if not (shared / "behaviors" / args.data / "plant.jsonl").exists():
            known = sorted(p.name for p in (shared / "behaviors").glob("*/"))
            sys.exit(f"bench-peers: --data {args.data}: not demo nor a behaviour of {known}")
        rows = behavior_pool(shared, args.data, args.clean, args.plants, args.seed)
        pair_rows = pick_pairs(
            shared / "behaviors" / args.data / "query.jsonl", args.pairs, args.seed
        )
        what = f"{args.data} pool: {args.clean} clean + {2 * args.plants} plants (seed {args.seed})"
    labels = torch.tensor([r.get("label", -1) for r in rows])
    (work / "labels.json").write_text(json.dumps(labels.tolist()))  # for peers_paired.py
    train = write_jsonl(
        work / "train.jsonl", [{"id": r["id"], "messages": r["messages"]} for r in rows]
    )
    pairs_path = write_jsonl(work / "pairs.jsonl", pair_rows)
    sides = {
        side: write_jsonl(
            work / f"{side}.jsonl",
            [
                {
                    "id": p["id"],
                    "messages": [
                        {"role": "user", "content": p["prompt"]},
                        {"role": "assistant", "content": p[side]},
                    ],
                }
                for p in pair_rows
            ],
        )
        for side in ("treatment", "control")
    }
    tok = model.tokenizer

    def n_tokens(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    longest = max(n_tokens(r["messages"]) for r in rows)
    longest_pair = max(
        n_tokens([{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[s]}])
        for p in pair_rows
        for s in ("treatment", "control")
    )
    if max(longest, longest_pair) >= args.max_length:
        sys.exit(
            f"bench-peers: the longest example has {longest} tokens, the longest pair side "
            f"{longest_pair}: not below --max-length {args.max_length}"
        )
    print(
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads; "
        f"{model.name} from {model_dir}; {what} ({int((labels == 1).sum())} planted, "
        f"{int((labels == 0).sum())} decoys), longest {longest} tokens; {len(pair_rows)} query "
        f"pairs (longest side {longest_pair}); max length {args.max_length}; batch size "
        f"{args.batch_size}; fp32; cheap-path sample {args.sample}; work in {work}",
        flush=True,
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    bpython = str(Path(args.venv) / "bin" / "python")

    def bergson_build(data: Path, out: Path) -> dict:
        e = {**env, "HF_DATASETS_CACHE": str(out.parent / f"hf-datasets-{out.name}")}
        cmd = [str(bergson), "build", str(out), "--model", str(model_dir), "--dataset", str(data)]
        cmd += ["--conversation_column", "messages", "--truncation", "--precision", "fp32"]
        cmd += ["--projection_dim", str(args.projection_dim), "--max_batch_size"]
        # bergson refuses a token batch above the model's context (8,192 for SmolLM2)
        tokens = min(args.batch_size * args.max_length, model.hf.config.max_position_embeddings)
        cmd += [str(args.batch_size), "--token_batch_size", str(tokens)]
        return run_measured(cmd, e)

    def run_bergson(r: int) -> dict:
        out = work / f"bergson-{r}"
        build = bergson_build(train, out)
        procs = [build]
        for side, path in sides.items():
            procs.append(bergson_build(path, work / f"bergson-{r}-query-{side}"))
        scored = work / f"bergson-{r}-scores.json"
        cmd = [bpython, str(HERE / "peers_bergson_score.py"), str(out)]
        cmd += [str(work / f"bergson-{r}-query-{s}") for s in ("treatment", "control")]
        procs.append(run_measured(cmd + [str(scored)], env))
        res = {
            "build_s": build["seconds"],
            "pipeline_s": sum(p["seconds"] for p in procs),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
            "build_peak_rss_mb": build["peak_rss_mb"],
            "bytes": dir_bytes(out),
            "methods": {},
        }
        for mode, sc in json.loads(scored.read_text())["scores"].items():
            res["methods"][f"bergson {mode}"] = {
                "pipeline_s": res["pipeline_s"],
                **lensattr.pool_metrics(torch.tensor(sc), labels, coding="planted"),
                "scores": sc,
            }
        return res

    def run_lensattr(mode: str, r: int) -> dict:
        out = work / f"{mode}-{r}"
        result = work / f"{mode}-{r}.json"
        cmd = [sys.executable, "-c", LENSATTR_PIPELINE, args.model, str(train), str(pairs_path)]
        cmd += [str(out), mode, str(args.batch_size), str(args.max_length), str(args.sample)]
        t0 = time.time()
        proc = run_measured(cmd + [str(result)], env)
        got = json.loads(result.read_text())
        if got["ids"] != [row["id"] for row in rows]:
            sys.exit(f"bench-peers: {mode}: the cache's rows are not the pool's order")
        marks = got["marks"]
        res: dict = {
            "pipeline_s": proc["seconds"],
            "peak_rss_mb": proc["peak_rss_mb"],
            "bytes": dir_bytes(out),
            "methods": {},
        }
        if mode == "full":
            res["build_s"] = marks["build"] - t0
            res["pipeline_s"] = marks["rank"] - t0  # auto's pipeline; the paper's below
        for name, m in got["results"].items():
            seconds = res["pipeline_s"]
            if name == "paper":
                seconds = res["build_s"] + marks["paper"] - marks["rank"]
            elif "seconds" in m:  # a baseline, timed alone (after the cache when it needs one)
                seconds = m["seconds"] + (res["build_s"] if m["build"] else 0.0)
            who = "baseline" if "seconds" in m else "lensattr"
            res["methods"][f"{who} {name} ({m['choice']})"] = {
                "pipeline_s": seconds,
                **lensattr.pool_metrics(torch.tensor(m["scores"]), labels, coding="planted"),
                "scores": m["scores"],
            }
        return res

    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(args.rounds):
        for name in contenders if r % 2 == 0 else contenders[::-1]:
            res = run_bergson(r) if name == "bergson" else run_lensattr(name, r)
            runs[name].append(res)
            build = f"build {res['build_s']:7.1f} s  " if "build_s" in res else ""
            print(
                f"round {r + 1} {name:<9} {build}pipeline {res['pipeline_s']:7.1f} s  peak RSS "
                f"{res['peak_rss_mb']:6.0f} MB  disk {res['bytes'] / 2**20:6.1f} MiB",
                flush=True,
            )
            if args.out:
                Path(args.out).write_text(
                    json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str)
                )
    print_results(runs, labels)
    return 0


def print_results(runs: dict[str, list[dict]], labels: torch.Tensor) -> None:
    """Ratios against bergson (the fastest round of each side), and the metrics table."""

    def best(name: str, key: str) -> float:  # the fastest round; the highest peak RSS
        vals = [r[key] for r in runs.get(name, []) if key in r]
        return (max if "rss" in key else min)(vals) if vals else float("nan")

    if "bergson" in runs:
        b_build, b_pipe = best("bergson", "build_s"), best("bergson", "pipeline_s")
        b_rss = best("bergson", "build_peak_rss_mb")
        print(f"\nbergson: build {b_build:.1f} s, build + query + score {b_pipe:.1f} s")
        if "full" in runs:
            print(
                "lensattr build_cache / bergson build: time "
                f"{best('full', 'build_s') / b_build:.2f}"
                f"; peak RSS (lensattr's whole process) {best('full', 'peak_rss_mb'):.0f} / "
                f"{b_rss:.0f} MB ({best('full', 'peak_rss_mb') / b_rss:.2f}); disk "
                f"{runs['full'][-1]['bytes'] / 2**20:.1f} / "
                f"{runs['bergson'][-1]['bytes'] / 2**20:.1f} MiB"
            )
        for name in ("full", "gradfree", "cheap", "cheapgrad"):
            if name in runs:
                per_round = [
                    f"{a['pipeline_s'] / b['pipeline_s']:.2f}"
                    for a, b in zip(runs[name], runs["bergson"], strict=False)
                ]
                print(
                    f"pipeline {name:<8} / bergson: {best(name, 'pipeline_s') / b_pipe:.2f} "
                    f"(rounds: {', '.join(per_round)}); peak RSS "
                    f"{best(name, 'peak_rss_mb') / b_rss:.2f} of bergson's build; disk "
                    f"{runs[name][-1]['bytes'] / 2**20:.1f} MiB"
                )
    k = int((labels == 1).sum())
    print(f"\n{'method (last round)':<80}{'pipeline s':>11}  P@{k:<4}{'AP':>6}")
    for name in runs:
        for method, m in runs[name][-1]["methods"].items():
            print(f"{method:<80}{m['pipeline_s']:>11.1f}  {m['p_at_k']:<6.2f}{m['ap']:>6.3f}")
    if "bergson" not in runs:
        return
    modes = runs["bergson"][-1]["methods"]
    mine = {
        m: r for name in runs if name != "bergson" for m, r in runs[name][-1]["methods"].items()
    }
    print_paired(mine, modes, labels, width=80)


def print_paired(
    mine: dict[str, dict],
    modes: dict[str, dict],
    labels: torch.Tensor,
    *,
    n_boot: int = 1000,
    width: int = 66,
) -> None:
    """Each lensattr method minus bergson's best mode (picked with the labels: the benefit of the
    doubt), with 95% paired bootstrap intervals. ``mine`` and ``modes`` map a name to its
    :func:`lensattr.pool_metrics` plus its ``scores`` (one per pool row)."""
    best = max(modes, key=lambda m: (modes[m]["p_at_k"], modes[m]["ap"]))
    base = torch.as_tensor(modes[best]["scores"])
    k = int((labels == 1).sum())
    print(f"\nlensattr minus {best} ({n_boot:,} paired bootstrap resamples, 95% intervals)")
    for method, m in mine.items():
        d = lensattr.pool_metrics_difference(
            torch.as_tensor(m["scores"]), base, labels, n_boot=n_boot, coding="planted"
        )
        print(
            f"{method:<{width}} P@{k} {d['p_at_k']:+.2f} [{d['p_at_k_ci'][0]:+.2f}, "
            f"{d['p_at_k_ci'][1]:+.2f}]  AP {d['ap']:+.3f} [{d['ap_ci'][0]:+.3f}, "
            f"{d['ap_ci'][1]:+.3f}]"
        )


if __name__ == "__main__":
    sys.exit(main())
