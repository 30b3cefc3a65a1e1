"""The TransformerLens ``TransformerBridge`` backend: capture through TransformerLens hook points.

A bridge wraps a Hugging Face model in place (its submodules become bridge components that call
the original ones), so the numbers are those of the unprocessed HF model: lensattr never enables
weight processing (LayerNorm folding, centring), and refuses a bridge whose weights were processed.

The capture has the same semantics as the nnsight one (:func:`lensattr.backends.capture.capture`):
``z_in = blocks.{l}.hook_resid_pre``, ``z_out = blocks.{l}.hook_resid_post`` and
``grad = d(sum_x loss_x) / d z_out``, with ``loss_x`` the mean response-token NLL of example ``x``,
position ids from the batch, and the graph cut at the lowest requested layer's input.

transformer-lens is an optional dependency (``pip install 'lensattr[tl]'``), imported lazily.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lensattr.backends.backend import Model, frozen, register_backend
from lensattr.backends.loss import forward_kwargs, response_loss
from lensattr.backends.loss import logits_loss as logits_loss  # re-exported: it lives with the loss
from lensattr.backends.sites import check_extra, locate, site_name
from lensattr.render import Batch
from lensattr.types import LayerActs

INSTALL_HINT = "pip install 'lensattr[tl]'"
FINAL_NORM_HOOK = "ln_final.hook_out"
"""The final normalised residual stream (the LM head's input)."""
_WRAPPED = "._original_component"


def _require_tl() -> None:
    try:
        import transformer_lens  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ModuleNotFoundError(
            f"the TransformerBridge backend needs transformer-lens: run `{INSTALL_HINT}`"
        ) from err


def hf_state_dict(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a bridged HF model under its original Hugging Face names.

    A bridge inserts ``_original_component`` levels and extra aliases (``attn.q``, ...) into the
    module tree. This keeps only the entries reached through original components and strips those
    levels (and the zero bias buffer added to a bias-free LM head), so it equals ``hf.state_dict()``
    as it was before bridging (names and order).

    Examples:
        >>> from lensattr.testing import tiny_hf_model, tiny_tokenizer
        >>> hf = tiny_hf_model()
        >>> before = list(hf.state_dict())
        >>> _ = bridge_from_hf(hf, tiny_tokenizer())
        >>> list(hf_state_dict(hf)) == before
        True
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    def keep(key: str) -> bool:
        *path, leaf = key.split(".")
        module = hf
        for part in path:
            if isinstance(module, GeneralizedComponent) and part != "_original_component":
                return False  # a bridge-only child or alias, not the wrapped HF module
            module = getattr(module, part)
        if isinstance(module, torch.nn.Linear) and leaf == "bias" and "bias" in module._buffers:
            return False  # the zero bias buffer a bridge gives a bias-free LM head
        return not isinstance(module, GeneralizedComponent)

    return {k.replace(_WRAPPED, ""): v for k, v in hf.state_dict().items() if keep(k)}


@dataclass
class BridgeModel(Model):
    """A :class:`~lensattr.backends.backend.Model` on the bridge backend (:func:`capture_bridge`).

    Its fingerprint hashes the weights under their original Hugging Face names, so a cache built
    through the bridge matches the same weights loaded on the nnsight backend.

    Attributes:
        bridge: the ``TransformerBridge`` whose hooks the capture reads.
    """

    bridge: Any = None
    backend: ClassVar[str] = "bridge"

    @classmethod
    def from_hf(cls, name: str, hf: Any, tokenizer: Any) -> "BridgeModel":
        """Build a ``TransformerBridge`` around ``hf`` (modified in place) and wrap it."""
        return wrap_bridge(bridge_from_hf(hf, tokenizer, name=name))

    @classmethod
    def from_native(
        cls, bridge: Any, tokenizer: Any, device: Any = None, dtype: torch.dtype | None = None
    ) -> "BridgeModel":
        """Wrap a ``TransformerBridge`` the user holds (see :func:`wrap_bridge`)."""
        if tokenizer is not None:
            bridge.tokenizer = tokenizer
        return wrap_bridge(bridge, device=device, dtype=dtype)

    def capture(self, batch: Batch, layers: Sequence[int], **options: Any) -> dict[int, LayerActs]:
        return capture_bridge(self, batch, layers, **options)  # options: see Model.capture

    def weights(self) -> dict[str, torch.Tensor]:
        return hf_state_dict(self.hf)


def wrap_bridge(
    bridge: Any,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> BridgeModel:
    """Wrap a ``TransformerBridge`` as a lensattr :class:`~lensattr.backends.models.Model` (frozen).

    Args:
        bridge: a ``transformer_lens.model_bridge.TransformerBridge`` around a causal LM, without
            processed weights; its tokenizer must have a chat template.
        device: move the model there (default: leave it where it is).
        dtype: cast the model (default: leave it as is).

    Returns:
        A :class:`BridgeModel` (``backend == "bridge"``); ``hf`` is the wrapped Hugging Face
        model.

    Raises:
        ValueError: the bridge's weights were processed, or it has no tokenizer / chat template.

    Examples:
        >>> from lensattr.testing import tiny_hf_model, tiny_tokenizer
        >>> model = wrap_bridge(bridge_from_hf(tiny_hf_model(), tiny_tokenizer()))
        >>> model.backend, model.n_layers, model.d_model
        ('bridge', 4, 32)
    """
    _require_tl()
    if getattr(bridge, "_weights_processed", False):
        raise ValueError(
            "this TransformerBridge has processed weights (folded LayerNorm, centred weights); "
            "attribution needs the unprocessed model: boot it without "
            "enable_compatibility_mode(), or with enable_compatibility_mode(no_processing=True)"
        )
    tokenizer = bridge.tokenizer
    name = str(getattr(bridge.cfg, "model_name", "") or "transformer-bridge")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{name}: the bridge's tokenizer has no chat template; lensattr renders "
            "chats (pass one to bridge_from_hf or set bridge.tokenizer)"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device is not None or dtype is not None:
        kwargs: dict[str, Any] = {"print_details": False}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = dtype
        bridge.to(**kwargs)
    hf = bridge.original_model
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.eval()
    hf.eval()
    return BridgeModel(name=name, hf=hf, tokenizer=tokenizer, bridge=bridge)


def bridge_from_hf(hf_model: Any, tokenizer: Any, *, name: str | None = None) -> Any:
    """Build a ``TransformerBridge`` around a Hugging Face model already in memory (no download).

    The bridge modifies ``hf_model`` in place (bridge components replace its submodules and call
    the original ones), so use a model that nothing else traces. No weights are processed and the
    tokenizer is attached as is (TransformerLens's tokenizer set-up, which may reload it from the
    hub to force a BOS token, is skipped).

    Args:
        hf_model: a ``transformers`` causal LM of an architecture TransformerLens supports.
        tokenizer: its tokenizer.
        name: recorded as ``bridge.cfg.model_name`` (default: the config's ``name_or_path``).

    Returns:
        The ``TransformerBridge``.

    Examples:
        >>> from lensattr.testing import tiny_hf_model, tiny_tokenizer
        >>> bridge = bridge_from_hf(tiny_hf_model(), tiny_tokenizer(), name="tiny")
        >>> "blocks.3.hook_resid_post" in bridge.hook_dict
        True
    """
    _require_tl()
    from transformer_lens.model_bridge.sources import (
        build_bridge_from_module,
        detect_tokenizer_bos_eos,
    )

    cfg = hf_model.config
    arch = (getattr(cfg, "architectures", None) or [type(hf_model).__name__])[0]
    name = name or getattr(cfg, "name_or_path", "") or arch
    bridge = build_bridge_from_module(hf_model, arch, hf_config=cfg, model_name=name)
    if tokenizer is not None:
        bridge.tokenizer = tokenizer  # first assignment: stored as is, not reconfigured
        bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = (
            detect_tokenizer_bos_eos(tokenizer)
        )
    return bridge


def _final_norm_hook(bridge: Any) -> str | None:
    return FINAL_NORM_HOOK if FINAL_NORM_HOOK in bridge.hook_dict else None


def capture_bridge(
    model: "BridgeModel",
    batch: Batch,
    layers: Sequence[int],
    *,
    grad: bool = True,
    sites: Sequence[str] = (),
    keep_prompt: bool = True,
) -> dict[int, LayerActs]:
    """Capture ``z_in``, ``z_out`` and (if ``grad``) ``g`` at ``layers`` with TransformerLens hooks.

    Same contract as :func:`lensattr.backends.capture.capture` (which calls it for a
    :class:`BridgeModel`).

    Args:
        model: from :func:`wrap_bridge` or ``load_model(..., backend="bridge")``.
        batch: from :func:`lensattr.render.collate` (left or right padding).
        layers: block indices.
        grad: run the activation backward (default); ``False`` for a forward-only capture.
        sites: extra per-layer sites to keep: ``"attn_out"``, ``"mlp_out"`` (or their
            TransformerLens names ``"hook_attn_out"``, ``"hook_mlp_out"``).
        keep_prompt: accepted and ignored: every position is kept (one pass, no KV cache).

    Examples:
        >>> from lensattr import load_model
        >>> from lensattr.data import Example
        >>> from lensattr.render import collate, encode
        >>> m = load_model("tiny-random", backend="bridge")
        >>> b = collate([encode(m.tokenizer, Example.from_prompt("a", "Hi", "Yo"))], m.pad_id)
        >>> acts = capture_bridge(m, b, [1, 3], sites=["mlp_out"])
        >>> acts[3].grad.shape == acts[3].z_out.shape == acts[3].mlp_out.shape
        True
    """
    bridge = model.bridge
    if bridge is None:
        raise ValueError("capture_bridge needs a model with a TransformerBridge (wrap_bridge)")
    del keep_prompt  # every position is kept: one pass, no KV cache
    sites = check_extra(sites)  # TransformerLens hook names too: hook_mlp_out
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= model.n_layers:
        raise ValueError(f"layers {layers} out of range for a model with {model.n_layers} blocks")
    lowest = layers[0]
    saved: dict[Any, torch.Tensor] = {}

    def keep(key: Any, cut: bool = False) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            if cut:
                # Parameters are frozen, so the backward need not go below the lowest requested
                # layer: make its input a leaf (this also gives the graph a root to start from).
                x = x.detach().requires_grad_(True)
            saved[key] = x
            return x

        return hook

    def hook(layer: int, kind: str) -> str:
        return locate(site_name(layer, kind), bridge=bridge)

    fwd: list[tuple[str, Any]] = []
    for layer in layers:
        cut = grad and layer == lowest
        fwd.append((hook(layer, "resid_pre"), keep(("z_in", layer), cut)))
        for site in sites:
            fwd.append((hook(layer, site), keep((site, layer))))
        fwd.append((hook(layer, "resid_post"), keep(("z_out", layer))))
    final = _final_norm_hook(bridge) if grad else None
    if final is not None:
        fwd.append((final, keep("final")))
    kwargs: dict[str, Any] = {
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
    }
    if grad and final is not None:
        kwargs.update(forward_kwargs(model, batch))  # logits_to_keep=1 where supported
    return_type: str | None = "logits" if grad and final is None else None
    if not grad and layers[-1] + 1 < model.n_layers:
        kwargs["stop_at_layer"] = layers[-1] + 1  # nothing above the highest layer is needed

    with frozen(bridge, model.hf), torch.set_grad_enabled(grad), bridge.hooks(fwd_hooks=fwd):
        out = bridge(batch.input_ids, return_type=return_type, **kwargs)
        grads: dict[int, torch.Tensor] = {}
        if grad:
            if final is not None:
                loss, _ = response_loss(saved["final"], model, batch.input_ids, batch.mask)
            else:
                loss, _ = logits_loss(out, batch.input_ids, batch.mask)
            outs = [saved["z_out", layer] for layer in layers]
            grads = dict(zip(layers, torch.autograd.grad(loss, outs), strict=True))

    return {
        layer: LayerActs(
            z_in=saved["z_in", layer].detach(),
            z_out=saved["z_out", layer].detach(),
            grad=grads[layer].detach() if grad else None,
            mask=batch.mask,
            **{kind: saved[kind, layer].detach() for kind in sites},
        )
        for layer in layers
    }


def is_bridge(obj: Any) -> bool:
    """Whether ``obj`` is a TransformerLens ``TransformerBridge``."""
    return type(obj).__name__ == "TransformerBridge"


register_backend("bridge", BridgeModel, is_bridge)
