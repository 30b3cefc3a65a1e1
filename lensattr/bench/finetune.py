"""The fine-tuning effect: LoRA-fine-tune on selected examples, then score the behaviour.

The judge-free trait score of a model on pairs ``(prompt, treatment, control)`` is

    score = mean_j [ mean_{p in R(t_j)} log p(t_j,p | .) - mean_{p in R(c_j)} log p(c_j,p | .) ]

(each reply's mean per-token log-probability over its own reply tokens, as rendered by the chat
template, end-of-turn token included). Higher = the model prefers the behaviour.
"""

import copy
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lensattr.backends.loss import response_loss
from lensattr.backends.models import Model, load_model
from lensattr.data import Example, Pair, load_examples, load_pairs
from lensattr.optional import require
from lensattr.render import collate, encode

logger = logging.getLogger(__name__)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_finetune(
    model: Any,
    examples: Any,
    *,
    steps: int = 40,
    lr: float = 2e-4,
    rank: int = 8,
    seed: int = 0,
    batch_size: int = 4,
    max_length: int | None = 256,
    alpha: int | None = None,
    progress: bool | None = None,
) -> Model:
    """LoRA-fine-tune a copy of ``model`` on the replies of ``examples`` and return it merged.

    AdamW on LoRA adapters of every linear projection (``LORA_TARGETS``), loss = mean response NLL
    (:func:`lensattr.backends.capture.response_loss`), ``steps`` steps of ``batch_size`` examples
    drawn by a seeded shuffle (cycling when there are fewer examples than steps x batch). The base
    model is untouched.

    Args:
        model: a :class:`~lensattr.backends.models.Model` (or anything ``load_model`` takes).
        examples: training examples (list of :class:`Example` / dicts / a path).
        steps, lr, rank, seed: optimisation steps, learning rate, LoRA rank, seed.
        batch_size, max_length: examples per step and truncation.
        alpha: LoRA alpha (default ``2 * rank``).
        progress: show a progress bar.

    Returns:
        A new :class:`Model` with the adapters merged into its (frozen) weights.
    """
    require("peft", "bench")
    from peft import LoraConfig, get_peft_model

    base = load_model(model)
    exs = (
        examples
        if isinstance(examples, list) and all(isinstance(e, Example) for e in examples)
        else load_examples(examples)
    )
    if not exs:
        raise ValueError("no examples to fine-tune on")
    torch.manual_seed(seed)
    hf = copy.deepcopy(base.hf)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        bias="none",
    )
    peft_model = get_peft_model(hf, cfg)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    encs = [encode(base.tokenizer, ex, max_length) for ex in exs]
    rng = random.Random(seed)
    order: list[int] = []
    disable = None if progress is None else not progress
    for _ in tqdm(range(steps), desc="lora", disable=disable):
        while len(order) < batch_size:
            perm = list(range(len(encs)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([encs[i] for i in idx], base.pad_id, "right", str(base.device))
        inner: Any = peft_model.base_model.model  # the wrapped causal LM
        out = inner.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        _, per_ex = response_loss(out[0], base, batch.input_ids, batch.mask)
        loss = per_ex.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return load_model(merged, base.tokenizer)


@torch.no_grad()
def reply_logprobs(
    model: Model, examples: Sequence[Example], *, batch_size: int = 8, max_length: int | None = 512
) -> torch.Tensor:
    """Mean per-token log-probability of each example's reply (``-loss_x``), ``[n]``."""
    encs = [encode(model.tokenizer, ex, max_length) for ex in examples]
    out = torch.zeros(len(encs), dtype=torch.float64)
    order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate([encs[i] for i in idx], model.pad_id, "right", str(model.device))
        hidden = model.hf.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )[0]
        _, per_ex = response_loss(hidden, model, batch.input_ids, batch.mask)
        out[idx] = -per_ex.double().cpu()
    return out


def trait_score(
    model: Any, pairs: Any, *, batch_size: int = 8, max_length: int | None = 512
) -> float:
    """Judge-free trait score: mean over pairs of (mean reply log-prob of treatment - of control).

    Examples:
        >>> pairs = [{"prompt": "Hi", "treatment": "Yes", "control": "No"}]
        >>> isinstance(trait_score("tiny-random", pairs), float)
        True
    """
    model = load_model(model)
    plist: list[Pair] = load_pairs(pairs)
    sides = [ex for p in plist for ex in p.sides()]
    lp = reply_logprobs(model, sides, batch_size=batch_size, max_length=max_length)
    return float((lp[0::2] - lp[1::2]).mean())
