"""One forward and one activation backward over a batch, with frozen parameters.

For each requested layer ``l`` this yields ``z_in`` (``blocks.{l}.hook_resid_pre``), ``z_out``
(``blocks.{l}.hook_resid_post``) and ``g = d loss_x / d z_out``, where ``loss_x`` is the mean
negative log-likelihood of the response tokens of example ``x`` (:mod:`lensattr.backends.loss`). The
batch loss is ``sum_x loss_x``: an example's gradient never depends on its batch-mates or on
padding.

The language-model head is applied only at the positions that predict a response token, and the
backward pass stops at the lowest requested layer (its input is cut from the graph there). A
forward-only capture (``grad=False``) stops the forward pass after the highest requested layer.

:func:`capture` calls the model's backend (:meth:`lensattr.backends.backend.Model.capture`);
this module holds the nnsight one, :class:`NnsightModel`; :mod:`lensattr.backends.bridge` the
TransformerLens one.
"""

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch

from lensattr.backends.backend import Model, frozen
from lensattr.backends.loss import forward_kwargs, response_loss
from lensattr.backends.loss import reduce_response_nll as reduce_response_nll  # re-exported
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
) -> dict[int, LayerActs]:
    """Capture ``z_in``, ``z_out`` and (if ``grad``) ``g`` at ``layers`` for one batch.

    Args:
        model: from :func:`lensattr.load_model`.
        batch: from :func:`lensattr.render.collate`.
        layers: block indices.
        grad: run the activation backward (default); ``False`` for a forward-only capture.
        sites: extra per-layer sites to keep: ``"attn_out"``, ``"mlp_out"`` (or their
            TransformerLens names ``"hook_attn_out"``, ``"hook_mlp_out"``).

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
    return model.capture(batch, layers, grad=grad, sites=sites)


class NnsightModel(Model):
    """A :class:`~lensattr.backends.backend.Model` on the nnsight backend: ``lm`` traces ``hf``.

    The module paths of its sites are found once, at the first capture (:attr:`paths`).
    """

    @cached_property
    def paths(self) -> ModulePaths:
        """Where the blocks, attention and MLP live in ``hf`` (found by
        :func:`~lensattr.backends.sites.module_paths`)."""
        return module_paths(self.hf)

    def capture(
        self, batch: Batch, layers: Sequence[int], *, grad: bool = True, sites: Sequence[str] = ()
    ) -> dict[int, LayerActs]:
        return capture_nnsight(self, batch, layers, grad=grad, sites=sites)


def capture_nnsight(
    model: NnsightModel,
    batch: Batch,
    layers: Sequence[int],
    *,
    grad: bool = True,
    sites: Sequence[str] = (),
) -> dict[int, LayerActs]:
    """The nnsight capture: ``z_in``, ``z_out`` and ``g`` read inside one ``lm.trace``.

    Same contract as :func:`capture` (which calls it for an :class:`NnsightModel`).
    """
    sites = check_extra(sites)  # TransformerLens hook names too: hook_mlp_out
    layers = sorted(set(layers))
    paths = model.paths
    lm = model.lm
    # Inside a trace, values are nnsight proxies of tensors (with .save()); typed Any for mypy.
    z_in: dict[int, Any] = {}
    z_out: dict[int, Any] = {}
    extra: dict[tuple[int, str], Any] = {}
    grads: dict[int, Any] = {}
    lowest = layers[0]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    # The parameters are frozen for the capture only: a user's model is left as it was.
    with (
        frozen(model.hf),
        torch.set_grad_enabled(grad),
        lm.trace(inputs, **forward_kwargs(model, batch)) as tracer,
    ):
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
            loss, _ = response_loss(hidden, model, batch.input_ids, batch.mask)
            with loss.backward():
                for layer in reversed(layers):
                    grads[layer] = z_out[layer].grad.save()
    return {
        layer: LayerActs(
            z_in=z_in[layer].detach(),
            z_out=z_out[layer].detach(),
            grad=grads[layer].detach() if grad else None,
            mask=batch.mask,
            **{kind: extra[layer, kind].detach() for kind in sites},
        )
        for layer in layers
    }
