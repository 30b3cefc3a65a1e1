"""The benchmark run: every behaviour ranked inside a realistic pool, then the fine-tuning effect.

Every step writes its output under ``OUT`` and is skipped when that output exists, so a killed
run rerun with the same command resumes. Layout::

    pool.jsonl, pool-labels.json     every behaviour's plants, then the whole clean corpus
    cache/                           lensattr cache of the pool (all default stats, the layers)
    pairs/{b}.safetensors            the query pairs' statistics (lensattr.pair_stats)
    personas/{b}.safetensors         persona queries (trait specs only)
    trak/pool.safetensors, trak/{b}.safetensors  projected per-example gradients (optional)
    ranking/{b}.json                 auto's choice and every method's pool metrics per layer
    ft/{b}/{method}-s{seed}.json     fine-tuning effect (trait score on heldout pairs)
    cost.json                        seconds per step

The bench uses lensattr's public API only (``pair_stats``, ``behavior_query``, ``select``,
``rank``, the registries), so any registered query rule, statistic or score is benchmarked by name.
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

from lensattr import (
    PairStats,
    Query,
    behavior_query,
    build_cache,
    load_examples,
    load_model,
    pair_stats,
)
from lensattr.backends.models import Model
from lensattr.bench.behaviors import Behaviour, clean_subsample, default_sources, load_behaviour
from lensattr.config import CaptureConfig, ints_list, names_list
from lensattr.data import Example
from lensattr.layers import parse_layers

logger = logging.getLogger(__name__)


def _int(text: str) -> int | None:
    """An integer flag that also takes ``none``."""
    return None if text.lower() == "none" else int(text)


def _names(text: str) -> list[str] | None:
    return names_list(text) or None


@dataclass
class BenchConfig:
    """Settings of a benchmark run (recorded in ``results.json``).

    Attributes:
        model: model spec for :func:`~lensattr.load_model`.
        data: data root with ``train/clean.jsonl``, ``behaviors/*`` and ``traits/*.json``.
        behaviours: names to run (default: all under ``data``).
        n_clean: clean examples in the pool (default: the whole clean corpus).
        max_plants: cap on plants per behaviour, class-balanced (50 label-1 + 50 label-0).
        n_query: query pairs per behaviour (the query and every choice made without labels).
        layers: layer spec (default every 3rd block from 9).
        max_length, batch_size: truncation and batch size of every capture.
        methods: ``query|stat|score`` methods of the grid (default: every registered candidate).
        k: top-k of the fine-tuning selection.
        persona_tokens, persona_questions: persona-vector generation settings.
        trak, trak_dim, trak_blocks: run the TRAK baseline, its projection dimension and how many
            blocks' ``v_proj`` weights it differentiates.
        random_seeds: seeds of the random-selection baseline.
        n_boot: bootstrap resamples for the precision intervals.
        ft_behaviours, ft_methods, ft_seeds, ft_steps, ft_lr, ft_rank, ft_heldout: fine-tuning
            effect settings (``ft_behaviours`` empty: skip it).
        seed: seed of the clean subsample.
    """

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "the model"})
    data: str = field(default="../shared/data", metadata={"help": "data root"})
    behaviours: list[str] | None = field(
        default=None, metadata={"help": "comma-separated names (default: all)", "type": _names}
    )
    n_clean: int | None = field(
        default=None,
        metadata={"help": "clean examples in the pool (None: the whole corpus)", "type": _int},
    )
    max_plants: int | None = field(
        default=100, metadata={"help": "plants per behaviour (label 1 + 0)", "type": _int}
    )
    n_query: int = field(default=48, metadata={"help": "query pairs per behaviour", "type": int})
    layers: str | None = field(
        default=None, metadata={"help": "layer spec (None: every 3rd block from 9)"}
    )
    max_length: int = field(default=128, metadata={"help": "truncation", "type": int})
    batch_size: int = field(default=8, metadata={"help": "batch size", "type": int})
    methods: list[str] | None = field(
        default=None,
        metadata={
            "help": "comma-separated 'query|stat|score' methods of the grid (None: every "
            "registered candidate)",
            "type": _names,
        },
    )
    k: int = field(default=50, metadata={"help": "top-k of the fine-tuning selection", "type": int})
    persona_tokens: int = field(
        default=32, metadata={"help": "persona generation length", "type": int}
    )
    persona_questions: int = field(
        default=3, metadata={"help": "persona questions per trait", "type": int}
    )
    persona: bool = field(default=True, metadata={"help": "run the persona baseline"})
    trak: bool = field(default=False, metadata={"help": "run the TRAK baseline (slow on a CPU)"})
    trak_dim: int = field(default=512, metadata={"help": "TRAK projection dimension", "type": int})
    trak_blocks: int = field(
        default=3, metadata={"help": "blocks whose v_proj TRAK differentiates", "type": int}
    )
    random_seeds: int = field(
        default=5, metadata={"help": "seeds of the random-selection baseline", "type": int}
    )
    n_boot: int = field(default=500, metadata={"help": "bootstrap resamples", "type": int})
    ft_behaviours: list[str] = field(
        default_factory=list,
        metadata={
            "help": "behaviours for the fine-tuning effect (comma-separated)",
            "type": names_list,
        },
    )
    ft_methods: list[str] = field(
        default_factory=lambda: ["auto", "paper", "residual_diff|resid_post|cosine", "random"],
        metadata={
            "help": "methods to fine-tune on: auto, paper, random, trak, persona or "
            "'query|stat|score'",
            "type": names_list,
        },
    )
    ft_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "fine-tuning seeds", "type": ints_list}
    )
    ft_steps: int = field(default=20, metadata={"help": "fine-tuning steps", "type": int})
    ft_lr: float = field(
        default=3e-4, metadata={"help": "fine-tuning learning rate", "type": float}
    )
    ft_rank: int = field(default=8, metadata={"help": "LoRA rank", "type": int})
    ft_heldout: int = field(
        default=32, metadata={"help": "held-out prompts of the trait score", "type": int}
    )
    seed: int = field(default=0, metadata={"help": "seed of the clean subsample", "type": int})


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


def save_json(path: Path, obj: Any) -> None:
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
    """Write ``pool.jsonl`` (every behaviour's plants, then the clean corpus) and its labels
    (``{id: [owner, label]}``, owner ``"clean"`` with label -1); returns the labels."""
    labels_file = out / "pool-labels.json"
    if labels_file.exists():
        return json.loads(labels_file.read_text())
    clean_file = Path(cfg.data) / "train" / "clean.jsonl"
    clean = clean_subsample(clean_file, cfg.n_clean or 10**9, cfg.seed)
    pool: list[Example] = []
    owner: dict[str, list[Any]] = {}
    for b in behaviours:
        pool += b.plants
        owner.update({ex.id: [b.name, y] for ex, y in zip(b.plants, b.labels, strict=True)})
    pool += clean
    owner.update({ex.id: ["clean", -1] for ex in clean})
    _write_jsonl(out / "pool.jsonl", pool)
    save_json(labels_file, owner)
    return owner


def pool_layers(cfg: BenchConfig, model: Model) -> list[int]:
    """The benchmark's layers: ``cfg.layers`` or every 3rd block from 9 (the backward stops at
    the lowest cached layer, so the lowest third is left out to keep the pool cache cheap)."""
    if cfg.layers is None:
        return list(range(9, model.n_layers, 3))
    return sorted(parse_layers(cfg.layers, model.n_layers))


def prepare(
    cfg: BenchConfig, out: Path, model: Model | None = None, *, trak_now: bool = True
) -> dict[str, Any]:
    """Every cached input of the ranking (resumable); returns a dict of handles.

    ``trak_now=False`` leaves the TRAK gradients for later (:func:`run_trak`).
    """
    out.mkdir(parents=True, exist_ok=True)
    costs = Costs(out / "cost.json")
    model = model or load_model(cfg.model)
    layers = pool_layers(cfg, model)
    behaviours = load_behaviours(cfg)
    owner = build_pool(cfg, behaviours, out)
    # one set of capture settings for the pool, the query pairs and the personas
    kw: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "config": CaptureConfig(layers=layers, max_length=cfg.max_length),
    }
    say(f"pool: {len(owner)} examples, layers {layers}, behaviours {[b.name for b in behaviours]}")
    say("caching the pool (forward + activation backward, every default statistic)")
    cache = costs.timed(
        "cache_pool",
        lambda: build_cache(model, out / "pool.jsonl", out=out / "cache", on_error="skip", **kw),
    )
    pairs: dict[str, PairStats] = {}
    personas: dict[str, Query | None] = {}

    def step(f: Path, what: str, cost: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once and save its result (PairStats or Query) at ``f``; reruns reuse it."""
        if not f.exists():
            say(what)
            f.parent.mkdir(parents=True, exist_ok=True)
            costs.timed(cost, fn).save(f)

    for b in behaviours:
        f = out / "pairs" / f"{b.name}.safetensors"
        n = min(cfg.n_query, len(b.query))
        query = b.query[: cfg.n_query]
        step(
            f,
            f"{b.name}: query-pair statistics ({n} pairs)",
            f"pairs_{b.name}",
            lambda: pair_stats(model, query, stats=cache.stats, **kw),  # noqa: B023
        )
        pairs[b.name] = PairStats.load(f)
        personas[b.name] = None
        if cfg.persona and b.persona is not None:
            f = out / "personas" / f"{b.name}.safetensors"
            spec = b.persona
            step(
                f,
                f"{b.name}: persona query (greedy replies under system prompts)",
                f"persona_{b.name}",
                lambda: behavior_query(
                    model,
                    spec,  # noqa: B023  (step calls it at once)
                    query="persona",
                    max_new_tokens=cfg.persona_tokens,
                    **kw,
                ),
            )
            personas[b.name] = Query.load(f)
    trak = None
    if cfg.trak and trak_now:
        trak = run_trak(model, cfg, out, cache, behaviours, costs)
    return {
        "model": model,
        "cache": cache,
        "layers": layers,
        "owner": owner,
        "replies": {ex.id: ex.response for ex in load_examples(out / "pool.jsonl")},
        "behaviours": behaviours,
        "pairs": pairs,
        "personas": personas,
        "trak": trak,
        "costs": costs,
    }


def run_trak(
    model: Model, cfg: BenchConfig, out: Path, cache: Any, behaviours: list[Behaviour], costs: Costs
) -> dict[str, Any]:
    """Projected per-example gradients of the pool (cache row order) and of each query."""
    from lensattr.bench.trak import Projector, default_targets, n_params, projected_grads

    targets = default_targets(model, cfg.trak_blocks)
    proj = Projector(n_params(model, targets), cfg.trak_dim, cfg.seed)
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "max_length": cfg.max_length}
    pool_path = out / "trak" / "pool.safetensors"
    if not pool_path.exists():
        say(f"TRAK: per-example gradients of {len(cache)} pool examples w.r.t. {targets}")
        table = {ex.id: ex for ex in load_examples(out / "pool.jsonl")}
        t0 = time.perf_counter()
        g = projected_grads(model, [table[i] for i in cache.ids], targets, proj, **kw)
        sec = time.perf_counter() - t0
        costs.record("trak_pool", sec)
        _cached_pt(pool_path, lambda: {"grads": g, "seconds": sec, "n": len(g)})
    pool = load_nested(pool_path)
    qs = {}
    for b in behaviours:
        sides = [p.sides() for p in b.query[: cfg.n_query]]
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


def subpools(h: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{behaviour: (cache rows of the clean corpus + its own plants, labels 1/0/-1)}``."""
    owner = h["owner"]
    out = {}
    for b in h["behaviours"]:
        idx = [k for k, i in enumerate(h["cache"].ids) if owner[i][0] in ("clean", b.name)]
        lab = [owner[h["cache"].ids[k]][1] for k in idx]
        out[b.name] = (torch.tensor(idx), torch.tensor(lab))
    return out


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return asdict(cfg)
