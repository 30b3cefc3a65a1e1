"""One forward and one activation backward over a batch, with frozen parameters.

For each requested layer ``l`` this yields ``z_in`` (``blocks.{l}.hook_resid_pre``), ``z_out``
(``blocks.{l}.hook_resid_post``) and ``g = d loss_x / d z_out``, where ``loss_x`` is the mean
negative log-likelihood of the response tokens of example ``x`` (:mod:`lensattr.backends.loss`). The
batch loss is ``sum_x loss_x``: an example's gradient never depends on its batch-mates or on
padding.

The language-model head is applied only at the positions that predict a response token, and the
backward pass stops at the lowest requested layer (its input is cut from the graph there). A
forward-only capture (``grad=False``) stops the forward pass after the highest requested layer.

With ``keep_prompt=False`` (what lensattr's own captures pass for statistics pooled over the
response) each row's positions before the one that predicts its first response token run forward
once without a graph, and the traced pass continues from their keys and values
(:mod:`lensattr.backends.prefix`). A position's activations reach only itself and later
positions, so ``g`` at every later position is unchanged; the captured tensors then hold each
row's continuation from that position, left-aligned (``mask`` laid out with them). A gradient
capture cuts each row at its own prompt's end, so its graph is rows x the longest reply (plus
one position); on MedHallu, whose prompts carry a long passage, that skips most of the backward.

:func:`capture` calls the model's backend (:meth:`lensattr.backends.backend.Model.capture`);
this module holds the nnsight one, :class:`NnsightModel`; :mod:`lensattr.backends.bridge` the
TransformerLens one.
"""

import contextlib
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch

from lensattr.backends.backend import Model, frozen
from lensattr.backends.loss import forward_kwargs, response_loss
from lensattr.backends.loss import reduce_response_nll as reduce_response_nll  # re-exported
from lensattr.backends.prefix import cache_keyword, has_sliding_window, split_prompts
from lensattr.backends.recompute import silu_recomputed
from lensattr.backends.sites import (
    EXTRA,
    ModulePaths,
    Port,
    check_extra,
    envoy,
    locate,
    module_paths,
    site_name,
)
from lensattr.render import Batch
from lensattr.types import LayerActs as LayerActs  # re-exported: the record lives in types


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) or hasattr(x, "to_tuple") else x  # tuple / ModelOutput


def _read(lm: Any, port: Port) -> Any:
    """The tensor at a :class:`~lensattr.backends.sites.Port` inside an nnsight trace."""
    value = getattr(envoy(lm, port.module), port.port)
    return value if port.port == "input" else _first(value)


def capture(
    model: Model,
    batch: Batch,
    layers: Sequence[int],
    *,
    grad: bool = True,
    sites: Sequence[str] = (),
    keep_prompt: bool = True,
) -> dict[int, LayerActs]:
    """Capture ``z_in``, ``z_out`` and (if ``grad``) ``g`` at ``layers`` for one batch.

    Args:
        model: from :func:`lensattr.load_model`.
        batch: from :func:`lensattr.render.collate`.
        layers: block indices.
        grad: run the activation backward (default); ``False`` for a forward-only capture.
        sites: extra per-layer sites to keep: ``"attn_out"``, ``"mlp_out"`` (or their
            TransformerLens names ``"hook_attn_out"``, ``"hook_mlp_out"``).
        keep_prompt: return every position (default). ``False`` lets a capture return each
            row from :func:`~lensattr.backends.prefix.prompt_cuts` on (the nnsight backend
            does; the bridge keeps every position): what statistics pooled over the response
            need, for less backward and forward.

    Examples:
        >>> from lensattr import load_model
        >>> from lensattr.data import Example
        >>> from lensattr.render import collate, encode
        >>> m = load_model("tiny-random")
        >>> b = collate([encode(m.tokenizer, Example.from_prompt("a", "Hi", "Yo"))], m.pad_id)
        >>> acts = capture(m, b, [1, 3])
        >>> acts[3].grad.shape == acts[3].z_out.shape
        True
    """
    return model.capture(batch, layers, grad=grad, sites=sites, keep_prompt=keep_prompt)


