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
    """
    pred = mask[:, 1:]
    head = model.hf.get_output_embeddings()
    logits = F.linear(hidden[:, :-1][pred], head.weight, getattr(head, "bias", None)).float()
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return reduce_response_nll(logits, input_ids, mask)


def reduce_response_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_x loss_x, [loss_x])`` from the logits at the predicting positions ``mask[:, 1:]``
    (in row-major order): each example's mean NLL over its own response tokens."""
    pred = mask[:, 1:]
    rows = pred.nonzero()[:, 0]
    nll = F.cross_entropy(logits.float(), input_ids[:, 1:][pred], reduction="none")
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
