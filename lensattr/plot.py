"""Plots of a ranking's quality per layer (needs the ``demo`` extra: matplotlib).

Every plotting function returns a ``matplotlib.figure.Figure`` (a notebook shows it) and saves
it only when given a ``path``. None of them touches pyplot's state or its backend: a notebook's
``plt.show()`` works as before.

Examples:
    >>> # rows = layer_sweep(cache, query, labels)     # P@k, AP, AUROC at each query layer
    >>> # fig = plot_sweep({"my method": (rows, query.best_layer(), None)})
"""

from pathlib import Path
from typing import Any

from lensattr.layers import layer_text
from lensattr.metrics import pool_metrics
from lensattr.optional import require
from lensattr.query import as_query
from lensattr.rank import rank


def layer_sweep(
    cache: Any, query: Any, labels: Any, *, score: str | None = None, coding: str = "relevant"
) -> list[dict[str, Any]]:
    """Precision among the pool (P@k, AP) and AUROC of one query at each of its layers.

    Args:
        cache: the ranked cache (or its directory).
        query: a :class:`~lensattr.query.Query` (or anything :func:`~lensattr.rank` takes).
        labels: one per cache row, read by :func:`~lensattr.metrics.pool_metrics` with
            ``coding``.
        score: the registered score (default: the query's own).
        coding: ``"relevant"`` (1 / 0) or ``"planted"`` (1 / 0 / -1), as in
            :func:`~lensattr.metrics.pool_metrics`.

    Returns:
        One dict per layer: ``layer``, the :func:`~lensattr.metrics.pool_metrics` of the
        ranking at that layer, and ``heldout_accuracy`` (the query's, NaN if it has none).
    """
    query = as_query(query)
    rows = []
    for layer in query.layers:
        r = rank(cache, query, layer=layer, score=score, top_k=None)
        m = pool_metrics(r.scores_of(range(len(r))), labels, coding=coding)
        cv = (query.cv or {}).get(layer, float("nan"))
        rows.append({"layer": layer, **m, "heldout_accuracy": cv})
    return rows


def plot_sweep(
    sweeps: dict[str, tuple[list[dict[str, Any]], Any, float | None]],
    path: str | Path | None = None,
    title: str = "",
    *,
    metric: str = "p_at_k",
) -> Any:
    """``metric`` (precision@k) against layer for each method in ``sweeps``.

    Args:
        sweeps: ``{name: (rows, chosen, value)}``: the :func:`layer_sweep` rows of a method,
            the layer (or layer set) it chose, drawn as large dots, and for a layer set the
            metric of the mean over its layers (a dashed line; ``None``: not drawn).
        path: save the figure there (any format matplotlib writes); ``None``: do not save.
        title: the figure's title.
        metric: which column of the rows to plot (``"p_at_k"``, ``"ap"``, ...).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    figure = require("matplotlib.figure", "demo")
    fig = figure.Figure(figsize=(7.5, 3.8))  # not pyplot: no global figure, no backend change
    ax = fig.add_subplot()
    for name, (rows, chosen, value) in sweeps.items():
        layers = [r["layer"] for r in rows]
        (line,) = ax.plot(layers, [r[metric] for r in rows], marker=".", label=name)
        chosen = (chosen,) if isinstance(chosen, int) else tuple(chosen)
        at = [r[metric] for la in chosen for r in rows if r["layer"] == la]
        ax.plot(chosen, at, "o", ms=9, color=line.get_color())
        if len(chosen) > 1 and value is not None:
            ax.plot(
                [min(chosen), max(chosen)],
                [value, value],
                "--",
                color=line.get_color(),
                label=f"{name.split(':')[0]}: mean of layers {layer_text(chosen)}",
            )
    ax.set_xlabel("layer (large dots: the layer or layers chosen without labels)")
    ax.set_ylabel({"p_at_k": "precision@k among the pool"}.get(metric, metric))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
