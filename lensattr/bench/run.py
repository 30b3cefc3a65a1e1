"""The benchmark run: planted recovery over the whole grid, then the fine-tuning effect.

Every step writes its output under ``OUT`` and is skipped when that output exists, so a killed
run rerun with the same command resumes. Layout::

    pool.jsonl, pool-labels.json     clean subsample + every behaviour's plants
    cache/                           lensattr cache of the pool (all default stats, chosen layers)
    greedy.jsonl, cache-greedy/      the model's own greedy reply to every pool prompt (resid_post)
    queries/{b}.safetensors          query-pair statistics (treatment / control sides)
    personas/{b}.safetensors         persona vectors (when the behaviour has system prompts)
    trak/pool.safetensors, trak/{b}.safetensors  projected per-example gradients
    grid/layer-{l}.json              every method's metrics at layer l
    ft/{b}/{method}-s{seed}.json     fine-tuning effect (trait score on heldout pairs)
    cost.json                        seconds per step
"""

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lensattr.bench.behaviors import Behaviour, clean_subsample, default_sources, load_behaviour
from lensattr.cache import build_cache, open_cache, resolve_layers
from lensattr.data import Example, load_examples
from lensattr.models import Model, load_model

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """Settings of a benchmark run (recorded in ``results.json``).

    Attributes:
        model: model spec for :func:`~lensattr.load_model`.
        data: data root with ``train/clean.jsonl``, ``behaviors/*`` and ``traits/*.json``.
        behaviours: names to run (default: all under ``data``).
        n_clean: size of the seeded clean subsample in every ranking pool.
        max_plants: cap on plants per behaviour (``None``: all; a capped run keeps both classes).
        n_query: query pairs per behaviour used for psi and for the layer choice.
        layers: layer spec (default every 3rd block).
        max_length, batch_size: truncation and batch size of every capture.
        k: top-k for precision / recall (capped at the number of label-1 plants) and fine-tuning.
        gen_tokens: ``max_new_tokens`` of the greedy replies behind ``projdiff``.
        projdiff: run the ``projdiff`` column (one greedy generation per pool prompt).
        persona_tokens, persona_questions: persona-vector generation settings.
        trak, trak_dim, trak_blocks: run the TRAK baseline, its projection dimension and how many
            blocks' ``v_proj`` weights it differentiates.
        random_seeds: seeds of the random-selection baseline.
        n_boot: bootstrap resamples for AUROC intervals (at the chosen layer).
        ft_behaviours, ft_methods, ft_seeds, ft_steps, ft_lr, ft_rank, ft_heldout: fine-tuning
            effect settings (``ft_behaviours`` empty: skip it).
        seed: seed of the clean subsample.
    """

    model: str = "smollm2-135m-instruct"
    data: str = "../shared/data"
    behaviours: list[str] | None = None
    n_clean: int = 200
    max_plants: int | None = None
    n_query: int = 48
    layers: str | None = None
    max_length: int = 192
    batch_size: int = 8
    k: int = 50
    gen_tokens: int = 24
    persona_tokens: int = 32
    persona_questions: int = 3
    projdiff: bool = True
    trak: bool = True
    trak_dim: int = 512
    trak_blocks: int = 3
    random_seeds: int = 5
    n_boot: int = 500
    ft_behaviours: list[str] = field(default_factory=list)
    ft_methods: list[str] = field(
        default_factory=lambda: [
            "residual_change|residual_change|cosine",
            "residual_diff|resid_post|cosine",
            "trak",
            "random",
        ]
    )
    ft_seeds: list[int] = field(default_factory=lambda: [0, 1])
    ft_steps: int = 30
    ft_lr: float = 3e-4
    ft_rank: int = 8
    ft_heldout: int = 48
    seed: int = 0


