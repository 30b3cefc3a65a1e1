"""Ranking metrics for planted-recovery checks."""

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``labels`` (1 = positive) by ``scores`` (ties count one half).

    Mann-Whitney U statistic over average ranks.

    Examples:
        >>> auroc(torch.tensor([0.9, 0.8, 0.1, 0.3]), torch.tensor([1, 1, 0, 0]))
        1.0
        >>> auroc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0]))
        0.5
    """
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


def precision_recall_at_k(
    scores: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[float, float]:
    """Precision and recall of the positives among the ``k`` highest scores.

    Examples:
        >>> precision_recall_at_k(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 1]), 2)
        (0.5, 0.5)
    """
    top = torch.topk(scores, min(k, len(scores))).indices
    hits = int(labels.bool()[top].sum())
    n_pos = int(labels.bool().sum())
    return hits / max(len(top), 1), hits / n_pos if n_pos else float("nan")


def bootstrap_auroc(
    scores: torch.Tensor, labels: torch.Tensor, n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of :func:`auroc` (resampling within each class)."""
    gen = torch.Generator().manual_seed(seed)
    pos, neg = scores[labels.bool()], scores[~labels.bool()]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    lab = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    vals = []
    for _ in range(n):
        p = pos[torch.randint(len(pos), (len(pos),), generator=gen)]
        q = neg[torch.randint(len(neg), (len(neg),), generator=gen)]
        vals.append(auroc(torch.cat([p, q]), lab))
    t = torch.tensor(vals)
    return float(t.quantile(0.025)), float(t.quantile(0.975))
