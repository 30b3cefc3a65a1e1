"""The response loss a capture differentiates, in one place for every backend.

``loss_x`` is the mean negative log-likelihood of the response tokens of example ``x``; a batch's
loss is ``sum_x loss_x``, so an example's gradient never depends on its batch-mates or padding.
The language-model head is applied only at the positions that predict a response token.
"""

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from lensattr.backends.backend import Model
from lensattr.render import Batch


def response_loss(
    hidden: torch.Tensor, model: Model, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_x loss_x, [loss_x])``, the LM head applied only where a response token is predicted.

    ``hidden`` is the final normalised residual stream; position ``p - 1`` predicts token ``p``.
    With the head frozen (every capture), the head runs in chunks of :data:`HEAD_CHUNK`
    positions (:class:`ChunkedHeadNLL`), so no batch-sized logits are ever held.
    """
    pred = mask[:, 1:]
    head = model.hf.get_output_embeddings()
    bias = getattr(head, "bias", None)
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    h, targets = hidden[:, :-1][pred], input_ids[:, 1:][pred]
    if head.weight.requires_grad or (bias is not None and bias.requires_grad):
        nll = token_nll(h, targets, head.weight, bias, cap)  # the head's own gradient is wanted
    else:
        nll = ChunkedHeadNLL.apply(h, targets, (head.weight, bias, cap))
    return reduce_token_nll(nll, mask)


def token_nll(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cap: float | None,
) -> torch.Tensor:
    """Each row's negative log-likelihood of its target under the head ``(weight, bias)``,
    logits soft-capped at ``cap`` where the model does that (Gemma 2); in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction="none")


HEAD_CHUNK = 512
"""Positions per chunk of :class:`ChunkedHeadNLL` (fp32 logits of 512 x 49,152: 100 MB)."""


class ChunkedHeadNLL(torch.autograd.Function):
    """:func:`token_nll` of a frozen head, in chunks, each position's gradient taken at once.

    ``nll_t`` depends on ``hidden_t`` alone, so its Jacobian is block-diagonal: the forward
    keeps ``d nll_t / d hidden_t`` (one ``d_model`` row per position) and the backward scales
    it by the incoming gradient. Same operations as the dense path, but only one chunk's logits
    exist at a time (a long-reply batch of the dense path held ~2 GB of logits and their
    log-softmax at the peak of a capture). Written here because the fused kernels that do this
    (Liger-Kernel's fused linear cross-entropy, Apple's cut-cross-entropy) are Triton, GPU-only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: tuple[Any, ...]
    ) -> torch.Tensor:
        """``head``: :func:`token_nll`'s ``(weight, bias, cap)``, outside autograd (frozen)."""
        need = ctx.needs_input_grad[0]
        nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need else None
        for s in range(0, len(targets), HEAD_CHUNK):
            with torch.enable_grad():
                h = hidden[s : s + HEAD_CHUNK].detach().requires_grad_(need)
                part = token_nll(h, targets[s : s + HEAD_CHUNK], *head)
                if grad is not None:
                    (grad[s : s + HEAD_CHUNK],) = torch.autograd.grad(part.sum(), h)
            nll[s : s + HEAD_CHUNK] = part.detach()
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_nll.unsqueeze(-1).to(grad.dtype), None, None


def reduce_response_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reduce_token_nll` of the logits at the predicting positions ``mask[:, 1:]``."""
    nll = F.cross_entropy(logits.float(), input_ids[:, 1:][mask[:, 1:]], reduction="none")
    return reduce_token_nll(nll, mask)


def reduce_token_nll(nll: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_x loss_x, [loss_x])`` from the NLL at the predicting positions ``mask[:, 1:]``
    (in row-major order): each example's mean NLL over its own response tokens."""
    rows = mask[:, 1:].nonzero()[:, 0]
    n_tokens = mask.sum(1).clamp(min=1)
    per_example = torch.zeros(mask.shape[0], dtype=nll.dtype, device=nll.device)
    per_example = per_example.index_add(0, rows, nll) / n_tokens
    return per_example.sum(), per_example


def forward_kwargs(model: Model, batch: Batch) -> dict[str, Any]:
    """The keyword arguments of a capture's forward call: the batch's position ids, and
    ``logits_to_keep=1`` where the model takes it (the loss recomputes the head sparsely)."""
    kwargs: dict[str, Any] = {"position_ids": batch.position_ids}
    params = inspect.signature(model.hf.forward).parameters
    if "logits_to_keep" in params:  # the full head is not needed: the loss recomputes it sparsely
        kwargs["logits_to_keep"] = 1
    return kwargs


def logits_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_x loss_x, [loss_x])`` from full logits (as :func:`response_loss`).

    Used when the bridge exposes no final-norm hook; position ``p - 1`` predicts token ``p``.
    """
    return reduce_response_nll(logits[:, :-1][mask[:, 1:]], input_ids, mask)
