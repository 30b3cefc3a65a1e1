"""The spellings users write for a storage dtype and for layers.

A storage dtype is ``"bf16"`` / ``"bfloat16"``, ``"fp16"`` / ``"float16"``, ``"fp32"`` /
``"float32"`` or a ``torch.dtype``. A layer is a block index (negative counts from the end: -1
is the last block), a numeric string, or a TransformerLens hook name such as
``"blocks.12.hook_resid_post"``; a set of layers is also ``"all"``, ``"0,5,10"`` or a ``"a:b"``
range with Python's slice rules.
"""

import re
from typing import Any

import torch

STORAGE_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
"""Every spelling of a storage dtype -> its name (the manifest's ``dtype``)."""
SAFETENSORS_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""Each storage dtype's name -> its code in a shard's safetensors header."""


def dtype_name(value: Any) -> str:
    """``"bfloat16"``, ``"float16"`` or ``"float32"`` from a spelling (``"bf16"``, ``"fp32"``, ...)
    or a ``torch.dtype``.

    Examples:
        >>> dtype_name("bf16"), dtype_name(torch.float32)
        ('bfloat16', 'float32')
    """
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    name = STORAGE_DTYPES.get(value.lower()) if isinstance(value, str) else None
    if name is None:
        raise ValueError(
            f"dtype {value!r} is not one of bf16/bfloat16, fp16/float16, fp32/float32 "
            "(or a torch dtype)"
        )
    return name


def parse_dtype(value: Any) -> torch.dtype | None:
    """A ``torch.dtype`` from any spelling :func:`dtype_name` takes (``None`` stays ``None``)."""
    return None if value is None else getattr(torch, dtype_name(value))


_HOOK_NAME = re.compile(r"blocks\.(-?\d+)(?:\.[A-Za-z_][\w.]*)?")


def layer_index(layer: Any, n_layers: int) -> int:
    """One block index from an int (negative counts from the end: -1 is the last block), a
    numeric string, or a TransformerLens hook name such as ``"blocks.12.hook_resid_post"``.

    Examples:
        >>> layer_index(-1, 30), layer_index("blocks.12.hook_resid_post", 30)
        (29, 12)
    """
    value = layer
    if isinstance(value, str):
        text = value.strip()
        m = _HOOK_NAME.fullmatch(text)
        text = m.group(1) if m else text
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"layer {layer!r} is not a block index or a hook name like "
                "'blocks.12.hook_resid_post'"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"layer {layer!r} is not a block index")
    index = value + n_layers if value < 0 else value
    if not 0 <= index < n_layers:
        raise ValueError(f"layer {layer!r} out of range for a model with {n_layers} blocks")
    return index


def resolve_layers(layers: Any, n_layers: int) -> list[int]:
    """Sorted block indices from ``"all"``, an int, a list, ``"0,5,10"``, a ``"a:b"`` range
    (Python slice rules: ``"-4:"`` is the last four blocks), or hook names.

    Examples:
        >>> resolve_layers("-2:", 4), resolve_layers(["blocks.1.hook_resid_post", -1], 4)
        ([2, 3], [1, 3])
    """
    if layers == "all" or layers is None:
        return list(range(n_layers))
    items: Any
    if isinstance(layers, str) and ":" in layers and not layers.strip().startswith("blocks."):
        a, b = (x.strip() for x in layers.split(":", 1))
        try:
            lo, hi = int(a) if a else 0, int(b) if b else n_layers
        except ValueError:
            raise ValueError(f"layers {layers!r}: a range is 'a:b' with integers") from None
        if not (-n_layers <= lo <= n_layers and -n_layers <= hi <= n_layers):
            raise ValueError(f"layers {layers!r} out of range for a model with {n_layers} blocks")
        items = list(range(n_layers))[lo:hi]
    elif isinstance(layers, str):
        items = [x for x in layers.split(",") if x.strip()]
    elif isinstance(layers, int):
        items = [layers]
    else:
        items = list(layers)
    out = sorted({layer_index(x, n_layers) for x in items})
    if not out:
        raise ValueError(f"layers {layers!r} selects no block of a model with {n_layers} blocks")
    return out
