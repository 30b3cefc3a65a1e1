"""TransformerLens site names and their place in a Hugging Face model.

lensattr addresses activations by TransformerLens names:

* ``blocks.{l}.hook_resid_pre``: the input of block ``l`` (``z_in``);
* ``blocks.{l}.hook_resid_post``: the output of block ``l`` (``z_out``);
* ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``: what attention / the MLP add.

:func:`locate` is the one place where a name meets a backend: for a Hugging Face model it gives
the module path and port (``input`` / ``output``) that the nnsight backend reads inside a trace;
for a ``TransformerBridge`` it gives the hook point, which carries the same name.

A *layer* is the residual stream after a block: layer ``l`` is ``blocks.{l}.hook_resid_post``,
which is also ``blocks.{l+1}.hook_resid_pre`` (:func:`lensattr.layers.parse_layers` reads
every layer argument of the API and the command line).
"""

import re
from dataclasses import dataclass
from typing import Any, overload

import torch

from lensattr.layers import KINDS
from lensattr.types import EXTRA_SITES

EXTRA = EXTRA_SITES
"""Sites a capture may keep besides ``z_in`` / ``z_out`` (``capture(..., sites=EXTRA)``)."""
_SITE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_LAYER_LISTS = ("layers", "h", "blocks", "layer", "decoder.layers")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")


def site_name(layer: int, kind: str) -> str:
    """``site_name(3, "resid_pre") == "blocks.3.hook_resid_pre"``."""
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; expected one of {KINDS}")
    return f"blocks.{layer}.hook_{kind}"


def site_kind(name: str) -> str:
    """The site kind of ``"mlp_out"``, its TransformerLens hook name ``"hook_mlp_out"`` or a full
    site name ``"blocks.3.hook_mlp_out"``.

    Examples:
        >>> [site_kind(s) for s in ("mlp_out", "hook_attn_out", "blocks.3.hook_resid_post")]
        ['mlp_out', 'attn_out', 'resid_post']
    """
    kind = name
    if isinstance(name, str) and _SITE.match(name):
        kind = parse_site(name)[1]
    elif isinstance(name, str) and name.startswith("hook_"):
        kind = name[len("hook_") :]
    if kind not in KINDS:
        raise ValueError(
            f"unknown site {name!r}; expected one of {', '.join(KINDS)} (or hook_<kind>, "
            "blocks.<l>.hook_<kind>)"
        )
    return kind


def check_extra(sites: Any) -> tuple[str, ...]:
    """The extra capture sites as kinds (``"hook_mlp_out"`` -> ``"mlp_out"``); refuse any but
    :data:`EXTRA`."""
    kinds = []
    for site in sites:
        try:
            kind = site_kind(site)
        except ValueError:
            kind = None
        if kind not in EXTRA:
            raise ValueError(
                f"unknown sites [{site!r}]; known: {list(EXTRA)} (or hook_attn_out, hook_mlp_out)"
            )
        kinds.append(kind)
    return tuple(kinds)


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


@dataclass(frozen=True)
class Port:
    """Where a site lives in a Hugging Face model: ``getattr(envoy(lm, module), port)``."""

    module: str  # dotted module path from the causal LM
    port: str  # "input" (the first positional argument) or "output" (its first element)


@overload
def locate(name: str, *, paths: ModulePaths) -> Port: ...
@overload
def locate(name: str, *, bridge: Any) -> str: ...
def locate(name: str, *, paths: ModulePaths | None = None, bridge: Any = None) -> Port | str:
    """Map a TransformerLens site name onto a backend.

    Args:
        name: ``blocks.{l}.hook_{resid_pre|resid_post|attn_out|mlp_out}``.
        paths: the Hugging Face module tree (:func:`module_paths`): returns a :class:`Port`.
        bridge: a ``TransformerBridge``: returns its hook name (checked to exist).

    Examples:
        >>> paths = ModulePaths(base="model", layers="model.layers", attn="self_attn", mlp="mlp")
        >>> locate("blocks.2.hook_resid_pre", paths=paths)
        Port(module='model.layers.2', port='input')
        >>> locate("blocks.2.hook_mlp_out", paths=paths)
        Port(module='model.layers.2.mlp', port='output')
    """
    layer, kind = parse_site(name)
    if bridge is not None:
        if name not in bridge.hook_dict:
            raise ValueError(f"the TransformerBridge has no hook point {name!r}")
        return name
    if paths is None:
        raise ValueError("locate needs paths= (Hugging Face) or bridge= (TransformerLens)")
    block = f"{paths.layers}.{layer}"
    if kind in ("resid_pre", "resid_post"):
        return Port(block, "input" if kind == "resid_pre" else "output")
    sub = paths.attn if kind == "attn_out" else paths.mlp
    if not sub:
        raise ValueError(f"cannot find the {kind[:-4]} module of a block under {block}")
    return Port(f"{block}.{sub}", "output")


def envoy(root: Any, dotted: str) -> Any:
    """Follow a dotted path on an nnsight envoy (or a module)."""
    return _get(root, dotted)
