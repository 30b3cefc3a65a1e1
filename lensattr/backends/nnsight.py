"""The nnsight backend: :class:`NnsightModel` traces a Hugging Face model with nnsight.

Registered as ``"nnsight"`` (the default of :func:`lensattr.load_model`); it also takes an
``nnsight.TransformersModel`` (or its alias ``LanguageModel``) the user already holds. The
capture's contract is
:func:`lensattr.backends.capture.capture`'s: ``z_in``, ``z_out`` and ``g`` read inside one
``lm.trace``, the prompt prefix run forward-only (:mod:`lensattr.backends.prefix`) and the SiLU
outputs recomputed in the backward (:mod:`lensattr.backends.recompute`).
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from lensattr.backends.backend import Model, frozen, register_backend
from lensattr.backends.loss import forward_kwargs, response_loss
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
from lensattr.types import LayerActs


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) or hasattr(x, "to_tuple") else x  # tuple / ModelOutput


def _read(lm: Any, port: Port) -> Any:
    """The tensor at a :class:`~lensattr.backends.sites.Port` inside an nnsight trace."""
    value = getattr(envoy(lm, port.module), port.port)
    return value if port.port == "input" else _first(value)


@dataclass
class NnsightModel(Model):
    """A :class:`~lensattr.backends.backend.Model` on the nnsight backend: ``lm`` traces ``hf``.

    The module paths of its sites are found once, at the first capture (:attr:`paths`).

    Attributes:
        lm: the ``nnsight`` model wrapping ``hf``.
    """

    lm: Any = None
    backend: ClassVar[str] = "nnsight"

    @classmethod
    def from_hf(cls, name: str, hf: Any, tokenizer: Any) -> "NnsightModel":
        """Trace a Hugging Face causal LM (+ tokenizer with a chat template) with nnsight."""
        from nnsight import TransformersModel

        if tokenizer.chat_template is None:
            raise ValueError(f"{name}: the tokenizer has no chat template; lensattr renders chats")
        lm = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
        return cls(name=name, hf=hf, tokenizer=tokenizer, lm=lm)

    @classmethod
    def from_native(
        cls, lm: Any, tokenizer: Any, device: Any = None, dtype: torch.dtype | None = None
    ) -> "NnsightModel":
        """Use an ``nnsight.TransformersModel`` the user holds (a lazy one is dispatched now); its
        Hugging Face model is moved to ``device`` / ``dtype`` in place when given."""
        if getattr(lm, "dispatched", True) is False:
            lm.dispatch()
        hf = lm._module
        if device is not None or dtype is not None:
            hf.to(device=device, dtype=dtype)
        if any(p.is_meta for p in hf.parameters()):
            raise ValueError("the nnsight model still has meta-device weights after dispatch()")
        name = hf.config.name_or_path or "nnsight-model"
        return cls(name=name, hf=hf, tokenizer=tokenizer or lm.tokenizer, lm=lm)

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


def is_nnsight_model(obj: Any) -> bool:
    """Whether ``obj`` is an nnsight model around a torch module (``LanguageModel``,
    ``TransformersModel``)."""
    return hasattr(obj, "trace") and isinstance(getattr(obj, "_module", None), torch.nn.Module)


register_backend("nnsight", NnsightModel, is_nnsight_model)
