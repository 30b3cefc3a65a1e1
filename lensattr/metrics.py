"""Ranking metrics: precision among the pool (the headline) and planted AUROC (secondary)."""

from collections.abc import Iterator
from typing import Any

import numpy as np
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


CODINGS = ("relevant", "planted")
"""How :func:`pool_metrics` reads labels: ``"relevant"``: 1 (or ``True``) = an example of the
behaviour, 0 = any other; ``"planted"``: 1 = a planted example of the behaviour, 0 = its decoy
(the same prompt with a behaviour-free reply), -1 = an unrelated (clean) example."""


def as_labels(labels: Any, n: int, coding: str, what: str = "pool_metrics") -> torch.Tensor:
    """``labels`` (a tensor, array or list of ints or bools) as a long tensor, checked: one per
    score (``n``), each a value of ``coding`` (:data:`CODINGS`), at least one 1.

    Examples:
        >>> as_labels([True, False, 1], 3, "relevant").tolist()
        [1, 0, 1]
    """
    if coding not in CODINGS:
        raise ValueError(f"{what}: coding={coding!r} is not one of {CODINGS}")
    t = (
        labels.detach().cpu()
        if isinstance(labels, torch.Tensor)
        else torch.as_tensor(np.asarray(labels))
    )
    if t.dtype == torch.bool:
        t = t.long()
    if t.is_floating_point() and bool((t != t.round()).any()):
        raise ValueError(f"{what}: labels must be integers (or bools), got {t.dtype}")
    t = t.long().flatten()
    if len(t) != n:
        raise ValueError(f"{what}: {len(t)} labels for {n} scores; give one label per score")
    allowed = {0, 1} if coding == "relevant" else {-1, 0, 1}
    bad = sorted(set(t.unique().tolist()) - allowed)
    if bad:
        hint = (
            "; for 1 = behaviour, 0 = decoy, -1 = clean pass coding='planted'"
            if coding == "relevant" and bad == [-1]
            else ""
        )
        raise ValueError(
            f"{what}: labels {bad} are not {coding!r} labels (those are "
            f"{', '.join(map(str, sorted(allowed, reverse=True)))}){hint}"
        )
    if not bool((t == 1).any()):
        raise ValueError(f"{what} needs at least one label-1 example")
    return t


def _as_scores(scores: Any) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        return scores.detach().cpu().double().flatten()
    return torch.as_tensor(np.asarray(scores, dtype=np.float64)).flatten()


def pool_metrics(
    scores: Any, labels: Any, *, coding: str = "relevant", n_boot: int = 0, seed: int = 0
) -> dict[str, Any]:
    """How high a behaviour's examples rank among everything else in the pool.

    ``scores`` and ``labels``: one per pool example (tensors, arrays or lists). ``labels`` read
    by ``coding``:

    - ``"relevant"`` (default): 1 (or ``True``) = an example of the behaviour, 0 = any other;
    - ``"planted"``: 1 = a planted example of the behaviour, 0 = its decoy (the same prompt with
      a behaviour-free reply), -1 = an unrelated (clean) example (the benchmark's labels).

    Returns

    - ``k``: the number of label-1 examples;
    - ``p_at_k``: precision@k of the label-1 examples against every other example (the
      headline);
    - ``ap``: their average precision against every other example;
    - with ``"relevant"``: ``auroc``, AUROC of label 1 vs label 0, and ``above_median``, how
      many label-0 examples rank above the median label-1 example;
    - with ``"planted"``: ``auroc_planted``, AUROC of label 1 vs label 0 (the decoys;
      secondary), and ``clean_above_median``, how many clean examples rank above the median
      label-1 example;
    - with ``n_boot > 0``, 95% bootstrap intervals ``p_at_k_ci`` and ``ap_ci`` (resampling the
      examples within each label).

    Raises:
        ValueError: labels of another coding, not one per score, or no label-1 example.

    Examples:
        >>> s = [0.9, 0.8, 0.5, 0.4, 0.1]
        >>> m = pool_metrics(s, [1, 0, 1, 0, 0])
        >>> m["p_at_k"], round(m["ap"], 3), m["above_median"], round(m["auroc"], 3)
        (0.5, 0.833, 1, 0.833)
        >>> m = pool_metrics(s, [1, -1, 1, 0, -1], coding="planted")
        >>> m["p_at_k"], m["clean_above_median"], m["auroc_planted"]
        (0.5, 1, 1.0)
    """
    positive_int("n_boot", n_boot, least=0)
    scores = _as_scores(scores)
    labels = as_labels(labels, len(scores), coding)
    pos = labels == 1
    k = int(pos.sum())
    order = _order(scores)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(len(order))
    pos_ranks = rank_of[pos].sort().values
    median_rank = int(pos_ranks[k // 2])  # the upper median
    out: dict[str, Any] = {
        "k": k,
        "p_at_k": precision_at_k(scores, pos, k),
        "ap": average_precision(scores, pos),
    }
    if coding == "relevant":
        out["above_median"] = int(((labels == 0) & (rank_of < median_rank)).sum())
        out["auroc"] = auroc(scores, pos.long())
    else:
        plant = labels >= 0
        out["clean_above_median"] = int(((labels == -1) & (rank_of < median_rank)).sum())
        out["auroc_planted"] = auroc(scores[plant], pos[plant].long())
    if n_boot > 0:
        pk, ap = [], []
        for idx in _resamples(labels, n_boot, seed):
            pk.append(precision_at_k(scores[idx], pos[idx], k))
            ap.append(average_precision(scores[idx], pos[idx]))
        out["p_at_k_ci"], out["ap_ci"] = _interval(pk), _interval(ap)
    return out


def pool_metrics_difference(
    scores: Any,
    baseline: Any,
    labels: Any,
    *,
    coding: str = "relevant",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How much better one ranking of a pool finds the behaviour's examples than another.

    Two methods' precision@k on one pool each carry the pool's own luck; their difference is
    judged on the same resamples of the pool (a paired bootstrap), so the luck they share
    cancels and the interval is usually much narrower than the two separate ones. ``labels``
    and ``coding`` as in :func:`pool_metrics`. Returns ``p_at_k`` and ``ap``, ``scores``'s minus
    ``baseline``'s on the whole pool, and their 95% paired bootstrap intervals
    ``p_at_k_ci`` and ``ap_ci`` (``n_boot`` resamples of the examples within each label, both
    rankings scored on each).

    Examples:
        >>> lab = [1, 1, 0, 0, 0, 0]
        >>> a = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.0])  # both label-1 examples on top
        >>> b = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.0])  # one of them below four others
        >>> d = pool_metrics_difference(a, b, lab, n_boot=200)
        >>> d["p_at_k"], round(d["ap"], 3)
        (0.5, 0.3)
        >>> d["p_at_k_ci"][0] >= 0.0
        True
    """
    positive_int("n_boot", n_boot, least=0)
    scores, baseline = _as_scores(scores), _as_scores(baseline)
    if scores.shape != baseline.shape:
        raise ValueError(
            f"pool_metrics_difference: {len(scores)} scores but {len(baseline)} baseline "
            "scores; give one of each per pool example"
        )
    labels = as_labels(labels, len(scores), coding, "pool_metrics_difference")
    pos = labels == 1
    k = int(pos.sum())

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
