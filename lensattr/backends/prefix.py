"""The prompt prefix of a capture: what runs forward-only before the traced pass.

Statistics pooled over the response (the built-ins') read the positions from the one that
predicts a row's first response token on. A capture with ``keep_prompt=False`` runs each row's
positions before that one forward-only, without a graph, and the traced pass continues from their
keys and values with each row's *continuation* (that position and everything after it):

    collated row i:   [ prompt_i[:c_i]                 | continuation_i      | pad ]
    traced pass:      keys  [ opening | gap | rest_i ] + [ continuation_i | pad ]

A gradient capture cuts every row at its own ``c_i`` (``per_row=True``), so its graph holds rows x
the longest continuation, however the prompts' lengths differ; a forward-only capture cuts every
row at the batch's smallest ``c_i`` (the continuations then hold the rest of the longer prompts,
which a forward-only pass runs anyway). The gap columns are masked out of attention and carry
zeros. A position's activations reach only itself and later positions, so everything from ``c_i``
on, ``g`` included, is what one pass over the whole row gives (up to float rounding;
``tests/test_capture.py`` checks it against hooks and autograd).

Nothing runs twice: identical prompts run once (a pair's two replies share theirs); the leading
positions all of them share (a chat template's default system prompt, 24 of SmolLM2's tokens) run
once on one row; the rest run in calls of prompts of similar length (:func:`call_groups`).
"""

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from lensattr.render import Batch

CALL_POSITIONS = 16
"""What one extra forward call of the prefix costs, in row-positions of work: its fixed cost
(SmolLM2-135M on one CPU thread: ~33 ms a call, ~2.4 ms a position)."""


_OPENINGS: ContextVar[dict[tuple[int, tuple[int, ...]], Any] | None] = ContextVar(
    "lensattr_openings", default=None
)


@contextmanager
def openings_kept() -> Iterator[None]:
    """Inside it, an opening (the positions every prompt of a batch shares) is run once and its
    keys and values kept for later batches: for one build or one set of pairs, whose model does
    not change meanwhile (a chat template's system prompt: one call of ~90 ms a batch saved).

    Examples:
        >>> with openings_kept():
        ...     pass  # captures here reuse the openings they have run
    """
    token = _OPENINGS.set({})
    try:
        yield
    finally:
        _OPENINGS.reset(token)


def _opening(base: Any, ids: torch.Tensor) -> Any:
    """The keys and values of ``ids`` (one row from position 0), kept inside
    :func:`openings_kept`."""
    kept = _OPENINGS.get()
    key = (id(base), tuple(ids.tolist()))
    if kept is not None and key in kept:
        return kept[key]
    positions = torch.arange(len(ids), device=ids.device)[None]
    opening = cache_of(base(input_ids=ids[None], position_ids=positions, use_cache=True))
    if kept is not None:
        kept[key] = opening
    return opening


@dataclass
class Continuation:
    """The traced part of a batch after its prompt prefix (row ``i`` of the batch in row ``i``).

    Attributes:
        input_ids: each row's tokens from its cut on, right-padded.
        mask: True at response positions, as ``input_ids``.
        attention_mask: the prefix's columns (opening, gap, each row's rest) then the
            continuation's.
        position_ids: each position's place in its row (padding not counted).
        cache: the prefix's keys and values (the forward keyword :func:`cache_keyword`).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: Any


def prompt_cuts(batch: Batch, *, per_row: bool) -> list[int] | None:
    """Where each row's continuation begins, counted in its tokens (padding not counted): the
    position that predicts its first response token (``per_row``), or the smallest of them in
    every row; ``None`` when nothing is cut (a row has no response, or no prompt before it).

    Examples:
        >>> from lensattr.render import Encoded, collate
        >>> b = collate([Encoded("a", (1, 2, 3, 4, 5), 3), Encoded("b", (1, 2, 3), 1)], 0)
        >>> prompt_cuts(b, per_row=True), prompt_cuts(b, per_row=False)
        ([2, 0], None)
    """
    real = batch.attention_mask.bool()
    first = []
    for row_mask, row_real in zip(batch.mask, real, strict=True):
        response = row_mask[row_real]
        if not bool(response.any()):
            return None
        first.append(max(int(response.int().argmax()) - 1, 0))
    cuts = first if per_row else [min(first)] * len(first)
    return cuts if max(cuts) > 0 else None


def call_groups(lengths: list[int], call: int = CALL_POSITIONS) -> list[list[int]]:
    """Indices of ``lengths`` in forward calls of right-padded rows: the cheapest partition,
    counting each call as ``call`` plus rows x its longest (contiguous runs by length are
    optimal for this cost; found by dynamic programming over them).

    Examples:
        >>> call_groups([50, 3, 48, 5]), call_groups([50, 3, 48, 5], call=1000)
        ([[1, 3], [2, 0]], [[1, 3, 2, 0]])
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [0] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best[end], start[end] = min(
            (best[b] + call + (end - b) * lengths[order[end - 1]], b) for b in range(end)
        )
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def split_prompts(model: Any, batch: Batch, *, per_row: bool) -> Continuation | None:
    """Run ``batch``'s prompt prefixes forward-only and return the traced part (``None``: nothing
    to cut, see :func:`prompt_cuts`). ``model``: an
    :class:`~lensattr.backends.capture.NnsightModel`."""
    cuts = prompt_cuts(batch, per_row=per_row)
    if cuts is None:
        return None
    real = batch.attention_mask.bool()
    rows = [ids[r] for ids, r in zip(batch.input_ids, real, strict=True)]
    response = [m[r] for m, r in zip(batch.mask, real, strict=True)]
    width = max(len(r) - c for r, c in zip(rows, cuts, strict=True))
    n, device = len(rows), batch.input_ids.device
    ids = torch.full((n, width), model.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.bool, device=device)
    attention = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, (row, c) in enumerate(zip(rows, cuts, strict=True)):
        ids[i, : len(row) - c] = row[c:]
        mask[i, : len(row) - c] = response[i][c:]
        attention[i, : len(row) - c] = 1
    # Pads get positions too (never attended to: later than every real query, masked as keys).
    positions = torch.tensor(cuts, device=device)[:, None] + torch.arange(width, device=device)
    cache, prefix_attention = _run_prefix(model, [r[:c] for r, c in zip(rows, cuts, strict=True)])
    return Continuation(
        input_ids=ids,
        mask=mask,
        attention_mask=torch.cat([prefix_attention, attention], dim=1),
        position_ids=positions,
        cache=cache,
    )


