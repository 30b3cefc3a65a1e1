"""The :class:`Model` interface every capture backend implements, and the backend registry.

A backend is a subclass of :class:`Model` registered under a name (:func:`register_backend`)
and chosen once, when the model is loaded (:func:`lensattr.load_model`): ``"nnsight"``
(:mod:`lensattr.backends.nnsight`) traces a Hugging Face model with nnsight, ``"bridge"``
(:mod:`lensattr.backends.bridge`) hooks a TransformerLens ``TransformerBridge``. Each file
implements :meth:`Model.capture` and the two constructors :meth:`Model.from_hf` and
:meth:`Model.from_native`, and registers itself; :func:`lensattr.backends.capture.capture` calls
the capture. This module imports no backend, so the backends and the loader import it without a
circle.

Examples:
    >>> from lensattr.backends.backend import BACKENDS
    >>> import lensattr
    >>> sorted(BACKENDS)[:2]
    ['bridge', 'nnsight']
"""

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lensattr.render import Batch
from lensattr.types import LayerActs


@dataclass
class Model:
    """A causal LM ready for capture: the Hugging Face module, its tokenizer and a backend.

    The interface of every backend: a backend subclasses it (adding the fields it needs, e.g.
    the nnsight backend's ``lm``), implements :meth:`capture`, :meth:`from_hf` and, if it takes a
    model object of its own library, :meth:`from_native`, and registers the subclass with
    :func:`register_backend`. Everything else (``n_layers``, ``d_model``, :meth:`weights`,
    :meth:`fingerprint`) reads ``hf`` and ``tokenizer``.

    Attributes:
        name: a human-readable name (recorded in cache manifests).
        hf: the ``transformers`` model (also for ``TransformerBridge``, the wrapped HF model).
        tokenizer: its tokenizer, with a chat template.
        backend: the name the subclass is registered under (a class attribute).
    """

    name: str
    hf: Any
    tokenizer: Any
    _fingerprint: dict[str, str] | None = field(default=None, repr=False)
    backend: ClassVar[str] = ""

    @classmethod
    def from_hf(cls, name: str, hf: Any, tokenizer: Any) -> "Model":
        """This backend's model around a Hugging Face causal LM that :func:`lensattr.load_model`
        loaded (or was given, and moved where asked)."""
        raise NotImplementedError(f"{cls.__name__} cannot wrap a Hugging Face model")

    @classmethod
    def from_native(
        cls, obj: Any, tokenizer: Any, device: Any = None, dtype: torch.dtype | None = None
    ) -> "Model":
        """This backend's model around an object of its own library that its ``detect``
        recognised (e.g. an ``nnsight.TransformersModel``), moved to ``device`` / ``dtype`` when
        given."""
        raise NotImplementedError(f"{cls.__name__} takes no model object of its own")

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


@dataclass(frozen=True)
class Backend:
    """A registered backend: its :class:`Model` subclass, and ``detect(obj)``: whether ``obj`` is
    a model object of the backend's own library, which :func:`lensattr.load_model` then hands
    to ``cls.from_native`` whatever ``backend=`` says."""

    name: str
    cls: type[Model]
    detect: Callable[[Any], bool]
    module: str = ""


BACKENDS: dict[str, Backend] = {}
"""The registered backends by name (the built-ins register when :mod:`lensattr` is imported)."""


def _never(obj: Any) -> bool:
    return False


def register_backend(
    name: str,
    cls: type[Model],
    detect: Callable[[Any], bool] | None = None,
    *,
    override: bool = False,
) -> type[Model]:
    """Register ``cls`` as the backend ``name``: ``load_model(..., backend=name)`` wraps the
    Hugging Face model it loads with ``cls.from_hf``, and a model object for which
    ``detect(obj)`` is true goes to ``cls.from_native`` (``detect`` omitted: none does).

    A name registered by another module raises ``ValueError`` unless ``override=True``; the
    same module registering it again (a reloaded module, a re-run cell) replaces it.

    Raises:
        TypeError: ``cls`` is not a :class:`Model` subclass.
        ValueError: the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, Model)) or cls is Model:
        raise TypeError(f"backend {name!r}: cls {cls!r} is not a subclass of lensattr's Model")
    old = BACKENDS.get(name)
    if old is not None and not override and old.module != cls.__module__:
        raise ValueError(
            f"a backend named {name!r} is already registered (by {old.module}); "
            "pass override=True to replace it"
        )
    cls.backend = name
    BACKENDS[name] = Backend(name, cls, detect or _never, cls.__module__)
    return cls


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``.

    Raises:
        ValueError: no backend of that name (the message lists the registered ones).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {name!r}")
    return BACKENDS[name]


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
