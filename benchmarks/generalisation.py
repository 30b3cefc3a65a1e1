"""Does `auto` hold up on behaviours it was not tuned on? Leave-one-behaviour-out, over pool seeds.

Every behaviour of the shared data (MedHallu, the persona traits, the five trait specs) and the
study's own long-reply behaviours (:data:`OWN`: XSTest's over-refusal and unsafe compliance) is
ranked inside small realistic pools: ``--pool`` clean examples plus the behaviour's own plants
(``--plants`` label-1 and as many label-0 decoys for a folder behaviour, the 12 + 12 of a trait
spec), one pool per seed. Precision@k among the pool (k = the behaviour's label-1 count) judges
each ranking. Rows are captured once, into one superset cache; each pool is a cache of its own
whose rows are copied from it (``build_cache(..., reuse=)``), so its moments are its own.

Every choice rule and every constant a rule was tuned with is scored leave-one-behaviour-out:
fitted on the other behaviours, scored on the one left out. The in-sample number (fitted on all)
is printed beside it. Labels are read for metrics and for fitting a rule's constants on the
*other* behaviours only.

    python -m benchmarks.generalisation build --data ../shared/data --work runs/gen
    python -m benchmarks.generalisation score --work runs/gen --seeds 0,1,2
    python -m benchmarks.generalisation report --work runs/gen

``build`` captures (resumable); ``score`` writes ``cells.json`` (every candidate's criterion and
P@k, and the baselines') per pool; ``report`` fits and scores the rules, writes ``report.md``
and ``report.json``, and ends with issue 25's targets, each met or missed (:func:`targets`).
Public API only.
"""

import argparse
import functools
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import lensattr
from lensattr.bench.behaviors import clean_subsample, default_sources, load_behaviour
from lensattr.data import Example
from lensattr.ensemble import standardised
from lensattr.metrics import precision_at_k

STATS = (
    "residual_change",
    "residual_change_reply",
    "residual_change_printed",
    "resid_post",
    "grad",
)
SHARED_TEN = (
    "medhallu",
    "persona-narcissism",
    "persona-agreeableness",
    "persona-conscientiousness",
    "persona-psychopathy",
    "empathy",
    "laziness",
    "modesty",
    "preachiness",
    "sycophancy",
)
AUTHORS_DEPTH = 19 / 32  # their README's layer 19 of Llama-3.1-8B's 32 blocks


OWN = Path(__file__).parent / "behaviors"
"""The study's own behaviours beside the shared data's: long free-text replies built from public
data (``scripts/build_xstest.py``; their licence file is in that folder)."""


@functools.cache
def _behaviours(data: str, own: str) -> dict[str, Any]:
    """Every behaviour of the data folder and of the folder ``own`` (none if empty) by name,
    read once a process."""
    folders = sorted(p for p in Path(own).glob("*") if (p / "plant.jsonl").exists()) if own else []
    return {b.name: b for b in (load_behaviour(s) for s in [*default_sources(data), *folders])}


def _reply(ex: Example) -> str:
    return ex.messages[-1]["content"]


