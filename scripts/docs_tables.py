"""The docs' result tables, generated from the results files in ``docs/results/``.

Every number a user page shows comes from a results file that a command regenerates. A page
marks each generated block::

    <!-- generated: demo -->
    (the table; rewritten by this script)
    <!-- /generated -->

and this script rewrites the block from the file its name reads (``TABLES``)::

    python scripts/docs_tables.py --collect   # copy the runs' outputs into docs/ (see SOURCES)
    python scripts/docs_tables.py             # rewrite every generated block in place
    python scripts/docs_tables.py --check     # exit 1, naming each stale block; changes nothing

``tests/test_docs.py`` runs the check. The runs that write the files (each resumable):

    lensattr demo --out runs/demo                               # runs/demo/summary.json, .png
    python -m benchmarks.generalisation build --data DATA --work runs/gen   # then score, report
    python benchmarks/bench_perf.py --out runs/perf.json
    python benchmarks/bench_peers.py --data demo --out runs/peers-demo.json

A file whose top level holds ``"placeholder": true`` has the right layout but no measurements:
its tables say "not measured yet". Needs scipy (the Student t quantile of the fine-tuning
intervals), a dev dependency.
"""

import argparse
import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
MISSING = "not measured yet"

# what --collect copies: a run's output (under the runs folder) -> its place in the repository
SOURCES = {
    "demo/summary.json": "docs/results/demo.json",
    "demo/layer_sweep.png": "docs/img/demo/layer_sweep.png",
    "gen/report.json": "docs/results/generalisation.json",
    "gen-small/report.json": "docs/results/generalisation-small.json",
    "perf.json": "docs/results/performance.json",
    "peers-demo.json": "docs/results/peers-demo.json",
    "ft3/results.json": "docs/results/finetune.json",
}

OPEN = re.compile(r"^<!-- generated: ([a-z0-9-]+) -->$")
CLOSE = "<!-- /generated -->"


def num(x: Any, fmt: str = ".2f", unit: str = "") -> str:
    """A number as the tables print it (``unit`` after it); ``None`` or NaN, a slot not filled
    in, as MISSING."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return format(x, fmt) + unit


def interval(value: Any, ci: Any) -> str:
    """``0.75 [0.50, 0.92]``: a metric and its 95% bootstrap interval, when there is one."""
    if value is None or not ci or None in ci:
        return num(value)
    return f"{num(value)} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table(head: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; ``align`` gives one of ``l``/``r`` per column (default: left)."""
    align = align or "l" * len(head)
    rule = ["---:" if a == "r" else "---" for a in align]
    # a method's name is query|stat|score: a bare "|" would split the cell
    lines = [[c.replace("|", " / ") for c in r] for r in [head, *rows]]
    return "\n".join("| " + " | ".join(r) + " |" for r in [lines[0], rule, *lines[1:]])


def layer_of(m: dict[str, Any]) -> str:
    layer = m.get("layer")
    if layer is None:
        return ""
    return ", ".join(map(str, layer)) if isinstance(layer, list) else str(layer)


# ------------------------------------------------------------------------------- renderers

DEMO_ROWS = {  # key in runs/demo/summary.json -> what the table calls it
    "auto": "`auto`",
    "paper": "the authors' method",
    "lexical": "text search (TF-IDF / BM25)",
    "repsim": "RepSim",
}


def render_demo(d: dict[str, Any]) -> str:
    """``lensattr demo``'s summary: each method's top-10 and precision among the pool."""
    k = d["auto"].get("k")
    rows = []
    for key, name in DEMO_ROWS.items():
        if key not in d:
            continue
        m = d[key]
        method = m.get("method") or m.get("kind") or ""
        chose = f"`{method}`" if method else ""
        where = layer_of(m)
        if m.get("members"):  # auto's ensemble: its size, and its best method
            chose = f"the mean of its {len(m['members'])} best methods (best: {chose})"
            where = "each its own"
        rows.append(
            [
                name,
                chose,
                where,
                num(m.get("planted_in_top10"), "d"),
                interval(m.get("p_at_k"), m.get("p_at_k_ci")),
                num(m.get("ap")),
            ]
        )
    head = ["method", "chose", "layer(s)", "planted in top-10", f"P@{k or 'k'} [95% CI]", "AP"]
    return table(head, rows, "lllrrr")


GEN_COLUMNS = {  # column of runs/gen/report.json -> what the table calls it
    "auto (LOBO)": "auto",
    "ensemble (LOBO)": "auto, LOBO size",
    "auto, one method (LOBO)": "one method",
    "paper": "authors' method",
    "old_paper": "old PAPER",
    "lexical": "text search",
    "repsim": "RepSim",
    "hindsight": "hindsight",
}


