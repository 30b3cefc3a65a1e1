"""Ranking cached training examples against a behaviour query, and per-token explanations."""

from dataclasses import dataclass
from typing import Any

import torch

from lensattr.cache import Cache, CacheError, open_cache
from lensattr.capture import LayerActs, capture
from lensattr.data import Example, load_examples
from lensattr.models import load_model
from lensattr.query import Query, as_query
from lensattr.registry import get_phi, get_score
from lensattr.render import collate, encode


@dataclass
class Ranking:
    """Top (or bottom) examples: ``ids[i]`` has ``scores[i]`` and cache row ``rows[i]``."""

    ids: list[str]
    scores: torch.Tensor
    rows: torch.Tensor
    layer: int
    phi: str
    g: str

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ScoreContext:
    """What a scoring rule may need beyond a block of rows: the cache, statistic and layer."""

    cache: Cache
    phi: str
    layer: int


def rank(
    cache: Any,
    query: Any,
    *,
    layer: int | None = None,
    phi: str | None = None,
    g: str = "cosine",
    top_k: int | None = 100,
    bottom: bool = False,
    chunk_rows: int | None = None,
) -> Ranking:
    """Score every cached example against ``query`` and keep the top (or bottom) ``top_k``.

    Scores follow the registered rule ``g`` (default cosine); higher = more associated with the
    treatment side. The cache is streamed in blocks of ``chunk_rows`` rows (never a full fp32
    copy); a layer sweep calls this once per layer on the same cache.

    Args:
        cache: an opened :class:`~lensattr.cache.Cache` or its directory.
        query: a :class:`~lensattr.query.Query` (or a saved one's path).
        layer: block index (default: the query's only layer, else the middle one).
        phi: cached statistic (default: the query's ``stat``).
        g: registered score name.
        top_k: how many to keep (``None``: all, sorted).
        bottom: keep the lowest scores instead.
        chunk_rows: rows converted to fp32 at a time (default: about 32 MiB worth).

    Raises:
        CacheError: the query was built with another model than the cache.

    Examples:
        >>> # r = rank(cache, query, layer=12, top_k=10); list(zip(r.ids, r.scores.tolist()))
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    query = as_query(query)
    cache.check({"model": query.model})
    layer = query.layers[len(query.layers) // 2] if layer is None else layer
    phi = phi or query.stat
    psi = query.vector(layer).float()
    score = get_score(g)
    ctx = ScoreContext(cache=cache, phi=phi, layer=layer)
    view = cache.stat(phi, layer)
    chunk_rows = chunk_rows or max(1024, (32 << 20) // (4 * view.d_model))
    k = len(view) if top_k is None else min(top_k, len(view))
    best_s = torch.empty(0)
    best_i = torch.empty(0, dtype=torch.long)
    for start, rows, norms in view.chunks(chunk_rows):  # never a full fp32 copy
        s = score.fn(rows.float(), norms, psi, ctx)
        s = -s if bottom else s
        top = torch.topk(s, min(k, len(s)))
        best_s = torch.cat([best_s, top.values])
        best_i = torch.cat([best_i, top.indices + start])
        keep = torch.topk(best_s, min(k, len(best_s)))
        best_s, best_i = keep.values, best_i[keep.indices]
    scores = -best_s if bottom else best_s
    return Ranking(
        ids=[cache.ids[i] for i in best_i.tolist()],
        scores=scores,
        rows=best_i,
        layer=layer,
        phi=phi,
        g=g,
    )


def examples_by_id(cache: Cache, ids: list[str]) -> list[Example]:
    """The training examples behind ``ids``, read from the file recorded in the manifest."""
    path = cache.manifest["train"].get("path")
    if not path:
        raise CacheError("the cache was built from in-memory data; pass the examples yourself")
    table = {ex.id: ex for ex in load_examples(path, on_error="skip")}
    return [table[i] for i in ids]


@dataclass
class Explanation:
    """Per-token contributions of one example's response to its score."""

    tokens: list[str]
    contributions: torch.Tensor  # [n_response] = s_token . psi
    total: float  # mean of contributions = <phi(x), psi>


def explain(
    model: Any,
    example: Any,
    query: Query,
    layer: int,
    *,
    phi: str | None = None,
    max_length: int | None = 512,
) -> Explanation:
    """Which response tokens of ``example`` drive its score: each token's statistic dotted with psi.

    The statistic of token ``p`` is the phi evaluated with the response mask restricted to ``p``;
    for the mean-pooled built-ins the contributions average exactly to ``<phi(x), psi>``.

    Examples:
        >>> from lensattr import behavior_query, load_model
        >>> m = load_model("tiny-random")
        >>> q = behavior_query(m, [{"prompt": "Q", "treatment": "Yes", "control": "No"}], layers=2)
        >>> e = explain(m, {"id": "x", "prompt": "Q", "response": "Sure"}, q, 2)
        >>> len(e.tokens) == len(e.contributions)
        True
    """
    model = load_model(model)
    ex = example if isinstance(example, Example) else load_examples([example])[0]
    stat = get_phi(phi or query.stat)
    enc = encode(model.tokenizer, ex, max_length)
    batch = collate([enc], model.pad_id, "right", str(model.device))
    acts = capture(model, batch, [layer], grad=stat.needs_grad, sites=stat.sites)[layer]
    positions = batch.mask[0].nonzero()[:, 0]
    n = len(positions)
    one_hot = torch.zeros((n, batch.mask.shape[1]), dtype=torch.bool, device=batch.mask.device)
    one_hot[torch.arange(n), positions] = True

    def expand(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.expand(n, *x.shape[1:])

    single = LayerActs(
        z_in=acts.z_in.expand(n, -1, -1),
        z_out=acts.z_out.expand(n, -1, -1),
        grad=expand(acts.grad),
        mask=one_hot,
        attn_out=expand(acts.attn_out),
        mlp_out=expand(acts.mlp_out),
    )
    contrib = stat.fn(single).float().cpu() @ query.vector(layer)
    tokens = [model.tokenizer.decode([t]) for t in enc.ids[enc.n_prompt :]]
    return Explanation(tokens=tokens, contributions=contrib, total=float(contrib.mean()))