def _save(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------- build


def build(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = lensattr.load_model(args.model)
    behaviours = list(_behaviours(args.data, args.own).values())
    clean = clean_subsample(Path(args.data) / "train" / "clean.jsonl", args.clean, seed=0)
    rows: list[Example] = list(clean)
    plan: dict[str, Any] = {"clean": [e.id for e in clean], "behaviours": {}}
    for b in behaviours:
        rng = random.Random(f"plants/{b.name}")
        pos = [p for p, y in zip(b.plants, b.labels, strict=True) if y == 1]
        neg = [p for p, y in zip(b.plants, b.labels, strict=True) if y == 0]
        pos, neg = (
            rng.sample(pos, min(args.plants, len(pos))),
            rng.sample(neg, min(args.plants, len(neg))),
        )
        rows += pos + neg
        plan["behaviours"][b.name] = {
            "pos": [e.id for e in pos],
            "neg": [e.id for e in neg],
            "n_pairs": min(args.pairs, len(b.query)),
        }
    _save(work / "plan.json", plan)
    start, stop, step = (int(x) for x in args.layers.split(":"))
    layers = list(range(start, min(stop, model.n_layers), step))
    t0 = time.perf_counter()
    lensattr.build_cache(
        model,
        rows,
        out=work / "superset",
        layers=layers,
        stats=STATS,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=256,  # the unit of resumption
        on_error="skip",
        reuse=lensattr.open_cache(Path(args.reuse) / "superset") if args.reuse else None,
    )
    print(f"superset: {len(rows)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    (work / "pairs").mkdir(exist_ok=True)
    for b in behaviours:
        out = work / "pairs" / f"{b.name}.safetensors"
        if out.exists():
            continue
        if args.reuse and (Path(args.reuse) / "pairs" / out.name).exists():
            old = lensattr.PairStats.load(Path(args.reuse) / "pairs" / out.name)
            if old.n_pairs == plan["behaviours"][b.name]["n_pairs"]:
                old.save(out)
                continue
        t0 = time.perf_counter()
        ps = lensattr.pair_stats(
            model,
            b.query[: plan["behaviours"][b.name]["n_pairs"]],
            stats=STATS,
            layers=layers,
            max_length=args.max_length,
        )
        ps.save(out)
        print(f"pairs {b.name}: {ps.n_pairs} in {time.perf_counter() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------- score


def _pool(plan: dict[str, Any], name: str, seed: int, n_clean: int, n_plants: int) -> list[str]:
    rng = random.Random(f"pool/{name}/{seed}")
    b = plan["behaviours"][name]
    clean = rng.sample(plan["clean"], min(n_clean, len(plan["clean"])))
    return (
        clean
        + rng.sample(b["pos"], min(n_plants, len(b["pos"])))
        + rng.sample(b["neg"], min(n_plants, len(b["neg"])))
    )


def _p_at_k(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return precision_at_k(scores, labels, int(labels.sum()))


def _all_scores(cache: Any, query: Any, layer: Any, score: str | None = None) -> torch.Tensor:
    r = lensattr.rank(cache, query, layer=layer, score=score, top_k=None)
    return r.scores_of(range(len(cache)))


def score_pool(
    model: Any, work: Path, name: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    plan = json.loads((work / "plan.json").read_text())
    superset = lensattr.open_cache(work / "superset")
    ex_by_id = {e.id: e for e in superset.examples()}
    ids = [i for i in _pool(plan, name, seed, args.pool, args.plants) if i in ex_by_id]
    pool_dir = work / "pools" / f"{name}-{seed}"
    cache = lensattr.build_cache(
        model,
        [ex_by_id[i] for i in ids],
        out=pool_dir,
        config=superset.capture_config,
        stats=superset.stats,
        reuse=superset,
        progress=False,
    )
    pos = set(plan["behaviours"][name]["pos"])
    labels = torch.tensor([int(i in pos) for i in cache.ids])
    ps = lensattr.PairStats.load(work / "pairs" / f"{name}.safetensors")
    out: dict[str, Any] = {"behaviour": name, "seed": seed, "n": len(cache), "k": int(labels.sum())}
    t0 = time.perf_counter()
    sel = lensattr.select(None, cache, ps)
    out["select_seconds"] = time.perf_counter() - t0
    out["auto"] = {  # the library's default: the ensemble of select's top methods
        "method": str(sel.method),
        "layer": sel.layer,
        "members": len(sel.ensemble.members) if sel.ensemble is not None else 1,
        "p_at_k": _p_at_k(_all_scores(cache, sel, None), labels),
    }
    out["auto_single"] = {  # the one chosen method at its layer or layer set
        "method": str(sel.method),
        "layer": sel.layer,
        "p_at_k": _p_at_k(_all_scores(cache, sel.query, sel.layer), labels),
    }
    out["layer_set"] = sel.layer_set and {
        "method": sel.layer_set["method"],
        "layer": list(sel.layer_set["layer"]),
        "criterion": sel.layer_set["criterion"],
        "p_at_k": _p_at_k(_all_scores(cache, sel.query, list(sel.layer_set["layer"])), labels),
    }
    # every candidate at every layer: its criterion (label-free) and its P@k (labels)
    cells = []
    queries: dict[str, Any] = {}
    scores: dict[tuple[str, int], torch.Tensor] = {}  # kept for the ensembles below
    for row in sel.table:
        m = lensattr.Method.parse(row["method"])
        if row["method"] not in queries:
            queries[row["method"]] = lensattr.behavior_query(
                None, ps, query=m.query, stat=m.stat, pool=cache, score=m.score
            )
        s = _all_scores(cache, queries[row["method"]], row["layer"])
        scores[row["method"], row["layer"]] = s
        cells.append(
            {
                "method": row["method"],
                "layer": row["layer"],
                "criterion": row["criterion"],
                "accuracy": row["accuracy"],
                "p_at_k": _p_at_k(s, labels),
            }
        )
    out["cells"] = cells
    # ensembles: the mean of the standardised scores of the top-n methods by criterion averaged
    # over layers, each at its label-free best layer
    by_method = _by_method(cells)
    order = sorted(by_method, key=lambda m: _criterion_mean(by_method[m]), reverse=True)
    out["ensembles"] = {}
    for n in (2, 3, 5, 8, 12, 20, 30, 50):
        zs = [standardised(scores[m, _best_layer(by_method[m])["layer"]]) for m in order[:n]]
        out["ensembles"][f"top{n}"] = {
            "methods": order[:n],
            "p_at_k": _p_at_k(torch.stack(zs).mean(0).float(), labels),
        }
    layers = list(cache.layers)
    authors_layer = min(layers, key=lambda la: abs(la - AUTHORS_DEPTH * model.n_layers))
    baselines: dict[str, Any] = {}
    paper = lensattr.behavior_query(None, ps, query="residual_change")  # their stat, query, cosine
    for tag, layer in (("paper", paper.best_layer()), ("paper_at_authors_depth", authors_layer)):
        baselines[tag] = {
            "layer": layer,
            "p_at_k": _p_at_k(_all_scores(cache, paper, layer), labels),
        }
    old = lensattr.behavior_query(None, ps, query="contrast", stat="residual_change_printed")
    baselines["old_paper"] = {
        "layer": old.best_layer(),
        "p_at_k": _p_at_k(_all_scores(cache, old, old.best_layer()), labels),
    }
    rep = lensattr.select(None, cache, ps, methods=["repsim|resid_post|cosine"], set_size=1)
    baselines["repsim"] = {
        "layer": rep.layer,
        "p_at_k": _p_at_k(_all_scores(cache, rep, None), labels),
    }
    try:
        from lensattr import baselines as lexical
    except ImportError:
        lexical = None  # type: ignore[assignment]
    if lexical is not None:
        texts = [_reply(ex_by_id[i]) for i in cache.ids]
        pairs = _behaviours(args.data, args.own)[name].query[: ps.n_pairs]
        t, c = [p.treatment for p in pairs], [p.control for p in pairs]
        for kind in lexical.LEXICAL:
            s = lexical.lexical_scores(texts, t, c, kind)
            baselines[f"lexical:{kind}"] = {"p_at_k": _p_at_k(s, labels)}
        chosen, _ = lexical.lexical_select(texts, t, c)
        baselines["lexical"] = {"kind": chosen, **baselines[f"lexical:{chosen}"]}
    out["baselines"] = baselines
    return out


def score(args: argparse.Namespace) -> None:
    work = Path(args.work)
    plan = json.loads((work / "plan.json").read_text())
    names = args.behaviours.split(",") if args.behaviours else sorted(plan["behaviours"])
    (work / "cells").mkdir(exist_ok=True)
    model = lensattr.load_model(args.model)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            path = work / "cells" / f"{name}-{seed}.json"
            if path.exists() and not args.redo:
                continue
            t0 = time.perf_counter()
            res = score_pool(model, work, name, seed, args)
            _save(path, res)
            print(
                f"{name} seed {seed}: auto {res['auto']['method']} L{res['auto']['layer']} "
                f"P@k {res['auto']['p_at_k']:.2f}, paper {res['baselines']['paper']['p_at_k']:.2f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


# ----------------------------------------------------------------------------- rules


def _by_method(cells: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        out.setdefault(c["method"], []).append(c)
    return out


def _best_layer(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """A method's cell at its label-free best layer (criterion, ties to the deeper layer)."""
    return max(cells, key=lambda c: (c["criterion"], c["layer"]))


def _criterion_mean(cells: list[dict[str, Any]]) -> float:
    vals = [c["criterion"] for c in cells if not math.isnan(c["criterion"])]
    return sum(vals) / len(vals) if vals else -math.inf


def _method_at_best_layer(res: dict[str, Any], method: str) -> float:
    return _best_layer(_by_method(res["cells"])[method])["p_at_k"]


def _prior(train: list[dict[str, Any]]) -> dict[str, float]:
    """Each method's mean P@k at its label-free best layer over the training pools."""
    acc: dict[str, list[float]] = {}
    for res in train:
        for m, cells in _by_method(res["cells"]).items():
            acc.setdefault(m, []).append(_best_layer(cells)["p_at_k"])
    n = len(train)
    return {m: sum(v) / n for m, v in acc.items() if len(v) == n}


def rule_auto(res: dict[str, Any], _param: Any = None) -> float:
    return res["auto"]["p_at_k"]


def rule_auto_single(res: dict[str, Any], _param: Any = None) -> float:
    return res["auto_single"]["p_at_k"] if "auto_single" in res else res["auto"]["p_at_k"]


def rule_fixed(res: dict[str, Any], method: str) -> float:
    return _method_at_best_layer(res, method)


def rule_shortlist(res: dict[str, Any], param: tuple[list[str], int]) -> float:
    """auto's first stage (criterion averaged over layers) among the prior's top-m methods, at
    the chosen method's label-free best layer."""
    ranked, m = param
    by = _by_method(res["cells"])
    pick = [x for x in ranked if x in by][:m]
    best = max(pick, key=lambda x: _criterion_mean(by[x]))
    return _best_layer(by[best])["p_at_k"]


def rule_shrink(res: dict[str, Any], param: tuple[dict[str, float], float]) -> float:
    """The method maximising (criterion averaged over layers) + lam x (its prior P@k)."""
    prior, lam = param
    by = _by_method(res["cells"])
    ms = [m for m in by if m in prior]
    best = max(ms, key=lambda m: _criterion_mean(by[m]) + lam * prior[m])
    return _best_layer(by[best])["p_at_k"]


def fit_rule(kind: str, train: list[dict[str, Any]]) -> Any:
    """The rule's constant(s) that maximise the mean P@k over ``train`` (other behaviours)."""

    def mean_of(param: Any, fn: Any) -> float:
        return sum(fn(r, param) for r in train) / len(train)

    if kind in ("auto", "auto, one method"):
        return None
    if kind == "ensemble":
        sizes = [int(k.removeprefix("top")) for k in train[0]["ensembles"]]
        sizes = [n for n in sizes if all(f"top{n}" in r["ensembles"] for r in train)]
        return max(sizes, key=lambda n: mean_of(n, rule_ensemble))
    prior = _prior(train)
    ranked = sorted(prior, key=lambda m: prior[m], reverse=True)
    if kind == "fixed":
        return ranked[0]
    if kind == "shortlist":
        grid = [(ranked, m) for m in (1, 2, 3, 5, 8, 12, 20)]
        return max(grid, key=lambda p: mean_of(p, rule_shortlist))
    if kind == "shrink":
        grid = [(prior, lam) for lam in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
        return max(grid, key=lambda p: mean_of(p, rule_shrink))
    raise ValueError(kind)


def rule_ensemble(res: dict[str, Any], n: int) -> float:
    """The mean of the standardised scores of the top-n methods by criterion (scored in
    ``score``), n fitted."""
    return res["ensembles"][f"top{n}"]["p_at_k"]


RULES = {
    "auto": rule_auto,
    "auto, one method": rule_auto_single,
    "fixed": rule_fixed,
    "shortlist": rule_shortlist,
    "shrink": rule_shrink,
    "ensemble": rule_ensemble,
}


def _describe(kind: str, param: Any) -> str:
    if kind == "fixed":
        return str(param)
    if kind == "shortlist":
        return f"top {param[1]}: " + ", ".join(param[0][: param[1]])
    if kind == "shrink":
        return f"lambda {param[1]}"
    if kind == "ensemble":
        return f"top {param}"
    return ""


def _interval(vals: list[float], n_boot: int = 2000, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(vals) for _ in vals) / len(vals) for _ in range(n_boot))
    return [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]]


def _hindsight(pools: list[dict[str, Any]]) -> float:
    """The best fixed method chosen in hindsight: the (method, layer) cell of highest mean P@k
    over the behaviour's pools. It reads the labels, and it is one cell for every pool: a
    different best cell per pool would be an oracle no fixed method can be."""
    p_at_k: dict[tuple[str, str], list[float]] = {}
    for r in pools:
        for c in r["cells"]:
            p_at_k.setdefault((c["method"], json.dumps(c["layer"])), []).append(c["p_at_k"])
    return max(statistics.mean(v) for v in p_at_k.values() if len(v) == len(pools))


TARGET_MEAN, TARGET_NEAR, TARGET_SHARE, TARGET_MARGIN = 0.80, 0.05, 0.80, 0.15
"""Issue 25's targets: auto left one behaviour out at mean P@k >= 0.80, within 0.05 of
hindsight on >= 80% of behaviours, and >= 0.15 above the best of text search and RepSim on the
mean and on >= 80% of behaviours."""


def _best_baseline(row: dict[str, float]) -> float:
    """The best of RepSim and every text-search kind on one behaviour (picked with its labels)."""
    return max(v for c, v in row.items() if c.startswith("lexical") or c == "repsim")


def _near_hindsight(row: dict[str, float], col: str) -> bool:
    """Whether column ``col`` is within 0.05 of hindsight on one behaviour."""
    return row[col] >= row["hindsight"] - TARGET_NEAR


def _beats_baselines(row: dict[str, float], col: str) -> bool:
    """Whether column ``col`` is at least 0.15 above the best baseline on one behaviour."""
    return row[col] >= _best_baseline(row) + TARGET_MARGIN


def targets(rows: dict[str, dict[str, float]], members: list[str]) -> dict[str, Any]:
    """Issue 25's targets for ``auto (LOBO)`` over ``members``, each with whether it is met.

    The best baseline of a behaviour is the best of RepSim and every text-search kind on it
    (picked with its labels: the strictest comparison). Where that baseline is above
    ``1 - 0.15``, no ranking can beat it by 0.15: those behaviours are counted apart.
    """
    auto = {n: rows[n]["auto (LOBO)"] for n in members}
    best = {n: _best_baseline(rows[n]) for n in members}
    margin = [auto[n] - best[n] for n in members]
    near = [n for n in members if _near_hindsight(rows[n], "auto (LOBO)")]
    beats = [n for n in members if _beats_baselines(rows[n], "auto (LOBO)")]
    ceiling = [n for n in members if n not in beats and best[n] > 1 - TARGET_MARGIN]
    n = len(members)
    mean = statistics.mean(auto.values())
    return {
        "behaviours": n,
        "goals": {
            "mean": TARGET_MEAN,
            "near": TARGET_NEAR,
            "share": TARGET_SHARE,
            "margin": TARGET_MARGIN,
        },
        "mean": {"value": mean, "met": mean >= TARGET_MEAN},
        "near_hindsight": {
            "count": len(near),
            "met": len(near) >= TARGET_SHARE * n,
            "missed_by": [m for m in members if m not in near],
        },
        "margin_mean": {
            "value": statistics.mean(margin),
            "met": statistics.mean(margin) >= TARGET_MARGIN,
        },
        "margin_count": {
            "count": len(beats),
            "ceiling": ceiling,
            "met": len(beats) >= TARGET_SHARE * n,
        },
    }


def _target_lines(group: str, t: dict[str, Any]) -> list[str]:
    n, ok = t["behaviours"], {True: "met", False: "missed"}
    near, count = t["near_hindsight"], t["margin_count"]
    return [
        f"targets, {group} ({n} behaviours; auto left one behaviour out):",
        f"  mean P@k >= {TARGET_MEAN}: {t['mean']['value']:.3f}: {ok[t['mean']['met']]}",
        f"  within {TARGET_NEAR} of hindsight on >= {TARGET_SHARE:.0%}: {near['count']} of {n}: "
        f"{ok[near['met']]}"
        + (f" (not: {', '.join(near['missed_by'])})" if near["missed_by"] else ""),
        f"  >= {TARGET_MARGIN} above the best of text search and RepSim, on the mean: "
        f"{t['margin_mean']['value']:+.3f}: {ok[t['margin_mean']['met']]}",
        f"  ... on >= {TARGET_SHARE:.0%} of behaviours: {count['count']} of {n}: {ok[count['met']]}"
        + (
            f" ({len(count['ceiling'])} more where the baseline is above {1 - TARGET_MARGIN:.2f}: "
            f"{', '.join(count['ceiling'])})"
            if count["ceiling"]
            else ""
        ),
    ]


def report(args: argparse.Namespace) -> None:
    work = Path(args.work)
    results = [json.loads(p.read_text()) for p in sorted((work / "cells").glob("*.json"))]
    names = sorted({r["behaviour"] for r in results})
    by_b = {n: [r for r in results if r["behaviour"] == n] for n in names}
    rows: dict[str, dict[str, float]] = {n: {} for n in names}
    fitted: dict[str, dict[str, str]] = {}
    for kind, fn in RULES.items():
        everything = fit_rule(kind, results)
        fitted[kind] = {"in_sample": _describe(kind, everything)}
        for n in names:
            train = [r for r in results if r["behaviour"] != n]
            param = fit_rule(kind, train)
            rows[n][f"{kind} (LOBO)"] = statistics.mean(fn(r, param) for r in by_b[n])
            rows[n][f"{kind} (in-sample)"] = statistics.mean(fn(r, everything) for r in by_b[n])
            fitted[kind][n] = _describe(kind, param)
    for n in names:
        rs = by_b[n]
        for e in rs[0].get("ensembles", {}) if all("ensembles" in r for r in rs) else ():
            rows[n][f"ensemble {e}"] = statistics.mean(r["ensembles"][e]["p_at_k"] for r in rs)
        rows[n]["hindsight"] = _hindsight(rs)
        for base in rs[0]["baselines"]:
            rows[n][base] = statistics.mean(r["baselines"][base]["p_at_k"] for r in rs)
    cols = list(rows[names[0]])
    lines = ["| behaviour | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{rows[n][c]:.2f}" for c in cols) + " |")
    summary: dict[str, Any] = {}
    groups = {
        "all": names,
        "shared ten": [n for n in names if n in SHARED_TEN],
        "long replies": [n for n in names if not n.startswith("persona-")],
        "one-word replies": [n for n in names if n.startswith("persona-")],
    }
    for group, members in groups.items():
        if not members:
            continue
        means = {}
        for c in cols:
            vals = [rows[n][c] for n in members]
            means[c] = {"mean": statistics.mean(vals), "ci": _interval(vals)}
        lines.append(
            f"| **mean, {group}** ({len(members)}) | "
            + " | ".join(
                f"**{means[c]['mean']:.2f}** [{means[c]['ci'][0]:.2f}, {means[c]['ci'][1]:.2f}]"
                for c in cols
            )
            + " |"
        )
        near = {c: sum(_near_hindsight(rows[n], c) for n in members) for c in cols}
        beats = {c: sum(_beats_baselines(rows[n], c) for n in members) for c in cols}
        summary[group] = {
            "means": means,
            "within_0.05_of_hindsight": near,
            "beats_baselines_by_0.15": beats,
        }
    in_data = set(_behaviours(args.data, ""))
    shared = [n for n in names if n in in_data]
    target_groups = {"shared data": shared, **({"all": names} if len(shared) < len(names) else {})}
    goals = {g: targets(rows, m) for g, m in target_groups.items() if m}
    (work / "report.md").write_text("\n".join(lines) + "\n")
    _save(
        work / "report.json",
        {"rows": rows, "summary": summary, "targets": goals, "fitted": fitted},
    )
    print("\n".join(lines))
    for group, s in summary.items():
        print(
            f"\n{group}: within 0.05 of hindsight: "
            + ", ".join(f"{c} {v}" for c, v in s["within_0.05_of_hindsight"].items() if "(" in c)
        )
    print(
        "\nfitted on all behaviours: "
        + "; ".join(f"{k}: {v['in_sample']}" for k, v in fitted.items() if v["in_sample"])
    )
    for group, t in goals.items():
        print("\n" + "\n".join(_target_lines(group, t)))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--data", default="../shared/data")
    b.add_argument("--own", default=str(OWN), help="more behaviour folders ('': none)")
    b.add_argument("--work", default="runs/gen")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--clean", type=int, default=800, help="clean superset size")
    b.add_argument(
        "--plants", type=int, default=50, help="label-1 (and label-0) superset per behaviour"
    )
    b.add_argument("--pairs", type=int, default=192, help="query pairs per behaviour (at most)")
    b.add_argument("--layers", default="2:30:3")
    b.add_argument("--max-length", type=int, default=96)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--reuse", default="", help="a finished work directory to copy rows from")
    s = sub.add_parser("score")
    s.add_argument("--data", default="../shared/data")
    s.add_argument("--own", default=str(OWN), help="more behaviour folders ('': none)")
    s.add_argument("--work", default="runs/gen")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--pool", type=int, default=600, help="clean examples per pool")
    s.add_argument("--plants", type=int, default=40, help="label-1 (and label-0) plants per pool")
    s.add_argument("--behaviours", default="")
    s.add_argument("--redo", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("--work", default="runs/gen")
    r.add_argument("--data", default="../shared/data", help="the shared data the targets count")
    args = ap.parse_args()
    {"build": build, "score": score, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
