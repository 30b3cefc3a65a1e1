"""Benchmark outputs: ``results.json``, a markdown report and PNG figures."""

import json
from pathlib import Path
from typing import Any

from lensattr.bench.grid import PHI_STATS, PSI_STATS, SCORES


def _n(method: str) -> str:
    """A method name fit for a markdown table cell (``psi|phi|g`` -> ``psi / phi / g``)."""
    return method.replace("|", " / ")


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def markdown(results: dict[str, Any]) -> str:
    """The report tables: per behaviour the pre-chosen best method, residual change, baselines."""
    lines = [
        "## Planted recovery (AUROC of label-1 vs label-0 plants)",
        "",
        "Layer and best method chosen from the query pairs alone (2-fold CV accuracy on "
        "query.jsonl). The oracle column (best planted AUROC over all "
        "methods and layers) is for reference only: it peeks at the plant labels.",
        "",
        "| behaviour | chosen method (layer) | AUROC [95% CI] | P@k / R@k | "
        "residual_change / residual_change / cosine | residual_diff / resid_post / cosine | "
        "persona / projdiff (else resid_post) / cosine | TRAK | random | oracle (peeks) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["planted"].items():
        ms = r["methods"]
        best = r["best_by_cv"]
        b = ms[best]
        ci = b.get("auroc_ci", [None, None])

        def cell(m: str, ms: dict[str, Any] = ms) -> str:
            if m not in ms and m == "persona|projdiff|cosine":
                m = "persona|resid_post|cosine"  # projdiff not run: the persona row's resid_post
            if m not in ms:
                return "n/a"
            x = ms[m]
            lay = f" (L{x['chosen_layer']})" if x.get("chosen_layer") is not None else ""
            return f"{_f(x['auroc'])}{lay}"

        oracle = max(
            ((m, la, v["auroc"]) for m, x in ms.items() for la, v in x.get("layers", {}).items()),
            key=lambda t: t[2],
        )
        lines.append(
            f"| {name} | {_n(best)} (L{b.get('chosen_layer')}) | {_f(b['auroc'])} [{_f(ci[0])}, "
            f"{_f(ci[1])}] | {_f(b['p_at_k'])} / {_f(b['r_at_k'])} (k={r['k']}) | "
            f"{cell('residual_change|residual_change|cosine')} | "
            f"{cell('residual_diff|resid_post|cosine')} | {cell('persona|projdiff|cosine')} | "
            f"{cell('trak')} | {_f(ms['random']['auroc'])} | {_f(oracle[2])} ({_n(oracle[0])} "
            f"L{oracle[1]}) |"
        )
    lines += [
        "",
        "### Every grid cell at its CV-chosen layer (AUROC; rows psi, columns phi, "
        "cosine / centered / whitened)",
        "",
    ]
    for name, r in results["planted"].items():
        lines += [
            f"**{name}**",
            "",
            "| psi \\ phi | " + " | ".join(PHI_STATS) + " |",
            "|---" * (len(PHI_STATS) + 1) + "|",
        ]
        for psi in [*PSI_STATS, "persona"]:
            cells = []
            for phi in PHI_STATS:
                vals = [r["methods"].get(f"{psi}|{phi}|{g}") for g in SCORES]
                if vals[0] is None:
                    break
                cells.append(" / ".join(_f(v["auroc"]) for v in vals))
            if cells:
                lines.append(f"| {psi} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += layer_tables(results)
    lines += finetune_table(results)
    cost = results.get("cost", {})
    lines += ["", "## Cost", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in cost.items()]
    return "\n".join(lines) + "\n"


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
        "| behaviour | method | planted AUROC | label-1 / label-0 in top-k | trait score | "
        "delta vs base | delta vs random |",
        "|---|---|---|---|---|---|---|",
    ]

    def per_seed(xs: list[int] | None) -> str:  # one number when every seed picked the same
        return "?" if xs is None else str(xs[0]) if len(set(xs)) == 1 else ", ".join(map(str, xs))

    for name, r in ft.items():
        lines.append(f"| {name} | base model | | | {_f(r['base'], 3)} | | |")
        planted = results["planted"].get(name, {}).get("methods", {})
        rand = r["methods"].get("random", {}).get("mean")
        for m, v in r["methods"].items():
            shown = f"best = {_n(v['resolved'])}" if "resolved" in v else _n(m)
            auroc = planted.get(v.get("resolved", m), {}).get("auroc")
            picked = f"{per_seed(v['n_label1_selected'])} / {per_seed(v.get('n_label0_selected'))}"
            delta = f"{v['mean'] - r['base']:+.3f} +- {v['sd']:.3f}"
            vs_rand = "" if rand is None or m == "random" else f"{v['mean'] - rand:+.3f}"
            lines.append(
                f"| {name} | {shown} | {_f(auroc)} | {picked} | {_f(v['mean'], 3)} | {delta} "
                f"| {vs_rand} |"
            )
    return [*lines, ""]


def finetune_plot(results: dict[str, Any], path: Path) -> None:
    """Change of the trait score after fine-tuning on each method's top-k (one panel per
    behaviour; bars = mean over seeds, dots = seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = results["finetune"]
    fig, axes = plt.subplots(1, len(ft), figsize=(4.2 * len(ft), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes.flat, ft.items(), strict=True):
        labels = [
            f"best ({v['resolved'].split('|')[0]})" if "resolved" in v else m
            for m, v in r["methods"].items()
        ]
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


SWEEP = (
    "residual_change|residual_change|cosine",
    "residual_change|residual_change|whitened_cosine",
    "residual_change_exact|residual_change_exact|cosine",
    "residual_diff|resid_post|cosine",
    "residual_diff|resid_post|whitened_cosine",
    "grad|grad|cosine",
    "persona|projdiff|cosine",
    "persona|resid_post|cosine",
)


def layer_tables(results: dict[str, Any], methods: tuple[str, ...] = SWEEP) -> list[str]:
    """Planted AUROC at every layer for the main methods; ``*`` marks the CV-chosen layer."""
    lines = ["### Every layer (planted AUROC; `*` = layer pre-chosen on the query pairs)", ""]
    for name, r in results["planted"].items():
        ms = r["methods"]
        first = next(m for m in methods if m in ms)
        layers = sorted(int(la) for la in ms[first]["layers"])
        lines += [
            f"**{name}**",
            "",
            "| method | " + " | ".join(f"L{la}" for la in layers) + " |",
            "|---" * (len(layers) + 1) + "|",
        ]
        for m in methods:
            if m not in ms:
                continue
            cells = [
                _f(ms[m]["layers"][str(la)]["auroc"]) + ("*" if la == ms[m]["chosen_layer"] else "")
                for la in layers
            ]
            lines.append(f"| {_n(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def heatmap(results: dict[str, Any], path: Path, g: str = "cosine") -> None:
    """Paper-style heatmap: rows psi, columns phi, mean planted AUROC over behaviours at each
    cell's CV-chosen layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [*PSI_STATS, "persona"]
    mat = np.full((len(rows), len(PHI_STATS)), np.nan)
    for i, psi in enumerate(rows):
        for j, phi in enumerate(PHI_STATS):
            vals = [
                r["methods"][f"{psi}|{phi}|{g}"]["auroc"]
                for r in results["planted"].values()
                if f"{psi}|{phi}|{g}" in r["methods"]
            ]
            if vals:
                mat[i, j] = float(np.nanmean(vals))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(PHI_STATS)), PHI_STATS, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(PHI_STATS)):
            if mat[i, j] == mat[i, j]:
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("phi (training-side statistic)")
    ax.set_ylabel("psi (query)")
    ax.set_title(f"mean planted AUROC over behaviours\n(g={g}, CV-chosen layer)", fontsize=10)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_sweep(
    results: dict[str, Any],
    path: Path,
    methods: tuple[str, ...] = (
        "residual_change|residual_change|cosine",
        "residual_diff|resid_post|cosine",
        "grad|grad|cosine",
        "residual_change|residual_change|whitened_cosine",
    ),
) -> None:
    """Planted AUROC against layer, one panel per behaviour; chosen layers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["planted"])
    cols = min(5, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ms = results["planted"][name]["methods"]
        for m in methods:
            if m not in ms:
                continue
            xs = sorted(int(la) for la in ms[m]["layers"])
            (line,) = ax.plot(xs, [ms[m]["layers"][str(x)]["auroc"] for x in xs], label=m)
            ax.plot([ms[m]["chosen_layer"]], [ms[m]["auroc"]], "o", color=line.get_color())
        if "trak" in ms:
            ax.axhline(ms["trak"]["auroc"], color="k", ls=":", label="trak")
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("layer (dot = CV-chosen)")
    fig.supylabel("planted AUROC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Write results.json, results.md, heatmap.png, heatmap-whitened.png, layers.png and (when
    the fine-tuning effect ran) finetune.png."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    heatmap(results, out / "heatmap.png")
    heatmap(results, out / "heatmap-whitened.png", g="whitened_cosine")
    layer_sweep(results, out / "layers.png")
    if results.get("finetune"):
        finetune_plot(results, out / "finetune.png")
