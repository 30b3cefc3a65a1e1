"""TransformerLens site names and their place in a Hugging Face model.

lensattr addresses activations by TransformerLens names:

* ``blocks.{l}.hook_resid_pre``: the input of block ``l`` (``z_in``);
* ``blocks.{l}.hook_resid_post``: the output of block ``l`` (``z_out``);
* ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``: what attention / the MLP add.

:func:`module_paths` maps them onto a Hugging Face module tree (the nnsight backend reads
``.input`` / ``.output`` of those modules); the TransformerLens bridge uses the names directly.
"""

import re
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_SITE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_LAYER_LISTS = ("layers", "h", "blocks", "layer", "decoder.layers")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")


def site_name(layer: int, kind: str) -> str:
    """``site_name(3, "resid_pre") == "blocks.3.hook_resid_pre"``."""
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; expected one of {KINDS}")
    return f"blocks.{layer}.hook_{kind}"


def parse_site(name: str) -> tuple[int, str]:
    """Split a TransformerLens site name into ``(layer, kind)``.

    Examples:
        >>> parse_site("blocks.12.hook_resid_post")
        (12, 'resid_post')
    """
    m = _SITE.match(name)
    if not m:
        raise ValueError(
            f"unsupported site {name!r}; expected blocks.{{l}}.hook_{{{'|'.join(KINDS)}}}"
        )
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class ModulePaths:
    """Dotted module paths inside a Hugging Face causal LM."""

    base: str  # the base (headless) model, whose output[0] is the final normalised residual
    layers: str  # the ModuleList of decoder blocks
    attn: str  # attribute of a block holding attention
    mlp: str  # attribute of a block holding the MLP


def _get(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def module_paths(hf: Any) -> ModulePaths:
    """Find the blocks, attention and MLP of a Hugging Face causal LM (Llama, GPT-2, NeoX, ...)."""
    base = hf.base_model_prefix
    n = hf.config.num_hidden_layers
    for cand in _LAYER_LISTS:
        try:
            mods = _get(hf, f"{base}.{cand}")
        except AttributeError:
            continue
        if isinstance(mods, torch.nn.ModuleList) and len(mods) == n:
            block = mods[0]
            attn = next((a for a in _ATTN if hasattr(block, a)), "")
            mlp = next((m for m in _MLP if hasattr(block, m)), "")
            return ModulePaths(base=base, layers=f"{base}.{cand}", attn=attn, mlp=mlp)
    raise ValueError(f"cannot find the {n} decoder blocks of {type(hf).__name__}")


def envoy(root: Any, dotted: str) -> Any:
    """Follow a dotted path on an nnsight envoy (or a module)."""
    return _get(root, dotted)
