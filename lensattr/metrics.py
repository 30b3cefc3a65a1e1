"""Ranking metrics: precision among the pool (the headline) and planted AUROC (secondary)."""

from collections.abc import Iterator
from typing import Any

import torch

from lensattr.checks import positive_int, same_length


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``labels`` (1 = positive) by ``scores`` (ties count one half).

    Mann-Whitney U statistic over average ranks.

    Examples:
        >>> auroc(torch.tensor([0.9, 0.8, 0.1, 0.3]), torch.tensor([1, 1, 0, 0]))
        1.0
        >>> auroc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0]))
        0.5
    """
    same_length("auroc", scores=scores, labels=labels)
    scores, labels = scores.double(), labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    # average ranks over ties
    uniq, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    avg = first + (counts - 1) / 2.0
    ranks[order] = avg[inverse].to(scores.dtype)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Row order of a ranking: highest score first, ties by row index, non-finite scores last."""
    s = scores.double().nan_to_num(nan=-torch.inf, posinf=-torch.inf)
    return torch.sort(-s, stable=True).indices


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision (area under the precision-recall curve) of ``labels`` by ``scores``:
    the mean over positives of the precision at each positive's rank (ties by row index).

    Examples:
        >>> average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 0, 1]))
        0.8333333333333333
    """
    same_length("average_precision", scores=scores, labels=labels)
    hit = labels.bool()[_order(scores)]
    n_pos = int(hit.sum())
    if n_pos == 0:
        return float("nan")
    ranks = torch.nonzero(hit)[:, 0].double() + 1
    return float((torch.arange(1, n_pos + 1, dtype=torch.float64) / ranks).mean())


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of positives among the ``k`` highest scores (ties by row index).

    Examples:
        >>> precision_at_k(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 1]), 2)
        0.5
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    same_length("precision_at_k", scores=scores, labels=labels)
    top = _order(scores)[:k]
    return float(labels.bool()[top].double().mean())


def pool_metrics(
    scores: torch.Tensor, labels: torch.Tensor, *, n_boot: int = 0, seed: int = 0
) -> dict[str, Any]:
    """How high a behaviour's examples rank among everything else in the pool.

    ``labels``: 1 = an example of the behaviour (a label-1 plant), 0 = a decoy (the same prompt
    with the behaviour-free reply), -1 = an unrelated (clean) example. Returns

    - ``p_at_k``: precision@k of the label-1 examples against every other example, with
      ``k`` = the number of label-1 examples (the headline);
    - ``ap``: their average precision against every other example;
    - ``clean_above_median``: how many clean examples rank above the median label-1 example;
    - ``auroc_planted``: AUROC of label 1 vs label 0 (secondary);
    - with ``n_boot > 0``, 95% bootstrap intervals ``p_at_k_ci`` and ``ap_ci`` (resampling the
      examples within each label).

    Examples:
        >>> s = torch.tensor([0.9, 0.8, 0.5, 0.4, 0.1])
        >>> m = pool_metrics(s, torch.tensor([1, -1, 1, 0, -1]))
        >>> m["p_at_k"], round(m["ap"], 3), m["clean_above_median"], m["auroc_planted"]
        (0.5, 0.833, 1, 1.0)
    """
    same_length("pool_metrics", scores=scores, labels=labels)
    positive_int("n_boot", n_boot, least=0)
    labels = labels.long()
    pos = labels == 1
    k = int(pos.sum())
    if k == 0:
        raise ValueError("pool_metrics needs at least one label-1 example")
    order = _order(scores)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(len(order))
    pos_ranks = rank_of[pos].sort().values
    median_rank = int(pos_ranks[k // 2])  # the upper median
    plant = labels >= 0
    out: dict[str, Any] = {
        "k": k,
        "p_at_k": precision_at_k(scores, pos, k),
        "ap": average_precision(scores, pos),
        "clean_above_median": int(((labels == -1) & (rank_of < median_rank)).sum()),
        "auroc_planted": auroc(scores[plant], pos[plant].long()) if plant.any() else float("nan"),
    }
    if n_boot > 0:
        pk, ap = [], []
        for idx in _resamples(labels, n_boot, seed):
            pk.append(precision_at_k(scores[idx], pos[idx], k))
            ap.append(average_precision(scores[idx], pos[idx]))
        out["p_at_k_ci"], out["ap_ci"] = _interval(pk), _interval(ap)
    return out


def pool_metrics_difference(
    scores: torch.Tensor,
    baseline: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How much better one ranking of a pool finds the behaviour's examples than another.

    Two methods' precision@k on one pool each carry the pool's own luck; their difference is
    judged on the same resamples of the pool (a paired bootstrap), so the luck they share
    cancels and the interval is usually much narrower than the two separate ones. ``labels``
    as in :func:`pool_metrics`. Returns ``p_at_k`` and ``ap``, ``scores``'s minus
    ``baseline``'s on the whole pool, and their 95% paired bootstrap intervals
    ``p_at_k_ci`` and ``ap_ci`` (``n_boot`` resamples of the examples within each label, both
    rankings scored on each).

    Examples:
        >>> lab = torch.tensor([1, 1, 0, -1, -1, -1])
        >>> a = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.0])  # both label-1 examples on top
        >>> b = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.0])  # one of them below four others
        >>> d = pool_metrics_difference(a, b, lab, n_boot=200)
        >>> d["p_at_k"], round(d["ap"], 3)
        (0.5, 0.3)
        >>> d["p_at_k_ci"][0] >= 0.0
        True
    """
    positive_int("n_boot", n_boot, least=0)
    labels = labels.long()
    pos = labels == 1
    k = int(pos.sum())
    if k == 0:
        raise ValueError("pool_metrics_difference needs at least one label-1 example")
    if scores.shape != baseline.shape or scores.shape != labels.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)}, baseline {tuple(baseline.shape)} and labels "
            f"{tuple(labels.shape)} must be one value per pool example each"
        )

    def gap(idx: torch.Tensor | None) -> tuple[float, float]:
        a, b, p = (scores, baseline, pos) if idx is None else (scores[idx], baseline[idx], pos[idx])
        return (
            precision_at_k(a, p, k) - precision_at_k(b, p, k),
            average_precision(a, p) - average_precision(b, p),
        )

    pk, ap = gap(None)
    boot = [gap(idx) for idx in _resamples(labels, n_boot, seed)]
    return {
        "k": k,
        "p_at_k": pk,
        "ap": ap,
        "p_at_k_ci": _interval([g[0] for g in boot]),
        "ap_ci": _interval([g[1] for g in boot]),
    }


def _resamples(labels: torch.Tensor, n_boot: int, seed: int) -> Iterator[torch.Tensor]:
    """``n_boot`` bootstrap resamples of the pool's row indices, each label's examples drawn
    with replacement among themselves (so every resample keeps the pool's label counts)."""
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(labels == v)[:, 0] for v in (-1, 0, 1)]
    for _ in range(n_boot):
        yield torch.cat(
            [g[torch.randint(len(g), (len(g),), generator=gen)] for g in groups if len(g)]
        )


def _interval(vals: list[float]) -> list[float]:
    """The central 95% of bootstrap values."""
    t = torch.tensor(vals, dtype=torch.float64)
    return [float(t.quantile(0.025)), float(t.quantile(0.975))]
