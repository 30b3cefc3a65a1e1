"""Layer names, as every layer argument of the API and the command line reads them.

A *layer* is the residual stream after a block: layer ``l`` is TransformerLens's
``blocks.{l}.hook_resid_post``, which is also ``blocks.{l+1}.hook_resid_pre``.
:func:`parse_layers` is the one parser (``build_cache(layers=)``, ``rank(layer=)``,
``select(layers=)``, ``--layers``, ``--layer``, the bench); :func:`layer_text` writes a layer
or layer set back as ``--layer`` takes it. The store and the backends both use it, so it
imports neither.
"""

import re
from collections.abc import Sequence
from typing import Any

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
"""The TransformerLens site kinds of a block: ``blocks.{l}.hook_{kind}``."""

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