class NnsightModel(Model):
    """A :class:`~lensattr.backends.backend.Model` on the nnsight backend: ``lm`` traces ``hf``.

    The module paths of its sites are found once, at the first capture (:attr:`paths`).
    """

    @property
    def cuts_prompt(self) -> bool:
        """True, unless the model's cache keeps a sliding window (then every row is cut at the
        batch's shortest prompt)."""
        return not has_sliding_window(self.hf.config)

    @cached_property
    def paths(self) -> ModulePaths:
        """Where the blocks, attention and MLP live in ``hf`` (found by
        :func:`~lensattr.backends.sites.module_paths`)."""
        return module_paths(self.hf)

    def capture(self, batch: Batch, layers: Sequence[int], **options: Any) -> dict[int, LayerActs]:
        return capture_nnsight(self, batch, layers, **options)  # options: see Model.capture


def capture_nnsight(
    model: NnsightModel,
    batch: Batch,
    layers: Sequence[int],
    *,
    grad: bool = True,
    sites: Sequence[str] = (),
    keep_prompt: bool = True,
) -> dict[int, LayerActs]:
    """The nnsight capture: ``z_in``, ``z_out`` and ``g`` read inside one ``lm.trace``.

    Same contract as :func:`capture` (which calls it for an :class:`NnsightModel`).
    """
    sites = check_extra(sites)  # TransformerLens hook names too: hook_mlp_out
    layers = sorted(set(layers))
    ids, mask, attention = batch.input_ids, batch.mask, batch.attention_mask
    kwargs = forward_kwargs(model, batch)
    # The parameters are frozen for the capture only: a user's model is left as it was.
    with frozen(model.hf):
        if not keep_prompt:  # a gradient capture cuts each row at its own prompt's end
            split = split_prompts(model, batch, per_row=grad and model.cuts_prompt)
            if split is not None:
                ids, mask, attention = split.input_ids, split.mask, split.attention_mask
                kwargs |= {"position_ids": split.position_ids, cache_keyword(model.hf): split.cache}
        # The graph keeps no SiLU outputs: the backward recomputes them (a fifth less memory).
        with silu_recomputed(model.hf) if grad else contextlib.nullcontext():
            return _trace(model, ids, mask, attention, kwargs, layers, grad, sites)


def _trace(
    model: NnsightModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor,
    kwargs: dict[str, Any],
    layers: list[int],
    grad: bool,
    sites: tuple[str, ...],
) -> dict[int, LayerActs]:
    """The traced pass of :func:`capture_nnsight` over ``ids`` (after any prompt prefix);
    ``attention_mask`` covers every position, the prefix's too."""
    paths, lm, lowest = model.paths, model.lm, layers[0]
    inputs = {"input_ids": ids, "attention_mask": attention_mask}
    # Inside a trace, values are nnsight proxies of tensors (with .save()); typed Any for mypy.
    z_in: dict[int, Any] = {}
    z_out: dict[int, Any] = {}
    extra: dict[tuple[int, str], Any] = {}
    grads: dict[int, Any] = {}
    with torch.set_grad_enabled(grad), lm.trace(inputs, **kwargs) as tracer:
        for layer in layers:
            pre = locate(site_name(layer, "resid_pre"), paths=paths)
            x = _read(lm, pre)
            if grad and layer == lowest:
                # Cut the graph here: parameters are frozen, so the backward pass need not go
                # below the lowest requested layer, and this leaf makes it have a graph at all.
                x = x.detach().requires_grad_(True)
                envoy(lm, pre.module).input = x
            z_in[layer] = x.save()
            for kind in EXTRA:  # in execution order: attention, MLP, then the block output
                if kind in sites:
                    extra[layer, kind] = _read(
                        lm, locate(site_name(layer, kind), paths=paths)
                    ).save()
            z_out[layer] = _read(lm, locate(site_name(layer, "resid_post"), paths=paths)).save()
        if not grad:
            # Nothing above the highest requested layer is needed: the blocks above it, the
            # final norm and the head are not run (a layer-2 capture costs ~3/30 of a forward).
            # With a block above, the run stops as that block is entered, so the highest
            # requested block finishes (hooks included); else right at the last block's output.
            if layers[-1] + 1 < model.n_layers:
                envoy(lm, f"{paths.layers}.{layers[-1] + 1}").input  # noqa: B018 - waits for it
            tracer.stop()
        if grad:
            hidden = _first(envoy(lm, paths.base).output)
            loss, _ = response_loss(hidden, model, ids, mask)
            with loss.backward():
                for layer in reversed(layers):
                    grads[layer] = z_out[layer].grad.save()
    return {
        layer: LayerActs(
            z_in=z_in[layer].detach(),
            z_out=z_out[layer].detach(),
            grad=grads[layer].detach() if grad else None,
            mask=mask,
            **{kind: extra[layer, kind].detach() for kind in sites},
        )
        for layer in layers
    }
