"""TRAK-style weight-space baseline: projected per-example loss gradients.

Parameters: the weights of a documented subset of linear modules (default: the ``v_proj`` weights
of three blocks in the upper half, 3 x 110,592 = 331,776 parameters of SmolLM2-135M, see
:func:`default_targets`; the backward pass stops at the lowest of those blocks). For a
linear module ``y = W x`` the per-example gradient of ``loss_x`` is exactly
``sum_p g_p x_p^T`` with ``g_p = d loss_x / d y_p`` (``loss_x`` only depends on example ``x``'s
own tokens), so one batched forward + backward gives every example's gradient (hooks save ``x``
and ``y``; one ``einsum`` per module). Each flattened gradient is projected to
``dim`` dimensions by a seeded Gaussian matrix ``P / sqrt(dim)`` generated in chunks of
``chunk`` parameters (never held whole); the bench scores them with lensattr's registered cosine
against the projected mean treatment-minus-control query gradient.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lensattr.backends.loss import response_loss
from lensattr.backends.models import Model
from lensattr.data import Example
from lensattr.render import Batch, collate, encode, length_batches

logger = logging.getLogger(__name__)


def default_targets(model: Model, n_blocks: int = 3, module: str = "self_attn.v_proj") -> list[str]:
    """``model.layers.{l}.{module}`` for ``n_blocks`` evenly spaced blocks (upper half)."""
    n = model.n_layers
    blocks = sorted({n // 2 + (n - n // 2) * i // n_blocks for i in range(n_blocks)})
    return [f"model.layers.{b}.{module}" for b in blocks]


def per_example_grads(
    model: Model, batch: Batch, targets: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``{module: [batch, out, in]}``: exact per-example gradients of ``loss_x`` (weights)."""
    mods = dict(model.hf.named_modules())
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Any:
        def fn(mod: Any, inp: Any, out: torch.Tensor) -> None:
            saved[name] = (inp[0].detach(), out)

        return fn

    def lift(mod: Any, args: Any, kwargs: Any) -> Any:
        # Frozen weights: the input of the lowest target block becomes the graph's leaf.
        if args:
            args = (args[0].detach().requires_grad_(True), *args[1:])
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def lift_embed(mod: Any, inp: Any, out: torch.Tensor) -> torch.Tensor:
        return out.requires_grad_(True)

    handles = [mods[t].register_forward_hook(hook(t)) for t in targets]
    low = min(_block_index(t) for t in targets)
    if low >= 0:
        handles.append(
            mods[f"model.layers.{low}"].register_forward_pre_hook(lift, with_kwargs=True)
        )
    else:
        handles.append(model.hf.get_input_embeddings().register_forward_hook(lift_embed))
    try:
        with torch.enable_grad():
            out = model.hf.base_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            )
            loss, _ = response_loss(out[0], model, batch.input_ids, batch.mask)
            outs = [saved[t][1] for t in targets]
            grads = torch.autograd.grad(loss, outs)
    finally:
        for h in handles:
            h.remove()
    keep = batch.attention_mask.unsqueeze(-1).to(grads[0].dtype)
    return {
        t: torch.einsum("bpo,bpi->boi", g * keep, saved[t][0] * keep).float()
        for t, g in zip(targets, grads, strict=True)
    }


def _block_index(name: str) -> int:
    """The block number in ``model.layers.{l}.…`` (-1 when the name is not inside a block)."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1


class Projector:
    """A seeded Gaussian projection ``R^n -> R^dim`` applied chunk by chunk (memory-bounded)."""

    def __init__(
        self, n: int, dim: int, seed: int = 0, chunk: int = 65536, keep_bytes: int = 256 * 2**20
    ) -> None:
        self.n, self.dim, self.seed, self.chunk = n, dim, seed, chunk
        self._keep = n * dim * 4 <= keep_bytes  # small enough: generate once and keep
        self._mats: dict[int, torch.Tensor] = {}

    def _mat(self, c: int) -> torch.Tensor:
        if c in self._mats:
            return self._mats[c]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        rows = min(self.chunk, self.n - c * self.chunk)
        m = torch.randn((rows, self.dim), generator=gen) / self.dim**0.5
        if self._keep:
            self._mats[c] = m
        return m

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Project ``[b, n]`` to ``[b, dim]``."""
        out = torch.zeros((flat.shape[0], self.dim))
        for c, start in enumerate(range(0, self.n, self.chunk)):
            out += flat[:, start : start + self.chunk].float() @ self._mat(c)
        return out


def n_params(model: Model, targets: Sequence[str]) -> int:
    mods = dict(model.hf.named_modules())
    return sum(mods[t].weight.numel() for t in targets)


def projected_grads(
    model: Model,
    examples: Sequence[Example],
    targets: Sequence[str],
    projector: Projector,
    *,
    batch_size: int = 8,
    max_length: int | None = 256,
    progress: bool | None = None,
    desc: str = "trak grads",
) -> torch.Tensor:
    """``[n, dim]`` projected per-example gradients, in the order of ``examples``."""
    encs = [encode(model.tokenizer, ex, max_length) for ex in examples]
    out = torch.zeros((len(encs), projector.dim))
    disable = None if progress is None else not progress
    for idx in tqdm(length_batches(encs, batch_size), desc=desc, disable=disable):
        batch = collate([encs[i] for i in idx], model.pad_id, "right", str(model.device))
        grads = per_example_grads(model, batch, targets)
        flat = torch.cat([grads[t].flatten(1) for t in targets], 1)
        out[idx] = projector(flat)
    return out
