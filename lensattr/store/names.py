"""The spellings users write for a storage dtype.

A storage dtype is ``"bf16"`` / ``"bfloat16"``, ``"fp16"`` / ``"float16"``, ``"fp32"`` /
``"float32"`` or a ``torch.dtype``. (Layers are parsed by
:func:`lensattr.layers.parse_layers`.)
"""

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
"""Every spelling of a storage dtype -> its name (the manifest's ``storage_dtype``)."""
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