class Costs:
    """Seconds per step, persisted in ``cost.json`` (a resumed step keeps its first cost)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, name: str, seconds: float) -> None:
        """Set a step's cost (measured elsewhere) and persist it."""
        self.data[name] = seconds
        self.path.write_text(json.dumps(self.data, indent=1))

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.data[name] = self.data.get(name, 0.0) + time.perf_counter() - t0
        self.path.write_text(json.dumps(self.data, indent=1))
        return out


def say(msg: str) -> None:
    """A progress line (the benchmark is a long job; it says what it is doing)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _key(k: Any) -> str:
    return f"i:{k}" if isinstance(k, int) else f"s:{k}"


def _unkey(k: str) -> Any:
    return int(k[2:]) if k.startswith("i:") else k[2:]


def save_nested(path: Path, obj: dict[Any, Any]) -> None:
    """Save nested dicts (str/int keys) of tensors and JSON leaves as safetensors, atomically.

    Tensors go to the safetensors payload, other leaves to its JSON metadata: no pickle.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    leaves: dict[str, Any] = {}

    def walk(x: Any, key: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}/{_key(k)}")
        elif isinstance(x, torch.Tensor):
            tensors[key] = x.detach().cpu().contiguous()
        else:
            leaves[key] = x

    walk(obj, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"leaves": json.dumps(leaves)})
    tmp.replace(path)


def load_nested(path: Path) -> dict[Any, Any]:
    """The inverse of :func:`save_nested`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        leaves = json.loads((fh.metadata() or {}).get("leaves", "{}"))
    root: dict[Any, Any] = {}
    for key, value in [*load_file(str(path)).items(), *leaves.items()]:
        parts = [_unkey(p) for p in key.strip("/").split("/")]
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return root


def _cached_pt(path: Path, fn: Callable[[], Any]) -> Any:
    """``fn()``, saved at ``path`` (safetensors) and read back on later runs."""
    if path.exists():
        return load_nested(path)
    out = fn()
    save_nested(path, out)
    return out


def load_behaviours(cfg: BenchConfig) -> list[Behaviour]:
    """The behaviours of a config, with plants capped (class-balanced) to ``max_plants``."""
    out = []
    for src in default_sources(cfg.data):
        b = load_behaviour(src, n_persona_questions=cfg.persona_questions)
        if cfg.behaviours and b.name not in cfg.behaviours:
            continue
        if cfg.max_plants is not None and len(b.plants) > cfg.max_plants:
            rng = random.Random(cfg.seed)
            keep: list[int] = []
            for lab in (1, 0):
                ids = [i for i, y in enumerate(b.labels) if y == lab]
                keep += rng.sample(ids, min(len(ids), cfg.max_plants // 2))
            keep.sort()
            b.plants = [b.plants[i] for i in keep]
            b.labels = [b.labels[i] for i in keep]
        out.append(b)
    if not out:
        raise ValueError(f"no behaviours found under {cfg.data} (asked for {cfg.behaviours})")
    return out


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"id": ex.id, "messages": [dict(m) for m in ex.messages]}) + "\n")


def build_pool(cfg: BenchConfig, behaviours: list[Behaviour], out: Path) -> dict[str, Any]:
    """Write ``pool.jsonl`` (clean subsample + all plants) and its labels; returns the labels."""
    labels_file = out / "pool-labels.json"
    if labels_file.exists():
        return json.loads(labels_file.read_text())
    clean = clean_subsample(Path(cfg.data) / "train" / "clean.jsonl", cfg.n_clean, cfg.seed)
    pool = list(clean)
    owner: dict[str, list[Any]] = {ex.id: ["clean", -1] for ex in clean}
    for b in behaviours:
        pool += b.plants
        owner.update({ex.id: [b.name, y] for ex, y in zip(b.plants, b.labels, strict=True)})
    _write_jsonl(out / "pool.jsonl", pool)
    _save_json(labels_file, owner)
    return owner


def greedy_replies(model: Model, cfg: BenchConfig, out: Path) -> Path:
    """The model's own greedy reply to every pool prompt (``greedy.jsonl``, appended per batch)."""
    from tqdm.auto import tqdm

    from lensattr.persona import generate

    path = out / "greedy.jsonl"
    done = set()
    if path.exists():
        done = {json.loads(x)["id"] for x in path.read_text().splitlines() if x.strip()}
    todo = [ex for ex in load_examples(out / "pool.jsonl") if ex.id not in done]
    todo.sort(key=lambda ex: len(ex.messages[-2]["content"]))
    bs = max(cfg.batch_size, 8)
    with path.open("a", encoding="utf-8") as fh:
        for i in tqdm(range(0, len(todo), bs), desc="greedy replies"):
            chunk = todo[i : i + bs]
            replies = generate(
                model,
                [[dict(m) for m in ex.messages[:-1]] for ex in chunk],
                cfg.gen_tokens,
                batch_size=bs,
            )
            for ex, r in zip(chunk, replies, strict=True):
                msgs = [dict(m) for m in ex.messages[:-1]] + [
                    {"role": "assistant", "content": r or "."}
                ]  # an empty reply stands as "."
                fh.write(json.dumps({"id": ex.id, "messages": msgs}) + "\n")
            fh.flush()
    return path