def render_generalisation(d: dict[str, Any]) -> str:
    """The leave-one-behaviour-out study: P@k per behaviour (mean over pool seeds)."""
    rows_in = d["rows"]
    cols = [c for c in GEN_COLUMNS if any(c in r for r in rows_in.values())]
    rows = [[name] + [num(r.get(c)) for c in cols] for name, r in rows_in.items()]
    for group, s in d["summary"].items():
        means = s["means"]
        rows.append(
            [f"**mean, {group}**"]
            + [interval(means[c]["mean"], means[c]["ci"]) if c in means else MISSING for c in cols]
        )
    return table(["behaviour"] + [GEN_COLUMNS[c] for c in cols], rows, "l" + "r" * len(cols))


def render_generalisation_rules(d: dict[str, Any]) -> str:
    """Every column of the study, one per row: its means and how often it is near hindsight."""
    rows = []
    groups = list(d["summary"])
    first = d["summary"][groups[0]] if groups else {}
    for c in first.get("means", {}):
        row = [f"`{c}`"]
        for g in groups:
            m = d["summary"][g]["means"][c]
            row.append(interval(m["mean"], m["ci"]))
        near = first.get("within_0.05_of_hindsight", {}).get(c)
        row.append(f"{near} of {len(d['rows'])}" if near is not None else "")
        rows.append(row)
    head = ["column"] + [f"mean P@k, {g}" for g in groups] + ["within 0.05 of hindsight"]
    return table(head, rows, "l" + "r" * (len(groups) + 1))


def render_generalisation_targets(d: dict[str, Any]) -> str:
    """Issue 25's targets for ``auto`` left one behaviour out, per group of behaviours, each
    with whether it is met (``benchmarks.generalisation.targets``; the thresholds are the
    report's own)."""
    goals = d["targets"]
    groups = list(goals)
    g = goals[groups[0]]["goals"]
    ok = {True: "met", False: "**missed**"}

    def value(t: dict[str, Any], fmt: str) -> str:
        return f"{format(t['value'], fmt)}: {ok[t['met']]}"

    def count(t: dict[str, Any], n: int) -> str:
        return f"{t['count']} of {n}: {ok[t['met']]}"

    share, margin = f"{g['share']:.0%}", g["margin"]
    rows = [
        [f"mean P@k >= {g['mean']:.2f}"] + [value(goals[x]["mean"], ".3f") for x in groups],
        [f"within {g['near']} of hindsight on >= {share} of behaviours"]
        + [count(goals[x]["near_hindsight"], goals[x]["behaviours"]) for x in groups],
        [f"above the best of text search and RepSim by >= {margin}, on the mean"]
        + [value(goals[x]["margin_mean"], "+.3f") for x in groups],
        [f"... on >= {share} of behaviours"]
        + [count(goals[x]["margin_count"], goals[x]["behaviours"]) for x in groups],
        [f"... behaviours whose best baseline is above {1 - margin:.2f} (no room for {margin})"]
        + [str(len(goals[x]["margin_count"]["ceiling"])) for x in groups],
    ]
    head = ["target (auto, left one behaviour out)"] + [
        f"{x} ({goals[x]['behaviours']})" for x in groups
    ]
    return table(head, rows, "l" + "r" * len(groups))


FT_NAMES = {"auto": "`auto`", "paper": "the authors' method", "random": "random"}


def seed_interval(xs: list[float]) -> str:
    """``+0.12 [+0.05, +0.19]``: a mean over seeds and its 95% Student t interval."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return f"{mean:+.3f}"
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def render_finetune(d: dict[str, Any]) -> str:
    """The fine-tuning effect: the trait score's change after LoRA on each method's top-k, and
    ``auto`` minus the authors' method paired by seed."""
    rows = []
    for name, r in d["finetune"].items():
        ms = r["methods"]
        for m, v in ms.items():
            picked = "/".join(map(str, v["n_label1_selected"]))
            delta = [x - r["base"] for x in v["scores"]]
            vs = ""
            if m == "auto" and "paper" in ms:
                vs = seed_interval(
                    [a - b for a, b in zip(v["scores"], ms["paper"]["scores"], strict=True)]
                )
            rows.append([name, FT_NAMES.get(m, f"`{m}`"), picked, seed_interval(delta), vs])
    head = [
        "behaviour",
        "top-k of",
        "behaviour examples in the top-k, per seed",
        "trait score change [95% CI over seeds]",
        "`auto` minus the authors' method, paired by seed",
    ]
    return table(head, rows, "llrrr")


