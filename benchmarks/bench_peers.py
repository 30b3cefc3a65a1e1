"""lensattr against EleutherAI's bergson, side by side in ONE run (issue 14, item 1).

    make bench-peers                                   # creates .venv-bergson, then runs this
    python benchmarks/bench_peers.py --n-examples 72 --rounds 1    # a small run

Same model (SmolLM2-135M-Instruct, the local safetensors directory lensattr caches: nothing is
downloaded), same examples (the bundled demo set: every planted and decoy example plus the first
clean ones, in file order), same compute dtype (fp32 on CPU), same batch size, and no example
reaches the maximum length (checked), so both sides see the same tokens. In alternating rounds:

- lensattr: ``build_cache`` (all layers, default statistics, bf16 storage) in a fresh process;
- bergson: ``bergson build`` (per-example gradients of every linear module, randomly projected to
  ``--projection-dim`` per side, fp32 store) on a local jsonl with ``--conversation_column
  messages``, in its own virtual environment (``.venv-bergson``).

Each build's wall time (process start to exit: imports and model load included on both sides),
peak RSS (``wait4``) and bytes on disk. Then the behaviour query on the demo's pairs and the
precision@k / average precision of the 12 planted examples among the whole pool
(:func:`lensattr.pool_metrics`) for lensattr's ``auto`` (:func:`lensattr.select`), the paper's
residual change, and bergson's treatment-minus-control gradient query in four modes (plain dot,
unit-normalised, preconditioned, both; ``peers_bergson_score.py``).

Without ``.venv-bergson`` this prints one line saying so and exits 0.
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


LENSATTR_BUILD = """
import json, sys
from lensattr import build_cache, load_model
spec, train, out, batch_size, max_length = sys.argv[1:6]
m = load_model(spec, device="cpu", compute_dtype="float32")
build_cache(m, train, out=out, batch_size=int(batch_size), max_length=int(max_length),
            progress=False)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--venv", default=str(ROOT / ".venv-bergson"), help="bergson's venv")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-examples", type=int, default=264, help="demo examples (24 to 264)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--projection-dim", type=int, default=16)
    ap.add_argument("--parts", default="builds,queries", help="builds: the timed builds only")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    bergson = Path(args.venv) / "bin" / "bergson"
    if not bergson.exists():
        print(
            f"bench-peers: skipped: bergson's virtual environment {args.venv} is absent "
            "(`make bench-peers` creates it)"
        )
        return 0
    model = lensattr.load_model(args.model, device="cpu", compute_dtype="float32")
    model_dir = Path(model.hf.name_or_path)
    if not (model_dir / "config.json").exists():
        sys.exit(f"bench-peers: {args.model} has no local directory for bergson ({model_dir})")
    work = Path(tempfile.mkdtemp(prefix="lensattr-peers-"))
    rows = demo_subset(args.n_examples)
    labels = torch.tensor([r.get("label", -1) for r in rows])
    train = write_jsonl(
        work / "train.jsonl", [{"id": r["id"], "messages": r["messages"]} for r in rows]
    )
    pairs_path = bundled("demo/query.jsonl")
    pairs = lensattr.load_pairs(pairs_path)
    sides = {
        side: write_jsonl(
            work / f"{side}.jsonl",
            [
                {
                    "id": p.id,
                    "messages": [
                        {"role": "user", "content": p.prompt},
                        {"role": "assistant", "content": getattr(p, side)},
                    ],
                }
                for p in pairs
            ],
        )
        for side in ("treatment", "control")
    }
    tok = model.tokenizer
    longest = max(
        len(
            tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
        )
        for r in rows
    )
    if longest >= args.max_length:
        sys.exit(f"bench-peers: the longest example has {longest} tokens >= --max-length")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {model.name} from "
        f"{model_dir}; {len(rows)} demo examples ({int((labels == 1).sum())} planted, "
        f"{int((labels == 0).sum())} decoys), longest {longest} tokens < max length "
        f"{args.max_length}; {len(pairs)} query pairs; batch size {args.batch_size}; fp32"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
    }

    def bergson_build(data: Path, out: Path) -> dict:
        e = {**env, "HF_DATASETS_CACHE": str(out.parent / f"hf-datasets-{out.name}")}
        cmd = [str(bergson), "build", str(out), "--model", str(model_dir), "--dataset", str(data)]
        cmd += ["--conversation_column", "messages", "--truncation", "--precision", "fp32"]
        cmd += ["--projection_dim", str(args.projection_dim), "--max_batch_size"]
        cmd += [str(args.batch_size), "--token_batch_size", str(args.batch_size * args.max_length)]
        return run_measured(cmd, e)

    def lensattr_build(out: Path) -> dict:
        cmd = [sys.executable, "-c", LENSATTR_BUILD, args.model, str(train), str(out)]
        return run_measured(cmd + [str(args.batch_size), str(args.max_length)], env)

    runs: dict[str, list[dict]] = {"lensattr": [], "bergson": []}
    for r in range(args.rounds):
        for name in ("lensattr", "bergson") if r % 2 == 0 else ("bergson", "lensattr"):
            out = work / f"{name}-{r}"
            res = bergson_build(train, out) if name == "bergson" else lensattr_build(out)
            res["bytes"] = dir_bytes(out)
            res["out"] = out
            runs[name].append(res)
            print(
                f"round {r + 1} {name:<9} build {res['seconds']:7.1f} s  peak RSS "
                f"{res['peak_rss_mb']:6.0f} MB  disk {res['bytes'] / 2**20:6.1f} MiB"
            )

    results: dict[str, dict] = {}
    if "queries" in args.parts.split(","):
        results = queries(
            model, runs, rows, labels, pairs_path, sides, work, env, bergson_build, args=args
        )
    print_results(runs, results, labels)
    if args.out:
        for name in runs:
            for res in runs[name]:
                res.pop("log")
                res["out"] = str(res["out"])
        Path(args.out).write_text(json.dumps({"builds": runs, "queries": results}, indent=1))
    return 0


