"""Behaviour queries psi: one unit vector per layer, built from treatment/control pairs."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lensattr.cache import resolve_layers
from lensattr.capture import capture
from lensattr.data import Pair, load_pairs
from lensattr.models import Model, load_model
from lensattr.registry import get_phi, get_psi
from lensattr.render import collate, encode
from lensattr.types import Vec


@dataclass
class Query:
    """A behaviour query: a unit vector per layer, and what it was built from.

    Attributes:
        vectors: ``{layer: psi}`` with ``||psi|| = 1`` (fp32).
        psi: the registered psi name; ``stat``: the phi it is compared with by default.
        model: the model fingerprint (checked against a cache's manifest when ranking).
        n_pairs: how many pairs went in.
        cv: per-layer held-out accuracy on the query pairs (see :func:`heldout_accuracy`).
    """

    vectors: dict[int, torch.Tensor]
    psi: str
    stat: str
    model: dict[str, str]
    n_pairs: int
    cv: dict[int, float] | None = None

    def best_layer(self) -> int:
        """The layer whose query best separates held-out query pairs (:func:`heldout_accuracy`);
        ties go to the deeper layer."""
        if not self.cv:
            return self.layers[len(self.layers) // 2]
        return max(self.layers, key=lambda k: (self.cv.get(k, -1.0), k))  # type: ignore[union-attr]

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def vector(self, layer: int) -> Vec:
        if layer not in self.vectors:
            raise KeyError(f"the query has no layer {layer} (it has {self.layers})")
        return self.vectors[layer]

    def save(self, path: str | Path) -> None:
        """Write the query as safetensors (vectors) with JSON metadata."""
        meta = {
            "psi": self.psi,
            "stat": self.stat,
            "model": json.dumps(self.model),
            "n_pairs": str(self.n_pairs),
            "cv": json.dumps(self.cv),
        }
        save_file({f"layer/{k}": v.contiguous() for k, v in self.vectors.items()}, str(path), meta)

    @classmethod
    def load(cls, path: str | Path) -> "Query":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        vectors = {int(k.split("/")[1]): v for k, v in load_file(str(path)).items()}
        return cls(
            vectors=vectors,
            psi=meta["psi"],
            stat=meta["stat"],
            model=json.loads(meta["model"]),
            n_pairs=int(meta["n_pairs"]),
            cv={int(k): v for k, v in (json.loads(meta.get("cv", "null")) or {}).items()},
        )


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("the behaviour query is zero or non-finite: treatment and control agree")
    return v / n


def behavior_query(
    model: Any,
    pairs: Any,
    *,
    psi: str = "residual_change",
    stat: str | None = None,
    layers: Any = "all",
    batch_size: int = 8,
    max_length: int | None = 512,
    padding_side: str = "right",
    progress: bool | None = None,
    **psi_kwargs: Any,
) -> Query:
    """Build the query ``psi = norm(mean_j f(x'_j, x_j))`` at each layer from contrastive pairs.

    With the default contrast psi, ``f(x', x) = s(x') - s(x)`` for the statistic ``s = stat``:
    ``psi="residual_change"`` (s = t, the residual-change query), ``psi="residual_diff"``
    (s = pooled ``z_out``, the residual-difference query), or ``psi="contrast", stat=NAME`` for
    any registered phi. ``psi="persona"`` takes a trait spec (path or dict) instead of pairs and
    generates the replies first (see :func:`lensattr.persona.persona_pairs`).

    Args:
        model: a :class:`~lensattr.models.Model` or anything :func:`~lensattr.load_model` takes.
        pairs: pair records (path, dataset, list) or, for ``persona``, a trait spec.
        psi: registered psi name.
        stat: the statistic to contrast (default: the psi's own, e.g. ``residual_change``).
        layers: ``"all"``, an int, a list or ``"a:b"``.
        batch_size, max_length, padding_side: as in :func:`~lensattr.build_cache`.
        progress: show a progress bar (default: on a terminal).
        **psi_kwargs: passed to the psi's pair builder (e.g. ``max_new_tokens`` for persona).

    Examples:
        >>> pairs = [{"prompt": "Is 2+2=5?", "treatment": "Yes!", "control": "No, 4."}]
        >>> q = behavior_query("tiny-random", pairs, layers=[1, 3])
        >>> q.layers, round(float(q.vector(3).norm()), 4)
        ([1, 3], 1.0)
    """
    model = load_model(model)
    spec = get_psi(psi)
    phi = get_phi(stat or spec.stat)
    if spec.pairs_from is not None:
        pair_list: Sequence[Pair] = spec.pairs_from(model, pairs, **psi_kwargs)
    else:
        if psi_kwargs:
            raise TypeError(f"psi {psi!r} takes no options {sorted(psi_kwargs)}")
        pair_list = load_pairs(pairs)
    if not pair_list:
        raise ValueError("no pairs to build the query from")
    layer_list = resolve_layers(layers, model.n_layers)
    contribs = pair_contributions(
        model,
        pair_list,
        spec.fn,
        phi,
        layer_list,
        batch_size,
        max_length,
        padding_side,
        progress,
        desc=f"query {psi}",
    )
    vectors = {layer: _unit(c.double().mean(0)).float() for layer, c in contribs.items()}
    return Query(
        vectors=vectors,
        psi=psi,
        stat=phi.name,
        model=model.fingerprint(),
        n_pairs=len(pair_list),
        cv={k: heldout_accuracy(c) for k, c in contribs.items()},
    )


def pair_contributions(
    model: Model,
    pairs: Sequence[Pair],
    fn: Any,
    phi: Any,
    layers: list[int],
    batch_size: int = 8,
    max_length: int | None = 512,
    padding_side: str = "right",
    progress: bool | None = None,
    desc: str = "pairs",
) -> dict[int, torch.Tensor]:
    """``{layer: [n_pairs, d_model]}`` per-pair contributions ``fn(x'_j, x_j)`` (fp32, CPU).

    ``batch_size`` counts sequences, as in :func:`~lensattr.build_cache`: a batch holds
    ``batch_size // 2`` pairs, grouped by length to limit padding.
    """
    encs = [[encode(model.tokenizer, ex, max_length) for ex in pair.sides()] for pair in pairs]
    longest = [max(len(e.ids) for e in pair) for pair in encs]
    order = sorted(range(len(pairs)), key=lambda i: -longest[i])
    per = max(1, batch_size // 2)
    out = {layer: torch.empty((len(pairs), model.d_model)) for layer in layers}
    disable = None if progress is None else not progress
    for i in tqdm(range(0, len(order), per), desc=desc, disable=disable):
        idx = order[i : i + per]
        batch = collate(
            [e for j in idx for e in encs[j]], model.pad_id, padding_side, str(model.device)
        )
        acts = capture(model, batch, layers, grad=phi.needs_grad, sites=phi.sites)
        for layer, a in acts.items():
            t, c = _split(a)
            out[layer][idx] = fn(t, c, phi).float().cpu()
    return out


def heldout_accuracy(contribs: torch.Tensor, folds: int = 2) -> float:
    """How well a query separates pairs it was not built from (uses the query pairs alone).

    For each of ``folds`` interleaved folds, build ``psi`` from the other folds and count the
    held-out pairs whose contribution points along it (``<f_j, psi> > 0``, i.e. the treatment
    scores above its control under the dot score). Used to choose a layer without peeking at
    plants or held-out behaviour data.

    Examples:
        >>> heldout_accuracy(torch.tensor([[1.0, 0.0], [2.0, 0.1], [1.5, -0.1], [0.5, 0.0]]))
        1.0
    """
    n = contribs.shape[0]
    if n < 2:
        return float("nan")
    hits = 0
    for k in range(min(folds, n)):
        test = torch.arange(k, n, min(folds, n))
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        psi = contribs[train].double().mean(0)
        hits += int((contribs[test].double() @ psi > 0).sum())
    return hits / n


def _split(acts: Any) -> tuple[Any, Any]:
    """Split a capture of interleaved (treatment, control) rows into the two sides."""
    from lensattr.capture import LayerActs

    def side(k: int) -> LayerActs:
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[k::2]

        return LayerActs(
            z_in=acts.z_in[k::2],
            z_out=acts.z_out[k::2],
            grad=pick(acts.grad),
            mask=acts.mask[k::2],
            attn_out=pick(acts.attn_out),
            mlp_out=pick(acts.mlp_out),
        )

    return side(0), side(1)


def as_query(query: Any) -> Query:
    """A :class:`Query`, or one loaded from a ``.safetensors`` path."""
    return query if isinstance(query, Query) else Query.load(query)


__all__ = ["Query", "as_query", "behavior_query", "heldout_accuracy", "pair_contributions"]