WHOLE_SEQUENCE = "(c) build_cache, reply statistics only"  # the slot for the extra cost


def render_build(d: dict[str, Any]) -> str:
    """``bench_perf.py``'s timing: each step's seconds and tokens per second."""
    tokens = d.get("tokens")
    seconds = dict(d["seconds"])
    seconds.setdefault(WHOLE_SEQUENCE, None)
    rows = [
        [name, num(s), num(tokens / s, ".0f") if tokens and s else MISSING]
        for name, s in seconds.items()
    ]
    out = table(["step", "seconds", "tokens/s"], rows, "lrr")
    u = d.get("setup") or {}
    if u.get("model"):
        out = (
            f"{u['model']}, {u['examples']} examples ({num(tokens, ',d')} tokens) on "
            f"{u['device']}, torch {u['torch']} (threads: {u['threads']}); the fastest round "
            f"of {u['rounds']}:\n\n{out}"
        )
    return out


RATIOS = {  # key in bench_perf's "ratios" -> what it means
    "(c)/(b) sparse head": "build / the floor, every position in the backward (the same work)",
    "(c) reply only/(b) prompt forward-only": "reply statistics only / the floor, prompt "
    "forward-only (the same work)",
    "(c)/(a)": "build / the forward alone",
    "(c) tokens/s fwd-only / gradient": "gradient build / forward-only build",
    "(c) last third / (c) all": "last third of the layers / all layers",
    "(d)/(c)": "TRAK-style gradients / build",
    "whole sequence / reply only": "the whole-sequence `residual_change`: build / build without it",
}


def render_ratios(d: dict[str, Any]) -> str:
    """The ratios a reader compares: the build against the model's own passes."""
    r = d.get("ratios", {})
    rows = [[text, num(r.get(key))] for key, text in RATIOS.items()]
    return table(["ratio", "value"], rows, "lr")


def render_memory(d: dict[str, Any]) -> str:
    """Peak resident memory of a build, per corpus size."""
    rows = [
        [
            num(r.get("n"), ",d"),
            num(r.get("peak_rss_mb"), ",.0f"),
            num(r.get("rss_before_build_mb"), ",.0f"),
        ]
        for r in d.get("rss", [])
    ] or [[MISSING, "", ""]]
    return table(["examples", "peak RSS, MB", "before the build (model loaded), MB"], rows, "rrr")


def render_query(d: dict[str, Any]) -> str:
    """One query over N cached rows: warm and cold, and the memory it takes."""
    rows = [
        [
            f"{num(r.get('n'), ',d')} x {num(r.get('d_model'), 'd')}",
            num(r["bytes_on_disk"] / 1e9 if r.get("bytes_on_disk") else None, ".2f", " GB"),
            num(r.get("warm_s"), ".2f", " s"),
            num(r.get("cold_s"), ".2f", " s"),
            num(r.get("warm_peak_anon_extra_mb"), "+.0f", " MB"),
            num(r.get("fp32_matrix_mb"), ",.0f", " MB"),
        ]
        for r in d.get("ranking", [])
    ] or [[MISSING] + [""] * 5]
    head = ["rows x d_model", "on disk", "warm", "cold", "peak memory", "an fp32 copy"]
    return table(head, rows, "lrrrrr")


PEERS = {  # contender of bench_peers.py -> what the table calls it
    "bergson": "bergson (build + pairs' builds + score)",
    "full": "lensattr: `build_cache` + `auto` + `rank`",
    "gradfree": "lensattr, gradient-free",
    "cheap": "lensattr, cheap path",
    "cheapgrad": "lensattr, cheap path with gradients",
}


def render_peers(d: dict[str, Any]) -> str:
    """bergson against lensattr's pipelines: time and memory (the fastest round of each)."""
    runs = d.get("runs", {})

    def best(name: str, key: str) -> float | None:
        vals = [r[key] for r in runs.get(name, []) if r.get(key) is not None]
        return (max if "rss" in key else min)(vals) if vals else None

    b_time, b_rss = best("bergson", "pipeline_s"), best("bergson", "peak_rss_mb")
    rows = []
    for name, text in PEERS.items():
        t, rss = best(name, "pipeline_s"), best(name, "peak_rss_mb")
        rows.append(
            [
                text,
                num(t, ".0f", " s"),
                num(t / b_time if t is not None and b_time else None),
                num(rss, ",.0f", " MB"),
                num(rss / b_rss if rss is not None and b_rss else None),
            ]
        )
    head = ["pipeline", "time", "/ bergson's", "peak memory", "/ bergson's"]
    return table(head, rows, "lrrrr")


