"""Performance benchmark: cache build vs the model's own forward + activation backward, and
query/ranking over millions of cached rows. Prints a table and ratios measured in ONE run.

    make bench-perf                      # SmolLM2-135M-Instruct, bundled corpus, CPU
    python benchmarks/bench_perf.py --quick --model tiny-random   # plumbing check (seconds)
    python benchmarks/bench_perf.py --device cuda --random-shape llama-3.1-8b   # on a GPU

(a) forward only; (b) the floor: plain torch forward + backward to the activations only
(frozen parameters, plain hooks, no storage) on the same length-bucketed batches and padding as
(c), with the LM head on every position ("full head") and only where a loss is taken ("sparse
head", as lensattr does), and with each batch's prompt prefix run forward-only (the work
lensattr's capture does for statistics pooled over the response; in build_cache's batches,
and in plain length batches to show what the grouping by prompt length gives);
(c) ``build_cache`` for all layers with the default statistics, written
to disk, again with ``resid_post`` only (no gradient: the forward only), and again for the last
third of the layers; (d) the TRAK-style baseline of
``lensattr.bench.trak`` when present; (e) one query + ranking over N synthetic 16-bit rows,
memory-mapped with precomputed norms, page cache warm and cold, with peak anonymous memory.
``--parts layers`` adds the build's cost against the lowest cached layer (``--lowest-layers``),
with the default statistics and with the forward-only one, and of a forward-only build of that
one layer (the forward stops after it).
Methods run in alternating rounds and the fastest round of each is kept (the machine is shared).
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lensattr import build_cache, load_examples, load_model
from lensattr.backends.prefix import cache_keyword, split_prompts
from lensattr.build import DEFAULT_STATS
from lensattr.demo import bundled
from lensattr.render import collate, encode, length_batches


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakAnon:
    """Sample RssAnon in a thread; ``peak`` in MB."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_anon_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_anon_mb())

    def __enter__(self) -> "PeakAnon":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon_mb())


def batches(model, examples, batch_size, max_length, by_reply=False):
    """The batches build_cache makes of one chunk (``by_reply``: those of a gradient build
    of response statistics, grouped by reply length)."""
    encs = [encode(model.tokenizer, ex, max_length) for ex in examples]
    out = [
        collate([encs[j] for j in idx], model.pad_id, "right", str(model.device))
        for idx in length_batches(encs, batch_size, by_reply=by_reply)
    ]
    return out, sum(len(e.ids) for e in encs)


def run_forward(model, bs) -> None:
    with torch.inference_mode():
        for b in bs:
            model.hf(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=b.position_ids,
                logits_to_keep=1,
            )


def run_floor(model, bs, layers, sparse_head: bool, prefix: bool = False) -> None:
    """Forward + backward to the activations only, hooks that keep nothing.

    ``prefix``: each row's positions before the one that predicts its first response token run
    forward without a graph, and the graph's pass continues from their keys and values: the
    same work as lensattr's capture for response statistics, its graph's pass written here in
    plain transformers calls (sparse head only; the prefix is lensattr's own,
    ``lensattr.backends.prefix.split_prompts``, itself plain transformers calls).
    """
    if prefix and not sparse_head:
        raise ValueError("the prefix floor takes the sparse head")
    hf = model.hf
    blocks = hf.model.layers
    lowest = min(layers)
    outs: list[torch.Tensor] = []

    def cut(mod, args, kwargs):
        x = args[0].detach().requires_grad_(True)
        return (x, *args[1:]), kwargs

    def keep(mod, args, out):
        outs.append(out[0] if isinstance(out, tuple) else out)

    handles = [blocks[lowest].register_forward_pre_hook(cut, with_kwargs=True)]
    handles += [blocks[layer].register_forward_hook(keep) for layer in layers]
    try:
        for b in bs:
            outs.clear()
            ids, mask, attention, kw = b.input_ids, b.mask, b.attention_mask, {}
            split = split_prompts(model, b, per_row=True) if prefix else None
            if split is not None:
                outs.clear()  # the prefix's block outputs are not differentiated
                ids, mask, attention = split.input_ids, split.mask, split.attention_mask
                kw = {"position_ids": split.position_ids, cache_keyword(hf.model): split.cache}
            with torch.enable_grad():
                if sparse_head:
                    h = hf.model(
                        input_ids=ids,
                        attention_mask=attention,
                        **({"position_ids": b.position_ids} | kw),
                    ).last_hidden_state
                    pred = mask[:, 1:]
                    logits = hf.lm_head(h[:, :-1][pred]).float()
                    nll = F.cross_entropy(logits, ids[:, 1:][pred], reduction="none")
                else:
                    logits = (
                        hf(
                            input_ids=b.input_ids,
                            attention_mask=b.attention_mask,
                            position_ids=b.position_ids,
                        )
                        .logits[:, :-1]
                        .float()
                    )
                    nll = F.cross_entropy(
                        logits.transpose(1, 2), b.input_ids[:, 1:], reduction="none"
                    )[b.mask[:, 1:]]
                torch.autograd.grad(nll.sum(), outs)
    finally:
        for h in handles:
            h.remove()


