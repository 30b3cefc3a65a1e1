"""One forward and one activation backward over a batch, with frozen parameters.

For each requested layer ``l`` this yields ``z_in`` (``blocks.{l}.hook_resid_pre``), ``z_out``
(``blocks.{l}.hook_resid_post``) and ``g = d loss_x / d z_out``, where ``loss_x`` is the mean
negative log-likelihood of the response tokens of example ``x`` (:mod:`lensattr.backends.loss`). The
batch loss is ``sum_x loss_x``: an example's gradient never depends on its batch-mates or on
padding.

The language-model head is applied only at the positions that predict a response token, and the
backward pass stops at the lowest requested layer (its input is cut from the graph there). A
forward-only capture (``grad=False``) stops the forward pass after the highest requested layer.

With ``keep_prompt=False`` (what lensattr's own captures pass for statistics pooled over the
response) each row's positions before the one that predicts its first response token run forward
once without a graph, and the traced pass continues from their keys and values
(:mod:`lensattr.backends.prefix`). A position's activations reach only itself and later
positions, so ``g`` at every later position is unchanged; the captured tensors then hold each
row's continuation from that position, left-aligned (``mask`` laid out with them). A gradient
capture cuts each row at its own prompt's end, so its graph is rows x the longest reply (plus
one position); on MedHallu, whose prompts carry a long passage, that skips most of the backward.

:func:`capture` calls the model's backend (:meth:`lensattr.backends.backend.Model.capture`):
:mod:`lensattr.backends.nnsight` traces a Hugging Face model with nnsight,
:mod:`lensattr.backends.bridge` hooks a TransformerLens ``TransformerBridge``.
"""

from collections.abc import Sequence

from lensattr.backends.backend import Model
from lensattr.render import Batch
from lensattr.types import LayerActs as LayerActs  # re-exported: the record lives in types


def capture(
    model: Model,
    batch: Batch,
    layers: Sequence[int],
    *,
    grad: bool = True,
    sites: Sequence[str] = (),
    keep_prompt: bool = True,
) -> dict[int, LayerActs]:
    """Capture ``z_in``, ``z_out`` and (if ``grad``) ``g`` at ``layers`` for one batch.

    Args:
        model: from :func:`lensattr.load_model`.
        batch: from :func:`lensattr.render.collate`.
        layers: block indices.
        grad: run the activation backward (default); ``False`` for a forward-only capture.
        sites: extra per-layer sites to keep: ``"attn_out"``, ``"mlp_out"`` (or their
            TransformerLens names ``"hook_attn_out"``, ``"hook_mlp_out"``).
        keep_prompt: return every position (default). ``False`` lets a capture return each
            row from :func:`~lensattr.backends.prefix.prompt_cuts` on (the nnsight backend
            does; the bridge keeps every position): what statistics pooled over the response
            need, for less backward and forward.

    Examples:
        >>> from lensattr import load_model
        >>> from lensattr.data import Example
        >>> from lensattr.render import collate, encode
        >>> m = load_model("tiny-random")
        >>> b = collate([encode(m.tokenizer, Example.from_prompt("a", "Hi", "Yo"))], m.pad_id)
        >>> acts = capture(m, b, [1, 3])
        >>> acts[3].grad.shape == acts[3].z_out.shape
        True
    """
    return model.capture(batch, layers, grad=grad, sites=sites, keep_prompt=keep_prompt)
