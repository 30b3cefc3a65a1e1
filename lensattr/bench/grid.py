"""The method grid of the planted-recovery benchmark: queries, scores, layer choice, metrics.

Methods are ``psi|phi|g`` triples: psi (rows) is the treatment-minus-control contrast of a
statistic (:data:`PSI_STATS`) or the persona vector; phi (columns) is a cached statistic
(:data:`PHI_STATS`) or ``projdiff`` (pooled z_out of the training reply minus that of the model's
own greedy reply to the same prompt); g is a registered score (:data:`SCORES`). Plus ``trak``
and ``random``.

No peeking: each method's layer is chosen from the query pairs alone (:func:`cv_accuracy`: 2
interleaved folds; psi from one, the fraction of the other's pairs whose treatment reply
scores above its control reply), and so is each behaviour's best method. Plant labels are only
used by :func:`planted_metrics` to report.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from lensattr.builtins import _row_moments
from lensattr.capture import capture
from lensattr.data import Example, Pair
from lensattr.metrics import auroc, bootstrap_auroc, precision_recall_at_k
from lensattr.models import Model
from lensattr.registry import get_phi, get_score
from lensattr.render import collate, encode

PSI_STATS = {
    "residual_change": "residual_change",
    "residual_change_exact": "residual_change_exact",
    "residual_diff": "resid_post",
    "grad": "grad",
}
"""psi row name -> the statistic whose treatment-minus-control contrast it is."""
PHI_STATS = ("residual_change", "residual_change_exact", "resid_post", "grad", "projdiff")
SCORES = ("cosine", "centered_cosine", "whitened_cosine")


@dataclass
class Ctx:
    """A score context carrying precomputed moments ``(mu, W)`` of phi over the training pool."""

    moments: tuple[torch.Tensor, torch.Tensor] | None = None


def side_stats(
    model: Model,
    examples: Sequence[Example],
    layers: Sequence[int],
    stats: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = 256,
    progress: bool | None = None,
    desc: str = "stats",
) -> dict[str, dict[int, torch.Tensor]]:
    """``{stat: {layer: [n, d]}}`` of ``examples`` in order (one capture per batch, all stats)."""
    phis = [get_phi(s) for s in stats]
    need = any(p.needs_grad for p in phis)
    encs = [encode(model.tokenizer, ex, max_length) for ex in examples]
    out = {s: {la: torch.zeros((len(encs), model.d_model)) for la in layers} for s in stats}
    disable = None if progress is None else not progress
    for i in tqdm(range(0, len(encs), batch_size), desc=desc, disable=disable):
        batch = collate(encs[i : i + batch_size], model.pad_id, "right", str(model.device))
        acts = capture(model, batch, layers, grad=need)
        for la in layers:
            for p in phis:
                out[p.name][la][i : i + len(batch.ids)] = p.fn(acts[la]).float().cpu()
    return out


def query_stats(
    model: Model,
    pairs: Sequence[Pair],
    layers: Sequence[int],
    *,
    stats: Sequence[str] = ("residual_change", "residual_change_exact", "resid_post", "grad"),
    **kw: Any,
) -> dict[str, dict[str, dict[int, torch.Tensor]]]:
    """``{"t": treatment-side stats, "c": control-side stats}`` (see :func:`side_stats`)."""
    sides = [ex for p in pairs for ex in p.sides()]
    s = side_stats(model, sides, layers, stats, **kw)
    return {
        "t": {k: {la: v[0::2] for la, v in d.items()} for k, d in s.items()},
        "c": {k: {la: v[1::2] for la, v in d.items()} for k, d in s.items()},
    }


def persona_vectors(
    model: Model,
    spec: dict[str, Any],
    layers: Sequence[int],
    *,
    max_new_tokens: int = 32,
    **kw: Any,
) -> dict[int, torch.Tensor]:
    """``{layer: mean(pooled z_out | positive) - mean(pooled z_out | neutral)}`` (unnormalised)."""
    from lensattr.persona import persona_pairs

    pairs = persona_pairs(model, spec, max_new_tokens=max_new_tokens)
    if not pairs:
        raise ValueError("persona generation gave no non-empty reply pairs")
    q = query_stats(model, pairs, layers, stats=("resid_post",), **kw)
    return {la: (q["t"]["resid_post"][la] - q["c"]["resid_post"][la]).mean(0) for la in layers}


def methods(has_persona: bool) -> list[tuple[str, str, str]]:
    """Every ``(psi, phi, g)`` of the grid (the persona row only when there is a persona spec)."""
    rows = list(PSI_STATS) + (["persona"] if has_persona else [])
    return [(r, c, g) for r in rows for c in PHI_STATS for g in SCORES]


def _psi(
    q: dict[str, Any],
    psi: str,
    layer: int,
    idx: torch.Tensor | None = None,
    persona: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    if psi == "persona":
        assert persona is not None
        return persona[layer]
    s = PSI_STATS[psi]
    t, c = q["t"][s][layer], q["c"][s][layer]
    if idx is not None:
        t, c = t[idx], c[idx]
    return (t - c).mean(0)


def _score(g: str, rows: torch.Tensor, psi: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    return get_score(g).fn(rows, rows.norm(dim=1), psi.float(), ctx)


def cv_accuracy(
    q: dict[str, Any],
    psi: str,
    phi: str,
    g: str,
    layer: int,
    ctx: Ctx,
    persona: dict[int, torch.Tensor] | None = None,
    folds: int = 2,
) -> float:
    """Held-out pairwise accuracy on the query pairs: psi from the other folds (the persona
    vector is not built from them, so all pairs are held out), then the fraction of held-out
    pairs with ``g(phi(treatment), psi) > g(phi(control), psi)``. ``projdiff`` rows of a pair
    share the greedy reply, so their difference equals that of ``resid_post`` rows; the
    resid_post rows stand in for them here.
    """
    stat = "resid_post" if phi == "projdiff" else phi
    t, c = q["t"][stat][layer], q["c"][stat][layer]
    n = len(t)
    if psi == "persona":
        st, sc = (
            _score(g, t, _psi(q, psi, layer, persona=persona), ctx),
            _score(g, c, _psi(q, psi, layer, persona=persona), ctx),
        )
        return float((st > sc).double().mean())
    hits = 0
    for k in range(folds):
        test = torch.arange(k, n, folds)
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        v = _psi(q, psi, layer, train.nonzero()[:, 0])
        hits += int((_score(g, t[test], v, ctx) > _score(g, c[test], v, ctx)).sum())
    return hits / n


def planted_metrics(scores: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, float]:
    """AUROC of label-1 vs label-0 plants (label -1 = clean, ignored) and precision / recall of
    label-1 plants in the top ``k`` of the whole sub-pool."""
    plant = labels >= 0
    p, r = precision_recall_at_k(scores, (labels == 1).long(), k)
    return {"auroc": auroc(scores[plant], labels[plant]), "p_at_k": p, "r_at_k": r}


def pool_moments(rows: torch.Tensor) -> Ctx:
    """The score context of a training pool: its mean and ridge whitener of phi."""
    return Ctx(moments=_row_moments(rows, 1e-2))


def grid_layer(
    pool_rows: dict[str, torch.Tensor],
    queries: dict[str, dict[str, Any]],
    personas: dict[str, dict[int, torch.Tensor] | None],
    subpools: dict[str, tuple[torch.Tensor, torch.Tensor]],
    layer: int,
    k: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Every method of every behaviour at one layer: ``{behaviour: {method: metrics + cv}}``.

    ``pool_rows``: ``{phi: [n_pool, d]}`` at ``layer``; ``subpools``: ``{behaviour: (row index,
    labels)}`` with labels 1 / 0 for plants and -1 for clean rows.
    """
    ctxs = {phi: pool_moments(rows) for phi, rows in pool_rows.items()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, q in queries.items():
        idx, labels = subpools[name]
        res: dict[str, dict[str, float]] = {}
        for psi, phi, g in methods(personas.get(name) is not None):
            if phi not in pool_rows:  # a column that was not run (e.g. projdiff)
                continue
            v = _psi(q, psi, layer, persona=personas.get(name))
            s = _score(g, pool_rows[phi][idx], v, ctxs[phi])
            m = planted_metrics(s, labels, min(k, int((labels == 1).sum())))
            m["cv"] = cv_accuracy(q, psi, phi, g, layer, ctxs[phi], personas.get(name))
            res[f"{psi}|{phi}|{g}"] = m
        out[name] = res
    return out


def choose(layers_metrics: dict[int, dict[str, float]]) -> int:
    """The layer with the best query-pair CV accuracy (ties: the deeper layer)."""
    return max(layers_metrics, key=lambda la: (layers_metrics[la]["cv"], la))


def interval(scores: torch.Tensor, labels: torch.Tensor, n_boot: int) -> list[float]:
    """95% bootstrap interval of the planted AUROC (plants only)."""
    plant = labels >= 0
    return list(bootstrap_auroc(scores[plant], labels[plant], n=n_boot))


def score_method(
    method: str,
    layer: int,
    pool_rows: dict[str, torch.Tensor],
    q: dict[str, Any],
    persona: dict[int, torch.Tensor] | None,
    idx: torch.Tensor,
) -> torch.Tensor:
    """Scores of the sub-pool rows ``idx`` under ``psi|phi|g`` at ``layer`` (for top-k selection
    and bootstrap intervals)."""
    psi, phi, g = method.split("|")
    v = _psi(q, psi, layer, persona=persona)
    return _score(g, pool_rows[phi][idx], v, pool_moments(pool_rows[phi]))
