"""TransformerLens site names and their place in a Hugging Face model.

lensattr addresses activations by TransformerLens names:

* ``blocks.{l}.hook_resid_pre``: the input of block ``l`` (``z_in``);
* ``blocks.{l}.hook_resid_post``: the output of block ``l`` (``z_out``);
* ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``: what attention / the MLP add.

:func:`locate` is the one place where a name meets a backend: for a Hugging Face model it gives
the module path and port (``input`` / ``output``) that the nnsight backend reads inside a trace;
for a ``TransformerBridge`` it gives the hook point, which carries the same name.

A *layer* is the residual stream after a block: layer ``l`` is ``blocks.{l}.hook_resid_post``,
which is also ``blocks.{l+1}.hook_resid_pre``. :func:`parse_layers` is the one parser of every
layer argument of the API and the command line.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from lensattr.types import EXTRA_SITES

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
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


_NUMERAL = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d*):(-?\d*)(?::(-?\d*))?")


def layer_index(spec: Any, n_layers: int) -> int:
    """A layer (the output of one block) from an int, a numeral or a TransformerLens hook name,
    checked against the model's ``n_layers`` blocks.

    A negative int counts from the model's last block (-1 is the last). Hook names follow
    TransformerLens: ``blocks.{l}.hook_resid_post`` is block ``l``'s output, so layer ``l``;
    ``blocks.{l}.hook_resid_pre`` is block ``l``'s input, which is block ``l - 1``'s output, so
    layer ``l - 1``. Other hook names (``hook_mlp_out``, ``hook_attn_out``, typos) are refused:
    they are not the residual stream a layer's statistics are read at.

    Examples:
        >>> layer_index("blocks.12.hook_resid_post", 30), layer_index(-1, 30), layer_index("3", 30)
        (12, 29, 3)
        >>> layer_index("blocks.5.hook_resid_pre", 30)
        4
    """
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise ValueError(f"layer {spec!r} is not a block index")
    if isinstance(spec, int):
        layer = spec
    elif _NUMERAL.fullmatch(spec.strip()):
        layer = int(spec)
    elif m := re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", spec.strip()):
        block, hook = int(m.group(1)), m.group(2)
        if hook == "hook_resid_post":
            layer = block
        elif hook == "hook_resid_pre" and block > 0:
            layer = block - 1
        elif hook == "hook_resid_pre":
            raise ValueError(
                f"layer {spec!r} is the embeddings, the input of the first block; the first "
                "layer is 0 (blocks.0.hook_resid_post, or blocks.1.hook_resid_pre)"
            )
        else:
            what = (
                f"{hook} is inside block {block}, not a layer of the residual stream"
                if hook.removeprefix("hook_") in KINDS
                else f"unknown hook name {hook}"
            )
            raise ValueError(
                f"layer {spec!r}: {what}; name a layer as N, blocks.N.hook_resid_post (block "
                "N's output) or blocks.N.hook_resid_pre (block N-1's output)"
            )
    else:
        raise ValueError(
            f"layer {spec!r} is not a block index (an integer, negative from the end, a range "
            "a:b, or a hook name such as blocks.12.hook_resid_post)"
        )
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {spec!r} is out of range for a model with {n_layers} blocks")
    return layer % n_layers


def parse_layers(spec: Any, n_layers: int) -> list[int]:
    """The layers that ``spec`` names, in its order, each once: the one parser of every layer
    argument (``build_cache(layers=)``, ``rank(layer=)``, ``select``, ``--layers``, ``--layer``).

    ``spec`` is ``"all"`` (or ``None``), a layer as :func:`layer_index` takes it, a range
    ``"a:b"`` or ``"a:b:step"`` with Python's slice rules (``"-4:"``: the last four blocks; a
    ``slice`` or ``range`` too), a comma-separated string of these (``"0,5,10:12"``), or a list
    or tuple of them.

    Raises:
        ValueError: a layer out of range, given twice, an unknown hook name, or no layer at all.

    Examples:
        >>> parse_layers("-2:", 4), parse_layers(["blocks.1.hook_resid_post", -1], 4)
        ([2, 3], [1, 3])
        >>> parse_layers("3,0:2", 4)
        [3, 0, 1]
    """
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        items: list[Any] = [x.strip() for x in spec.split(",") if x.strip()]
    elif isinstance(spec, list | tuple):
        items = list(spec)
    else:
        items = [spec]
    out: list[int] = []
    for item in items:
        if isinstance(item, range):
            item = slice(item.start, item.stop, item.step)
        if isinstance(item, str) and (m := _RANGE.fullmatch(item)):
            try:
                item = slice(*(int(x) if x else None for x in m.groups()))
            except ValueError:  # a step of 0
                raise ValueError(f"layers {spec!r}: {item!r} is not a range") from None
        if isinstance(item, slice):
            for end in (item.start, item.stop):
                if end is not None and not -n_layers <= end <= n_layers:
                    raise ValueError(
                        f"layers {spec!r} are out of range for a model with {n_layers} blocks"
                    )
            if item.step == 0:
                raise ValueError(f"layers {spec!r}: a range's step cannot be 0")
            out += range(n_layers)[item]
        else:
            out.append(layer_index(item, n_layers))
    if not out:
        raise ValueError(
            f"layers {spec!r}: that selects no block of a model with {n_layers} blocks"
        )
    twice = sorted({la for la in out if out.count(la) > 1})
    if twice:
        raise ValueError(f"layers {spec!r} name layer {layer_text(tuple(twice))} twice")
    return out


def layer_text(layer: "int | Sequence[int]") -> str:
    """A layer, or a layer set (scored by the mean over its layers), as ``--layer`` takes it.

    Examples:
        >>> layer_text(18), layer_text((18, 17, 15))
        ('18', '18,17,15')
    """
    return str(layer) if isinstance(layer, int) else ",".join(map(str, layer))


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
