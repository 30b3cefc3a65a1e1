"""SiLU outputs recomputed in a capture's backward instead of kept in its graph.

A SwiGLU MLP computes ``down(silu(gate(x)) * up(x))``. Autograd keeps ``gate(x)`` for SiLU's
backward and both ``silu(gate(x))`` and ``up(x)`` for the product's: 4,608 of the 7,296 floats
a SmolLM2 block keeps per position (docs/performance.md, "Where the memory goes"). The product's
copy of ``silu(gate(x))`` can be recomputed from ``gate(x)``, which SiLU's backward keeps
anyway: 1,536 floats fewer per position and block, for one elementwise SiLU per block in the
backward. The recomputation is the same operation on the same tensor, so gradients are
bitwise unchanged. Only SiLU modules are touched (Llama, Mistral, Qwen, SmolLM); other
activations keep their outputs.
"""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

SILU = (torch.nn.SiLU, SiLUActivation)


class _Recompute:
    """What the graph keeps instead of ``silu(x)``: ``x``, already kept by SiLU's backward."""

    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


@contextmanager
def silu_recomputed(module: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Within the block, autograd recomputes the outputs of ``module``'s SiLU submodules in
    the backward instead of keeping them. Yields a counter: ``{"recomputed": n}`` outputs.

    Examples:
        >>> from lensattr import load_model
        >>> m = load_model("tiny-random")
        >>> x = torch.randn(1, 3, m.hf.config.hidden_size, requires_grad=True)
        >>> with silu_recomputed(m.hf) as count:
        ...     m.hf.model.layers[0].mlp(x).sum().backward()
        >>> count
        {'recomputed': 1}
    """
    made: dict[int, tuple[Any, Any]] = {}  # id(output) -> weak references to (output, input)
    count = {"recomputed": 0}

    def remember(mod: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor) and not getattr(mod, "inplace", False):
            made[id(out)] = (weakref.ref(out), weakref.ref(args[0]))

    def pack(t: torch.Tensor) -> Any:
        hit = made.get(id(t))
        if hit is not None and hit[0]() is t and (x := hit[1]()) is not None:
            count["recomputed"] += 1
            return _Recompute(x)
        return t

    def unpack(saved: Any) -> torch.Tensor:
        return F.silu(saved.x) if isinstance(saved, _Recompute) else saved

    handles = [m.register_forward_hook(remember) for m in module.modules() if isinstance(m, SILU)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield count
    finally:
        for h in handles:
            h.remove()
        made.clear()
