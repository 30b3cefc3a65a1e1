"""Benchmark outputs: ``results.json``, a markdown report and PNG figures.

Every ranking is reported by precision among the pool first (precision@k of the behaviour's
label-1 plants against everything else, k = their number; average precision; clean examples
ranked above the median plant), planted AUROC (label 1 vs label 0) second.
"""

import json
from pathlib import Path
from typing import Any

from lensattr.baselines import LEXICAL
from lensattr.bench.ranking import summary
from lensattr.layers import layer_text
from lensattr.optional import require
from lensattr.select import PAPER


def _n(method: str) -> str:
    """A method name fit for a markdown table cell (``query|stat|score`` ->
    ``query / stat / score``)."""
    return method.replace("|", " / ")


def layer_label(layer: Any) -> str:
    """A chosen layer, or a layer set (a list in JSON: each row scored by the mean over them),
    as ``L18`` or ``L18,17,15``.

    Examples:
        >>> layer_label(18), layer_label([18, 17, 15])
        ('L18', 'L18,17,15')
    """
    return f"L{layer_text(layer)}"


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""


def markdown(results: dict[str, Any]) -> str:
    """The report: the headline table (precision among the pool), targets, fine-tuning."""
    ranking = results["ranking"]
    s = summary(ranking)
    lines = [
        "## Precision among the pool (headline)",
        "",
        "Each behaviour is ranked inside the whole clean corpus plus its own plants. P@k = "
        "precision@k of the label-1 plants against every other example (k = their number), "
        "95% bootstrap interval in brackets; AP = their average precision; 'clean above' = "
        "clean examples ranked above the median label-1 plant; AUROC = label 1 vs label 0 "
        "plants (secondary). `auto` chooses statistic, query, score and layer from the query pairs "
        "and the unlabelled pool (several layers, e.g. L18,17,15: each example scored by the "
        "mean of its scores at them); the authors' method uses the layer its own held-out "
        "accuracy chooses; hindsight = the best fixed method and layer by P@k (it peeks at the "
        "labels: reference only).",
        "",
        "| behaviour | pool (plants 1/0) | auto: method (layer) | auto P@k | auto AP | "
        "clean above | AUROC | authors' method: P@k (layer) | AP | hindsight best: "
        "P@k, method (layer) | lexical: P@k (kind) | RepSim: P@k (layer) | persona | TRAK | "
        "random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in ranking.items():
        a, p, hb, base = r["auto"], r["paper"], r["hindsight"], r["baselines"]
        lines.append(
            f"| {name} | {r['n_pool']} ({r['n_plants']['1']}/{r['n_plants']['0']}) | "
            f"{_n(a['method'])} ({layer_label(a['layer'])}) | **{_f(a['p_at_k'])}**"
            f"{_ci(a, 'p_at_k')} | "
            f"{_f(a['ap'])} | {a['clean_above_median']} | {_f(a['auroc_planted'])} | "
            f"{_f(p['p_at_k'])}{_ci(p, 'p_at_k')} (L{p['layer']}) | {_f(p['ap'])} | "
            f"{_f(hb['p_at_k'])}, {_n(hb['method'])} (L{hb['layer']}) | "
            f"{_f(base['lexical']['p_at_k'])} ({base['lexical']['kind']}) | "
            f"{_f(base['repsim']['p_at_k'])} ({layer_label(base['repsim']['layer'])}) | "
            f"{_f(base.get('persona', {}).get('p_at_k'))} | "
            f"{_f(base.get('trak', {}).get('p_at_k'))} | {_f(base['random']['p_at_k'])} |"
        )
    lines += [
        "",
        f"Mean P@k over {s['n_behaviours']} behaviours: auto {_f(s['mean_p_at_k']['auto'])}, "
        f"authors' method {_f(s['mean_p_at_k']['paper'])}, hindsight best "
        f"{_f(s['mean_p_at_k']['hindsight'])}, lexical {_f(s['mean_p_at_k']['lexical'])}, "
        f"RepSim {_f(s['mean_p_at_k']['repsim'])}. Mean AP: auto {_f(s['mean_ap']['auto'])}, paper "
        f"{_f(s['mean_ap']['paper'])}. Auto within 0.05 P@k of the hindsight best on "
        f"{s['auto_within_0.05_of_hindsight']} of {s['n_behaviours']}.",
        "",
        *baseline_table(ranking),
        *paper_table(ranking),
        *finetune_table(results),
    ]
    return "\n".join(lines) + "\n"


def baseline_table(ranking: dict[str, Any]) -> list[str]:
    """The baselines a user tries first beside auto: P@k of every lexical kind (``*`` = the kind
    chosen without labels) and of RepSim at the layer chosen without labels."""
    lines = [
        "## Text search and RepSim",
        "",
        "P@k of each example's reply scored against the query pairs' replies (lensattr."
        "baselines: TF-IDF cosine to the treatment mean, to treatment minus control, to "
        "treatment minus pool; BM25 of the treatment replies; `*` = the kind auto's criterion "
        "chooses without labels) and of RepSim (cosine of `resid_post` to the treatment "
        "replies' mean direction, at the layer the criterion chooses), beside auto.",
        "",
        "| behaviour | " + " | ".join(LEXICAL) + " | RepSim (layer) | auto |",
        "|---" * (len(LEXICAL) + 3) + "|",
    ]
    for name, r in ranking.items():
        base = r["baselines"]
        cells = [
            _f(base[f"lexical {k}"]["p_at_k"]) + ("*" if k == base["lexical"]["kind"] else "")
            for k in LEXICAL
        ]
        rep = base["repsim"]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_f(rep['p_at_k'])} "
            f"({layer_label(rep['layer'])}) | {_f(r['auto']['p_at_k'])} |"
        )
    return [*lines, ""]