def pool_layers(cfg: BenchConfig, model: Model) -> list[int]:
    """The benchmark's layers: ``cfg.layers`` or every 3rd block."""
    if cfg.layers is None:
        return list(range(0, model.n_layers, 3))
    return resolve_layers(cfg.layers, model.n_layers)


def prepare(
    cfg: BenchConfig, out: Path, model: Model | None = None, *, trak_now: bool = True
) -> dict[str, Any]:
    """Every cached input of the grid (resumable); returns a dict of handles.

    ``trak_now=False`` leaves the TRAK gradients for later (:func:`run_trak`).
    """
    from lensattr.bench.grid import persona_vectors, query_stats

    out.mkdir(parents=True, exist_ok=True)
    costs = Costs(out / "cost.json")
    model = model or load_model(cfg.model)
    layers = pool_layers(cfg, model)
    behaviours = load_behaviours(cfg)
    owner = build_pool(cfg, behaviours, out)
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "max_length": cfg.max_length}
    say(f"pool: {len(owner)} examples, layers {layers}, behaviours {[b.name for b in behaviours]}")
    say("caching the pool (forward + activation backward, 4 statistics)")
    cache = costs.timed(
        "cache_pool",
        lambda: build_cache(
            model, out / "pool.jsonl", out=out / "cache", layers=layers, on_error="skip", **kw
        ),
    )
    gcache = None
    if cfg.projdiff:
        say("greedy replies to every pool prompt (for projdiff)")
        costs.timed("greedy_generate", lambda: greedy_replies(model, cfg, out))
        gcache = costs.timed(
            "cache_greedy",
            lambda: build_cache(
                model,
                out / "greedy.jsonl",
                out=out / "cache-greedy",
                layers=layers,
                stats=["resid_post"],
                on_error="skip",
                **kw,
            ),
        )
    queries, personas = {}, {}
    for b in behaviours:
        say(f"{b.name}: query statistics ({min(cfg.n_query, len(b.query))} pairs)")
        queries[b.name] = costs.timed(
            f"query_{b.name}",
            lambda b=b: _cached_pt(  # type: ignore[misc]
                out / "queries" / f"{b.name}.safetensors",
                lambda: query_stats(model, b.query[: cfg.n_query], layers, **kw),
            ),
        )
        if b.persona is not None:
            say(f"{b.name}: persona vector (greedy generation under system prompts)")
            personas[b.name] = costs.timed(
                f"persona_{b.name}",
                lambda b=b: _cached_pt(  # type: ignore[misc]
                    out / "personas" / f"{b.name}.safetensors",
                    lambda: persona_vectors(
                        model, b.persona, layers, max_new_tokens=cfg.persona_tokens, **kw
                    ),
                ),
            )
        else:
            personas[b.name] = None
    trak = None
    if cfg.trak and trak_now:
        trak = run_trak(model, cfg, out, cache, behaviours, costs)
    return {
        "model": model,
        "cache": cache,
        "gcache": gcache,
        "layers": layers,
        "owner": owner,
        "behaviours": behaviours,
        "queries": queries,
        "personas": personas,
        "trak": trak,
        "costs": costs,
    }