def timed(fn, *args) -> float:
    gc.collect()
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def build_peak_rss(model_spec: str, n: int, max_length: int, batch_size: int, device: str) -> dict:
    """(c) in a fresh process: peak RSS (ru_maxrss) for a corpus of ``n`` examples."""
    code = f"""
import json, tempfile, threading, time
from pathlib import Path
from lensattr import build_cache, load_examples, load_model
from lensattr.demo import bundled

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

m = load_model({model_spec!r}, device={device!r})
exs = (load_examples(bundled("demo/train.jsonl")) * 100)[:{n}]
exs = [type(e)(id=f"{{i}}-{{e.id}}", messages=e.messages) for i, e in enumerate(exs)]
base, peak, stop = rss(), [0.0], threading.Event()
def sample():
    while not stop.wait(0.02):
        peak[0] = max(peak[0], rss())
t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.perf_counter()
build_cache(m, exs, out=tempfile.mkdtemp(), max_length={max_length}, batch_size={batch_size},
            shard_size=64, progress=False)
stop.set()
t.join()
print(json.dumps({{"n": {n}, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": max(peak[0], rss()), "rss_before_build_mb": base}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def synthetic_cache(
    path: Path,
    n: int,
    d: int,
    shard_rows: int = 131072,
    layers: tuple[int, ...] = (0,),
    stats: tuple[str, ...] = ("synthetic",),
) -> dict:
    """Write an n x d bf16 cache (random rows at every layer and statistic) with the store's
    writer (:func:`lensattr.store.cache.write_cache`); return the model fingerprint it records."""
    from lensattr.config import CaptureConfig
    from lensattr.store.cache import write_cache

    gen = torch.Generator().manual_seed(0)
    parts: dict[str, dict[int, list[torch.Tensor]]] = {s: {la: [] for la in layers} for s in stats}
    for start in range(0, n, shard_rows):  # the draws in the order of the shards, as before
        m = min(shard_rows, n - start)
        for stat in stats:
            for layer in layers:
                rows = torch.randn((m, d), generator=gen)
                rows = (rows + 3.0 * torch.randn(d, generator=gen)).to(torch.bfloat16)
                parts[stat][layer].append(rows)
    model = {
        "name": "synthetic",
        "weights_sha256": "0",
        "tokenizer_sha256": "0",
        "chat_template_sha256": "0",
    }
    write_cache(
        path,
        [str(i) for i in range(n)],
        {s: {la: torch.cat(parts[s][la]) for la in layers} for s in stats},
        model=model,
        config=CaptureConfig(layers=layers, max_length=None),
        shard_size=shard_rows,
    )
    return model


def drop_page_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_ranking(n: int, d: int, workdir: Path) -> dict:
    from lensattr import open_cache, rank
    from lensattr.query import Query

    path = workdir / f"synthetic-{n}x{d}"
    t = time.perf_counter()
    model = synthetic_cache(path, n, d)
    write_s = time.perf_counter() - t
    vec = F.normalize(torch.randn(d), dim=0)
    q = Query(vectors={0: vec}, rule="synthetic", stat="synthetic", model=model, n_pairs=1)
    out = {
        "n": n,
        "d_model": d,
        "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir()),
        "write_s": write_s,
    }
    for label in ("cold", "warm", "warm2"):
        if label == "cold":
            drop_page_cache(path)
        gc.collect()
        with PeakAnon() as peak:
            base = rss_anon_mb()
            t = time.perf_counter()
            cache = open_cache(path, verify=False)
            r = rank(cache, q, layer=0, top_k=100)
            seconds = time.perf_counter() - t
        out[label + "_s"] = seconds
        out[label + "_peak_anon_extra_mb"] = peak.peak - base
        del cache
    out["warm_s"] = min(out.pop("warm_s"), out.pop("warm2_s"))
    out["warm_peak_anon_extra_mb"] = max(
        out["warm_peak_anon_extra_mb"], out.pop("warm2_peak_anon_extra_mb")
    )
    # correctness: the top id equals a direct full computation on a sample of shards
    out["top1"] = r.ids[0]
    out["fp32_matrix_mb"] = n * d * 4 / 2**20
    for f in path.iterdir():
        f.unlink()
    path.rmdir()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-shape", default=None, help="llama-3.1-8b: random init, no weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-examples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank-rows", type=int, default=1_000_000)
    ap.add_argument("--rank-dims", default="576,4096")
    ap.add_argument("--rss-sizes", default="32,128", help="corpus sizes for (c)'s peak RSS")
    ap.add_argument("--parts", default="timing,rss,rank", help="which parts to run (also: layers)")
    ap.add_argument(
        "--lowest-layers", default="0,10,20,-1", help="the layers part: lowest cached layers"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check only")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.n_examples, args.rounds, args.rank_rows, args.rss_sizes = 8, 1, 20000, "8,16"
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    if args.random_shape:
        model = random_shape_model(args.random_shape, args.device)
    else:
        model = load_model(args.model, device=args.device)
    examples = load_examples(bundled("demo/train.jsonl"))[: args.n_examples]
    bs, n_tokens = batches(model, examples, args.batch_size, args.max_length)
    by_reply, _ = batches(model, examples, args.batch_size, args.max_length, by_reply=True)
    layers = list(range(model.n_layers))
    upper = layers[-(model.n_layers // 3) :]
    print(
        f"model {model.name}: {model.n_layers} layers, d_model {model.d_model}; "
        f"{len(examples)} examples, {n_tokens} tokens, {len(bs)} batches of <= {args.batch_size}"
    )
    work = Path(tempfile.mkdtemp(prefix="lensattr-bench-"))

    def cache_all(stats=DEFAULT_STATS) -> None:
        build_cache(
            model,
            examples,
            out=tempfile.mkdtemp(dir=work),
            layers="all",
            stats=stats,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=False,
        )

    def cache_forward_only() -> None:
        cache_all(["resid_post"])  # needs no gradient: build_cache runs the forward only

    def cache_reply_only() -> None:
        # the defaults without the whole-sequence residual_change, whose pooling covers the
        # prompt: the rest read the reply positions, so the prompt's backward is skipped
        cache_all([s for s in DEFAULT_STATS if s != "residual_change"])

    def cache_from(lowest: int, stats, only: bool = False) -> float:
        t = time.perf_counter()
        build_cache(
            model,
            examples,
            out=tempfile.mkdtemp(dir=work),
            layers=[lowest] if only else list(range(lowest, model.n_layers)),
            stats=stats,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=False,
        )
        return time.perf_counter() - t

    def cache_upper() -> None:
        build_cache(
            model,
            examples,
            out=tempfile.mkdtemp(dir=work),
            layers=upper,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=False,
        )

    best: dict[str, float] = {}
    r: dict[str, float] = {}
    if "timing" in parts:
        methods = {
            "(a) forward only": lambda: run_forward(model, bs),
            "(b) floor, full head": lambda: run_floor(model, bs, layers, sparse_head=False),
            "(b) floor, sparse head": lambda: run_floor(model, bs, layers, sparse_head=True),
            "(b) floor, sparse head, prompt forward-only": lambda: run_floor(
                model, by_reply, layers, sparse_head=True, prefix=True
            ),
            "(b) floor, prompt forward-only, batched by length only": lambda: run_floor(
                model, bs, layers, sparse_head=True, prefix=True
            ),
            "(c) build_cache, all layers": cache_all,
            "(c) build_cache, forward only": cache_forward_only,
            "(c) build_cache, reply statistics only": cache_reply_only,
            "(b) floor, sparse head, last third": lambda: run_floor(model, bs, upper, True),
            "(c) build_cache, last third": cache_upper,
        }
        trak = trak_runner(model, examples, args)
        if trak is not None:
            methods["(d) TRAK-style projected grads"] = trak
        cache_all()  # warm-up: first nnsight trace, allocator
        run_floor(model, bs, layers, True)
        for _ in range(args.rounds):
            for name, fn in methods.items():
                best[name] = min(best.get(name, float("inf")), timed(fn))
        rows = [(name, s, n_tokens / s) for name, s in best.items()]
        print(f"\n{'step':<38}{'seconds':>9}{'tokens/s':>10}")
        for name, s, tps in rows:
            print(f"{name:<38}{s:>9.2f}{tps:>10.1f}")
        r = {
            "(c)/(b) full head": best["(c) build_cache, all layers"] / best["(b) floor, full head"],
            "(c)/(b) sparse head": best["(c) build_cache, all layers"]
            / best["(b) floor, sparse head"],
            "(c)/(b) prompt forward-only": best["(c) build_cache, all layers"]
            / best["(b) floor, sparse head, prompt forward-only"],
            "(c)/(a)": best["(c) build_cache, all layers"] / best["(a) forward only"],
            "(c) tokens/s fwd-only / gradient": best["(c) build_cache, all layers"]
            / best["(c) build_cache, forward only"],
            "whole sequence / reply only": best["(c) build_cache, all layers"]
            / best["(c) build_cache, reply statistics only"],
            "(c) reply only/(b) prompt forward-only": best["(c) build_cache, reply statistics only"]
            / best["(b) floor, sparse head, prompt forward-only"],
            "(c) last third / (c) all": best["(c) build_cache, last third"]
            / best["(c) build_cache, all layers"],
            "(c)/(b) last third, sparse": best["(c) build_cache, last third"]
            / best["(b) floor, sparse head, last third"],
        }
        if trak is not None:
            r["(d)/(c)"] = (
                best["(d) TRAK-style projected grads"] / best["(c) build_cache, all layers"]
            )
        print()
        for k, v in r.items():
            print(f"ratio {k:<32}{v:>7.3f}")
    sweep: list[dict] = []
    if "layers" in parts:
        # Issue 14 item 3: the build's cost against the lowest cached layer (the backward stops
        # there), for the default statistics and for the forward-only one; alternating rounds.
        lows = [int(x) % model.n_layers for x in args.lowest_layers.split(",")]
        kinds = {"default stats": list(DEFAULT_STATS), "resid_post only": ["resid_post"]}
        # and a forward-only build of that one layer: the forward stops after it
        kinds["resid_post, 1 layer"] = ["resid_post"]
        secs: dict[tuple[int, str], float] = {}
        cache_from(model.n_layers - 1, ["grad"])  # warm-up: first nnsight trace, allocator
        for r_ in range(args.rounds):
            for low in lows if r_ % 2 == 0 else lows[::-1]:
                for kind, stats in kinds.items():
                    key = (low, kind)
                    one = kind == "resid_post, 1 layer"
                    secs[key] = min(secs.get(key, float("inf")), cache_from(low, stats, one))
        base = secs[(min(lows), "default stats")]
        print(f"\n{'lowest layer':<14}{'statistics':<21}{'seconds':>9}{'tokens/s':>10}{'/ all':>8}")
        for (low, kind), s in sorted(secs.items()):
            sweep.append({"lowest": low, "stats": kind, "seconds": s, "tokens_per_s": n_tokens / s})
            print(f"{low:<14}{kind:<21}{s:>9.2f}{n_tokens / s:>10.1f}{s / base:>8.2f}")
    per_example = 2 * model.d_model + 4
    print(
        f"\nbytes on disk per example, layer and statistic: {per_example} "
        f"(bf16 row {2 * model.d_model} + fp32 norm 4); all layers x {len(DEFAULT_STATS)} stats: "
        f"{per_example * model.n_layers * len(DEFAULT_STATS)}"
    )
    rss = []
    if "rss" in parts and args.device == "cpu" and not args.random_shape:
        for n in [int(x) for x in args.rss_sizes.split(",")]:
            rss.append(build_peak_rss(args.model, n, args.max_length, args.batch_size, args.device))
            print(
                f"(c) peak RSS during the build at N={n}: {rss[-1]['peak_rss_mb']:.0f} MB "
                f"(before the build, model loaded: {rss[-1]['rss_before_build_mb']:.0f} MB)"
            )
    ranking = []
    for d in [] if "rank" not in parts else [int(x) for x in args.rank_dims.split(",")]:
        ranking.append(bench_ranking(args.rank_rows, d, work))
        e = ranking[-1]
        print(
            f"(e) rank {e['n']:,} x {d}: warm {e['warm_s']:.2f}s, cold {e['cold_s']:.2f}s; "
            f"peak anon +{e['warm_peak_anon_extra_mb']:.0f} MB warm / "
            f"+{e['cold_peak_anon_extra_mb']:.0f} MB cold "
            f"(fp32 matrix would be {e['fp32_matrix_mb']:.0f} MB); "
            f"{e['bytes_on_disk'] / e['n']:.0f} bytes/row on disk"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "setup": {
                        "model": model.name,
                        "n_layers": model.n_layers,
                        "d_model": model.d_model,
                        "examples": len(examples),
                        "device": args.device,
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__,
                        "rounds": args.rounds,
                        "bytes_per_row": per_example,
                    },
                    "seconds": best,
                    "tokens": n_tokens,
                    "ratios": r,
                    "rss": rss,
                    "ranking": ranking,
                    "lowest_layer_sweep": sweep,
                },
                indent=1,
            )
        )
    print(
        f"\npeak RSS of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


def trak_runner(model, examples, args):
    """(d): lensattr.bench.trak's projected per-example gradients (its default parameter subset
    and projection), timed on the same examples; None (and a line saying so) if unavailable."""
    try:
        from lensattr.bench.trak import Projector, default_targets, n_params, projected_grads
    except ImportError as err:
        print(f"(d) not run: lensattr.bench.trak is unavailable ({err})")
        return None
    targets = default_targets(model)
    projector = Projector(n_params(model, targets), dim=512, seed=0)
    print(
        f"(d) TRAK-style: {n_params(model, targets):,} parameters ({', '.join(targets)}), "
        "projected to 512 dimensions"
    )
    return lambda: projected_grads(
        model,
        examples,
        targets,
        projector,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=False,
    )


def random_shape_model(shape: str, device: str):
    """A randomly initialised model of a known shape in bf16 (no weights needed)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lensattr import load_model
    from lensattr.backends.models import smollm2_gguf_path
    from lensattr.testing import CHATML_TEMPLATE

    shapes = {
        "llama-3.1-8b": dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )
    }
    cfg = LlamaConfig(**shapes[shape])
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in hf.parameters():
        p.requires_grad_(False)
    gguf = smollm2_gguf_path()  # any chat tokenizer: ids < 49152
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template = tok.chat_template or CHATML_TEMPLATE
    hf.config.name_or_path = f"random {shape}"
    return load_model(hf.eval(), tok)


if __name__ == "__main__":
    main()
