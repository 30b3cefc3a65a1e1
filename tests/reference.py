"""An independent reference: plain torch forward hooks + autograd, no nnsight, no lensattr capture.

The loss is taken from the model's own full logits (not lensattr's sparse head), per example,
and every statistic is computed token by token from its definition.
"""

import torch
import torch.nn.functional as F


def reference_capture(hf, input_ids, attention_mask, position_ids, mask, layers):
    """Return {layer: (z_in, z_out, grad)} from hooks + torch.autograd.grad."""
    z_in, z_out = {}, {}
    handles = []
    for layer in layers:

        def hook(mod, args, kwargs, out, layer=layer):
            z_in[layer] = args[0] if args else kwargs["hidden_states"]
            z_out[layer] = out[0] if isinstance(out, tuple) else out

        handles.append(hf.model.layers[layer].register_forward_hook(hook, with_kwargs=True))

    def embed_hook(mod, args, out):
        return out.detach().requires_grad_(True)

    handles.append(hf.model.embed_tokens.register_forward_hook(embed_hook))
    try:
        with torch.enable_grad():
            logits = hf(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).logits.float()
            loss = 0.0
            for b in range(input_ids.shape[0]):
                pos = mask[b].nonzero()[:, 0]
                nll = F.cross_entropy(logits[b, pos - 1], input_ids[b, pos])
                loss = loss + nll
            grads = torch.autograd.grad(loss, [z_out[layer] for layer in layers])
    finally:
        for h in handles:
            h.remove()
    return {
        layer: (z_in[layer].detach(), z_out[layer].detach(), g)
        for layer, g in zip(layers, grads, strict=True)
    }


def reference_stats(z_in, z_out, grad, mask):
    """Every built-in statistic from its definition, one example at a time.

    The authors' residual change is computed their way: the T x T Gram matrix of the block
    inputs over every position of the row times the gradients, averaged over the reply rows
    (``residual_change``), or with the gradients zeroed outside the reply
    (``residual_change_reply``, their ``_with_mask_corrected``).
    """
    names = ("residual_change", "residual_change_reply", "residual_change_printed",
             "residual_change_diagonal", "resid_post", "grad")  # fmt: skip
    out = {name: [] for name in names}
    for b in range(z_in.shape[0]):
        pos = mask[b].nonzero()[:, 0]
        zi, zo, g = z_in[b, pos], z_out[b, pos], grad[b, pos]
        gram = z_in[b] @ z_in[b].T  # [T, T], every position of the row
        masked = grad[b] * mask[b, :, None]
        out["residual_change"].append(-(gram @ grad[b])[pos].mean(0))
        out["residual_change_reply"].append(-(gram @ masked)[pos].mean(0))
        t = torch.stack([-zi[p] * torch.dot(zi[p], g[p]) for p in range(len(pos))])
        diagonal = torch.stack([-torch.dot(zi[p], zi[p]) * g[p] for p in range(len(pos))])
        out["residual_change_printed"].append(t.mean(0))
        out["residual_change_diagonal"].append(diagonal.mean(0))
        out["resid_post"].append(zo.mean(0))
        out["grad"].append(g.mean(0))
    return {k: torch.stack(v) for k, v in out.items()}