def _run_prefix(model: Any, prefixes: list[torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """The keys and values of ``prefixes`` (each row's tokens before its cut), laid out as in
    the module docstring, and their attention mask ``[rows, columns]``."""
    device = prefixes[0].device
    keys = [tuple(p.tolist()) for p in prefixes]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}  # identical prompts run once
    unique = [torch.tensor(k, dtype=torch.long, device=device) for k in index]
    where = torch.tensor([index[k] for k in keys], device=device)
    shared = 0
    if len(unique) > 1:  # the leading positions every prompt shares, one at least left to each
        shortest = min(len(u) for u in unique)
        stack = torch.stack([u[:shortest] for u in unique])
        shared = int((stack == stack[:1]).all(0).int().cumprod(0).sum())
        shared = min(shared, shortest - 1)
    rest = [len(u) - shared for u in unique]
    base = model.hf.get_submodule(model.paths.base)
    with torch.no_grad():
        opening = _opening(base, unique[0][:shared]) if shared else None
        groups = call_groups(rest, CALL_POSITIONS)
        if len(groups) == 1 and len(set(rest)) == 1:  # one call, no padding, no gap
            kv, attention = _call(model, base, [unique[j] for j in groups[0]], shared, opening)
            back = torch.tensor(groups[0], device=device).argsort()[where]
            kv.reorder_cache(back)
            return kv, attention[back]
        columns = shared + max(rest)
        laid: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in groups:
            kv, _ = _call(model, base, [unique[j] for j in group], shared, opening)
            if not laid:  # every row's columns start with the shared opening
                laid = [
                    (
                        _zeros(layer.keys, len(unique), columns),
                        _zeros(layer.values, len(unique), columns),
                    )
                    for layer in kv.layers
                ]
                for (k_all, v_all), layer in zip(laid, kv.layers, strict=True):
                    k_all[:, ..., :shared, :] = layer.keys[:1, ..., :shared, :]
                    v_all[:, ..., :shared, :] = layer.values[:1, ..., :shared, :]
            for (k_all, v_all), layer in zip(laid, kv.layers, strict=True):
                for row, j in enumerate(group):  # right-aligned: each row's rest ends at the cut
                    span = slice(shared, shared + rest[j])
                    k_all[j, ..., columns - rest[j] :, :] = layer.keys[row, ..., span, :]
                    v_all[j, ..., columns - rest[j] :, :] = layer.values[row, ..., span, :]
    for (k_all, v_all), layer in zip(laid, kv.layers, strict=True):
        layer.keys, layer.values = k_all[where], v_all[where]
    attention = torch.zeros((len(unique), columns), dtype=torch.long, device=device)
    attention[:, :shared] = 1
    for j, r in enumerate(rest):
        attention[j, columns - r :] = 1
    return kv, attention[where]


def _call(
    model: Any, base: Any, prompts: list[torch.Tensor], shared: int, opening: Any
) -> tuple[Any, torch.Tensor]:
    """One forward call of ``prompts`` after their ``shared`` opening (its keys and values
    ``opening``), right-padded (a pad is later than every real query, so none attends to it):
    the cache and the call's attention mask."""
    longest = max(len(p) for p in prompts) - shared
    device = prompts[0].device
    ids = torch.full((len(prompts), longest), model.pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(prompts), shared + longest), dtype=torch.long, device=device)
    attention[:, :shared] = 1
    for row, p in enumerate(prompts):
        ids[row, : len(p) - shared] = p[shared:]
        attention[row, shared : len(p)] = 1
    kwargs: dict[str, Any] = {}
    if opening is not None:
        kv = copy.deepcopy(opening)  # kept for later calls and batches: not extended in place
        kv.reorder_cache(torch.zeros(len(prompts), dtype=torch.long, device=device))
        kwargs[cache_keyword(base)] = kv
    out = base(
        input_ids=ids,
        attention_mask=attention,
        position_ids=shared + torch.arange(longest, device=device).expand_as(ids),
        use_cache=True,
        **kwargs,
    )
    return cache_of(out), attention


def _zeros(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Zeros shaped like a cache layer's ``[rows, heads, columns, head_dim]`` tensor."""
    return like.new_zeros(rows, *like.shape[1:-2], columns, like.shape[-1])


def has_sliding_window(config: Any) -> bool:
    """Whether a model's cache keeps a sliding window (its layers then cannot take the gaps of
    per-row cuts; such a model's captures cut every row at the batch's smallest cut)."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    return getattr(config, "sliding_window", None) is not None and bool(
        getattr(config, "use_sliding_window", True)
    )


def cache_of(out: Any) -> Any:
    """The key-value cache of a forward's output (``cache``, ``past_key_values`` before
    transformers 5)."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def cache_keyword(module: Any) -> str:
    """The forward keyword of the key-value cache: ``cache`` (transformers 5) or the older
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