def queries(model, runs, rows, labels, pairs_path, sides, work, env, bergson_build, *, args):
    """The behaviour query on both sides, scored over the pool of the last round's builds."""
    bpython = str(Path(args.venv) / "bin" / "python")
    # lensattr's side of the query: choose (auto) and rank; the paper's fixed method.
    cache = lensattr.open_cache(runs["lensattr"][-1]["out"])
    ids = [r["id"] for r in rows]
    assert list(cache.manifest["ids"]) == ids, "the cache's rows are not the demo subset's order"

    def full_scores(ranking: lensattr.Ranking) -> torch.Tensor:
        return ranking.scores_of(range(len(ids))).float()

    results: dict[str, dict] = {}
    t = time.perf_counter()
    sel = lensattr.select(model, cache, pairs_path, progress=False)
    ranking = lensattr.rank(cache, sel, top_k=None)
    results[f"lensattr auto ({sel.method} @ {sel.layer})"] = {
        "seconds": time.perf_counter() - t,
        **lensattr.pool_metrics(full_scores(ranking), labels),
    }
    t = time.perf_counter()
    q = lensattr.behavior_query(
        model, pairs_path, max_length=args.max_length, batch_size=args.batch_size, progress=False
    )
    ranking = lensattr.rank(cache, q, top_k=None)
    results[f"lensattr paper ({lensattr.PAPER} @ {ranking.layer})"] = {
        "seconds": time.perf_counter() - t,
        **lensattr.pool_metrics(full_scores(ranking), labels),
    }

    # bergson's side: gradients of the pairs' two sides (same projection seed), then score.
    t = time.perf_counter()
    qdirs = {}
    for side, path in sides.items():
        qdirs[side] = work / f"bergson-query-{side}"
        bergson_build(path, qdirs[side])
    scored = work / "bergson-scores.json"
    cmd = [bpython, str(HERE / "peers_bergson_score.py"), str(runs["bergson"][-1]["out"])]
    run_measured(cmd + [str(qdirs["treatment"]), str(qdirs["control"]), str(scored)], env)
    query_seconds = time.perf_counter() - t
    for mode, s in json.loads(scored.read_text())["scores"].items():
        results[f"bergson {mode}"] = {
            "seconds": query_seconds,
            **lensattr.pool_metrics(torch.tensor(s), labels),
        }
    return results


def print_results(runs: dict[str, list[dict]], results: dict[str, dict], labels) -> None:
    def best(name: str, key: str) -> float:  # the fastest round; the highest peak RSS
        return (max if key == "peak_rss_mb" else min)(r[key] for r in runs[name])

    ratio = best("lensattr", "seconds") / best("bergson", "seconds")
    print(
        f"\nbuild time lensattr / bergson (fastest round each): {ratio:.2f}; highest peak RSS "
        f"{best('lensattr', 'peak_rss_mb'):.0f} / {best('bergson', 'peak_rss_mb'):.0f} MB "
        f"({best('lensattr', 'peak_rss_mb') / best('bergson', 'peak_rss_mb'):.2f}); disk "
        f"{runs['lensattr'][-1]['bytes'] / 2**20:.1f} / {runs['bergson'][-1]['bytes'] / 2**20:.1f}"
        " MiB"
    )
    k = int((labels == 1).sum())
    print(f"\n{'query (all pairs; seconds: query + rank)':<72}{'s':>6}  P@{k:<4}{'AP':>6}")
    for name, m in results.items():
        print(f"{name:<72}{m['seconds']:>6.1f}  {m['p_at_k']:<6.2f}{m['ap']:>6.3f}")


if __name__ == "__main__":
    sys.exit(main())