def paper_table(ranking: dict[str, Any]) -> list[str]:
    """Where the authors' method stands: P@k at every layer and with every score."""
    lines = [
        "## The authors' method, every layer",
        "",
        "P@k of `residual_change / residual_change / score` per layer (`*` = the layer its "
        "held-out accuracy chooses), next to auto's method at the same layers.",
        "",
    ]
    for name, r in ranking.items():
        layers = sorted(int(la) for la in r["grid"][str(PAPER)]["layers"])
        lines += [
            f"**{name}**",
            "",
            "| method | " + " | ".join(f"L{la}" for la in layers) + " |",
            "|---" * (len(layers) + 1) + "|",
        ]
        rows = [m for m in r["grid"] if m.startswith("residual_change|residual_change|")]
        if r["auto"]["method"] not in rows:
            rows.append(r["auto"]["method"])
        for m in rows:
            g = r["grid"][m]
            mark = g["query_layer"]
            cells = [
                _f(g["layers"][str(la)]["p_at_k"]) + ("*" if la == mark else "") for la in layers
            ]
            tag = " (auto)" if m == r["auto"]["method"] else ""
            lines.append(f"| {_n(m)}{tag} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def finetune_table(results: dict[str, Any]) -> list[str]:
    """One row per behaviour and method: trait score over seeds, its change from the base model,
    and what the top-k held (label-1 / label-0 plants; the rest is clean data)."""
    ft = results.get("finetune")
    if not ft:
        return []
    lines = [
        "## Fine-tuning effect (trait score on heldout pairs)",
        "",
        "Trait score = mean over heldout pairs of (mean per-token log-prob of the treatment reply "
        "minus that of the control reply). Delta = fine-tuned minus base, mean +- sd over seeds.",
        "",
        "| behaviour | method | label-1 / label-0 in top-k | trait score | delta vs base | "
        "delta vs random |",
        "|---|---|---|---|---|---|",
    ]

    def per_seed(xs: list[int] | None) -> str:  # one number when every seed picked the same
        return "?" if xs is None else str(xs[0]) if len(set(xs)) == 1 else ", ".join(map(str, xs))

    for name, r in ft.items():
        lines.append(f"| {name} | base model | | {_f(r['base'], 3)} | | |")
        rand = r["methods"].get("random", {}).get("mean")
        for m, v in r["methods"].items():
            shown = f"{m} = {_n(v['resolved'])}" if "resolved" in v else _n(m)
            picked = f"{per_seed(v['n_label1_selected'])} / {per_seed(v.get('n_label0_selected'))}"
            delta = f"{v['mean'] - r['base']:+.3f} +- {v['sd']:.3f}"
            vs_rand = "" if rand is None or m == "random" else f"{v['mean'] - rand:+.3f}"
            lines.append(
                f"| {name} | {shown} | {picked} | {_f(v['mean'], 3)} | {delta} | {vs_rand} |"
            )
    return [*lines, ""]


def finetune_plot(results: dict[str, Any], path: Path) -> None:
    """Change of the trait score after fine-tuning on each method's top-k (one panel per
    behaviour; bars = mean over seeds, dots = seeds)."""
    matplotlib = require("matplotlib", "bench")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = results["finetune"]
    fig, axes = plt.subplots(1, len(ft), figsize=(4.2 * len(ft), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes.flat, ft.items(), strict=True):
        labels = list(r["methods"])
        for i, v in enumerate(r["methods"].values()):
            d = [x - r["base"] for x in v["scores"]]
            ax.bar(i, sum(d) / len(d), color="tab:blue", alpha=0.6)
            ax.plot([i] * len(d), d, "k.", ms=4)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(labels)), [x.replace("|", "\n") for x in labels], fontsize=6)
        ax.set_title(name, fontsize=9)
    axes.flat[0].set_ylabel("trait score change vs base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _p_at_k(r: dict[str, Any], method: str) -> dict[str, float]:
    """A grid method's P@k per layer in one behaviour's ranking."""
    return {la: v["p_at_k"] for la, v in r["grid"][method]["layers"].items()}


def precision_plot(results: dict[str, Any], path: Path) -> None:
    """P@k against layer per behaviour: auto's method, the authors' method and RepSim
    (dots: the layer or layers each chose without labels; a dashed line: the P@k of a layer
    set), with the lexical baseline (the kind chosen without labels; no layer) and random."""
    matplotlib = require("matplotlib", "bench")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranking = results["ranking"]
    names = list(ranking)
    cols = min(5, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = ranking[name]

        rep = r["baselines"]["repsim"]
        for lay, label, res in (
            (_p_at_k(r, r["auto"]["method"]), "auto's method", r["auto"]),
            (_p_at_k(r, str(PAPER)), "authors' method", r["paper"]),
            (rep["layers"], "RepSim", rep),
        ):
            xs = sorted(int(la) for la in lay)
            (line,) = ax.plot(xs, [lay[str(x)] for x in xs], marker=".", label=label)
            chosen = [res["layer"]] if isinstance(res["layer"], int) else res["layer"]
            at = [lay[str(la)] for la in chosen]
            ax.plot(chosen, at, "o", ms=8, color=line.get_color())
            if len(chosen) > 1:  # a layer set: its own P@k, across its layers
                ax.plot(
                    [min(chosen), max(chosen)], [res["p_at_k"]] * 2, "--", color=line.get_color()
                )
        lex = r["baselines"]["lexical"]
        ax.axhline(lex["p_at_k"], color="black", ls="-.", lw=1, label="lexical (text search)")
        ax.axhline(r["baselines"]["random"]["p_at_k"], color="grey", ls=":", label="random")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.supxlabel("layer (large dots = the layer or layers chosen without labels)")
    fig.supylabel("precision@k among the pool")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write results.json, results.md, precision.png and (after fine-tuning) finetune.png."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    precision_plot(results, out / "precision.png")
    if results.get("finetune"):
        finetune_plot(results, out / "finetune.png")