def render_peers_precision(d: dict[str, Any]) -> str:
    """Each method's precision among the pool in the last round of bench_peers.py."""
    rows = [
        [f"`{method}`", num(m.get("p_at_k")), num(m.get("ap"))]
        for rounds in d.get("runs", {}).values()
        if rounds
        for method, m in rounds[-1].get("methods", {}).items()
    ] or [[MISSING, "", ""]]
    return table(["method", "P@k", "AP"], rows, "lrr")


GEN = "python -m benchmarks.generalisation report --work runs/gen"
GEN_SMALL = "python -m benchmarks.generalisation report --work runs/gen-small"
PERF = "python benchmarks/bench_perf.py --out runs/perf.json"
PEERS_RUN = "python benchmarks/bench_peers.py --data demo --out runs/peers-demo.json"
FT = (
    "lensattr bench --behaviours medhallu,sycophancy,empathy --n-clean 1000 --no-persona "
    "--ft-behaviours medhallu,sycophancy,empathy --ft-methods auto,paper,random --out runs/ft3"
)

# name -> (results file, renderer, the command that regenerates the file)
TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str], str]] = {
    "demo": ("demo.json", render_demo, "lensattr demo --out runs/demo"),
    "generalisation": ("generalisation.json", render_generalisation, GEN),
    "generalisation-rules": ("generalisation.json", render_generalisation_rules, GEN),
    "generalisation-targets": ("generalisation.json", render_generalisation_targets, GEN),
    "generalisation-small": ("generalisation-small.json", render_generalisation, GEN_SMALL),
    "build": ("performance.json", render_build, PERF),
    "ratios": ("performance.json", render_ratios, PERF),
    "memory": ("performance.json", render_memory, PERF),
    "query": ("performance.json", render_query, PERF),
    "peers": ("peers-demo.json", render_peers, PEERS_RUN),
    "peers-precision": ("peers-demo.json", render_peers_precision, PEERS_RUN),
    "finetune": ("finetune.json", render_finetune, FT),
}


def render(name: str) -> str:
    """The block ``name`` as the page should hold it, from its results file."""
    file, fn, command = TABLES[name]
    path = RESULTS / file
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"docs_tables: {path.relative_to(ROOT)}: {e}") from None
    if data.get("placeholder"):
        return (
            f"*{MISSING.capitalize()}:* `docs/results/{file}` is a placeholder. It comes from "
            f"`{command}` (then `python scripts/docs_tables.py --collect`)."
        )
    try:
        return fn(data)
    except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
        raise SystemExit(
            f"docs_tables: docs/results/{file}: not the layout the table {name!r} reads "
            f"({type(e).__name__}: {e})"
        ) from None


def regenerate(text: str, where: str) -> str:
    """``text`` with every generated block rewritten; ``where`` names the page in errors."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = OPEN.match(lines[i].strip())
        if m is None:
            i += 1
            continue
        name = m.group(1)
        if name not in TABLES:
            raise SystemExit(
                f"docs_tables: {where}:{i + 1}: no table named {name!r} (one of: "
                + ", ".join(TABLES)
                + ")"
            )
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == CLOSE), None)
        if end is None or any(OPEN.match(x.strip()) for x in lines[i + 1 : end]):
            raise SystemExit(f"docs_tables: {where}:{i + 1}: {name!r} has no {CLOSE} of its own")
        out += ["", render(name), "", lines[end]]
        i = end + 1
    return "\n".join(out)


def pages() -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def collect(runs: Path) -> None:
    """Copy each run output of SOURCES found under ``runs`` to its place in the repository."""
    for src, dst in SOURCES.items():
        path = runs / src
        if path.exists():
            shutil.copyfile(path, ROOT / dst)
            print(f"{path} -> {dst}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="fail if a page is stale; write nothing")
    ap.add_argument(
        "--collect",
        nargs="?",
        const="runs",
        default=None,
        metavar="RUNS",
        help="first copy the runs' outputs (SOURCES) from RUNS (default: runs) into docs/",
    )
    args = ap.parse_args(argv)
    if args.collect is not None:
        collect(Path(args.collect).resolve())
    stale = []
    for page in pages():
        text = page.read_text()
        where = page.relative_to(ROOT).as_posix()
        new = regenerate(text, where)
        if new != text:
            stale.append(where)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(
            "docs_tables: stale generated tables in "
            + ", ".join(stale)
            + ": run python scripts/docs_tables.py",
            file=sys.stderr,
        )
        return 1
    for where in stale:
        print(f"rewrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