def run_trak(
    model: Model, cfg: BenchConfig, out: Path, cache: Any, behaviours: list[Behaviour], costs: Costs
) -> dict[str, Any]:
    """Projected per-example gradients of the pool (cache row order) and of each query."""
    from lensattr.bench.trak import Projector, _n_params, default_targets, projected_grads

    targets = default_targets(model, cfg.trak_blocks)
    proj = Projector(_n_params(model, targets), cfg.trak_dim, cfg.seed)
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "max_length": cfg.max_length}
    pool_path = out / "trak" / "pool.safetensors"
    if not pool_path.exists():
        say(f"TRAK: per-example gradients of {len(cache)} pool examples w.r.t. {targets}")
        table = {ex.id: ex for ex in load_examples(out / "pool.jsonl")}
        t0 = time.perf_counter()
        g = projected_grads(model, [table[i] for i in cache.ids], targets, proj, **kw)
        sec = time.perf_counter() - t0
        costs.data["trak_pool"] = sec
        _cached_pt(pool_path, lambda: {"grads": g, "seconds": sec, "n": len(g)})
    pool = load_nested(pool_path)
    qs = {}
    for b in behaviours:
        pairs = b.query[: cfg.n_query]
        sides = [p.sides() for p in pairs]
        qs[b.name] = costs.timed(
            f"trak_query_{b.name}",
            lambda sides=sides, b=b: _cached_pt(  # type: ignore[misc]
                out / "trak" / f"{b.name}.safetensors",
                lambda: {
                    "t": projected_grads(model, [s[0] for s in sides], targets, proj, **kw),
                    "c": projected_grads(model, [s[1] for s in sides], targets, proj, **kw),
                },
            ),
        )
    return {
        "pool": pool["grads"],
        "seconds_per_example": pool["seconds"] / max(pool["n"], 1),
        "targets": targets,
        "n_params": proj.n,
        "queries": qs,
    }


def pool_rows(h: dict[str, Any], layer: int) -> dict[str, torch.Tensor]:
    """``{phi: [n_pool, d]}`` at ``layer`` in cache row order, ``projdiff`` included."""
    cache, gcache = h["cache"], h["gcache"]
    rows = {s: cache.stat(s, layer)[:].float() for s in cache.stats}
    if gcache is None:  # the projdiff column was not run
        return rows
    gpos = {i: k for k, i in enumerate(gcache.ids)}
    own = gcache.stat("resid_post", layer)[:].float()
    idx = torch.tensor([gpos.get(i, -1) for i in cache.ids])
    mine = torch.zeros_like(rows["resid_post"])
    mine[idx >= 0] = own[idx[idx >= 0]]  # an example whose greedy reply was skipped: minus 0
    rows["projdiff"] = rows["resid_post"] - mine
    return rows


def subpools(h: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{behaviour: (cache rows of clean + its plants, labels 1/0/-1)}``."""
    owner = h["owner"]
    out = {}
    for b in h["behaviours"]:
        idx = [k for k, i in enumerate(h["cache"].ids) if owner[i][0] in ("clean", b.name)]
        lab = [owner[h["cache"].ids[k]][1] for k in idx]
        out[b.name] = (torch.tensor(idx), torch.tensor(lab))
    return out


def open_prepared(out: Path) -> tuple[Any, Any]:
    """The two caches of a prepared run directory."""
    return open_cache(out / "cache", verify=False), open_cache(out / "cache-greedy", verify=False)


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return asdict(cfg)
