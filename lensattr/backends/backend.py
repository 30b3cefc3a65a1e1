"""The :class:`Model` handle and the interface every capture backend implements.

A backend is a subclass of :class:`Model` chosen once, when the model is loaded
(:func:`lensattr.load_model`): :class:`lensattr.backends.capture.NnsightModel` traces a Hugging Face
model with nnsight, :class:`lensattr.backends.bridge.BridgeModel` hooks a TransformerLens
``TransformerBridge``. Each implements :meth:`Model.capture`;
:func:`lensattr.backends.capture.capture` calls it. This module imports no backend, so the backends
and the loader import it without a circle.
"""

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lensattr.render import Batch
from lensattr.types import LayerActs


@dataclass
class Model:
    """A causal LM ready for capture: the Hugging Face module, its tokenizer and a backend.

    Attributes:
        name: a human-readable name (recorded in cache manifests).
        hf: the ``transformers`` model (also for ``TransformerBridge``, the wrapped HF model).
        tokenizer: its tokenizer, with a chat template.
        backend: the backend's name, ``"nnsight"``
            (:class:`~lensattr.backends.capture.NnsightModel`) or ``"bridge"``
            (:class:`~lensattr.backends.bridge.BridgeModel`); a label: the capture itself is the
            subclass's :meth:`capture`.
        lm: the ``nnsight.LanguageModel`` wrapping ``hf`` (nnsight backend).
        bridge: the ``TransformerBridge`` (bridge backend).
    """

    name: str
    hf: Any
    tokenizer: Any
    backend: str = "nnsight"
    lm: Any = None
    bridge: Any = None
    _fingerprint: dict[str, str] | None = field(default=None, repr=False)

    @property
    def cuts_prompt(self) -> bool:
        """Whether its gradient capture with ``keep_prompt=False`` cuts each row at its own
        prompt's end (then gradient builds batch rows of similar reply length)."""
        return False

    @property
    def n_layers(self) -> int:
        return int(self.hf.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pid)

    def capture(
        self,
        batch: Batch,
        layers: Sequence[int],
        *,
        grad: bool = True,
        sites: Sequence[str] = (),
        keep_prompt: bool = True,
    ) -> dict[int, LayerActs]:
        """This backend's capture (see :func:`lensattr.backends.capture.capture`, which calls it).

        Args:
            batch: from :func:`lensattr.render.collate`.
            layers: block indices.
            grad: run the activation backward; ``False`` for a forward-only capture.
            sites: extra per-layer sites to keep (``"attn_out"``, ``"mlp_out"``).
            keep_prompt: ``False`` allows starting each row of the result at
                :func:`~lensattr.backends.prefix.prompt_cuts` (a backend may keep every
                position).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no capture backend; get a model from load_model"
        )

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (what :meth:`fingerprint` hashes)."""
        return self.hf.state_dict()

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of the weights (names, dtypes, shapes, bytes), tokenizer and chat template."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in self.weights().items():
                t = t.detach().contiguous().cpu()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            tok = hashlib.sha256(repr((vocab, self.tokenizer.eos_token)).encode()).hexdigest()
            template = self.tokenizer.chat_template or ""
            self._fingerprint = {
                "name": self.name,
                "weights_sha256": h.hexdigest(),
                "tokenizer_sha256": tok,
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            }
        return self._fingerprint


@contextlib.contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """Parameters without gradients and modules in eval mode for the block, restored after.

    The capture runs under this, so a user's model (passed to :func:`load_model`) is used
    frozen without being changed: its ``requires_grad`` flags and train/eval modes come back.
    """
    thawed = [p for m in modules for p in m.parameters() if p.requires_grad]
    training = [sub for m in modules for sub in m.modules() if sub.training]
    for p in thawed:
        p.requires_grad_(False)
    for sub in training:
        sub.training = False
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)
        for sub in training:
            sub.training = True
