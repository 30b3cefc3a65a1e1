"""The model backends: loading a model once and capturing its activations.

:mod:`~lensattr.backends.models` (``load_model``: every way to name a model; chooses the backend
once), :mod:`~lensattr.backends.backend` (the ``Model`` interface every backend subclasses),
:mod:`~lensattr.backends.capture` (``capture`` and the nnsight backend),
:mod:`~lensattr.backends.bridge` (the TransformerLens backend), :mod:`~lensattr.backends.sites`
(TransformerLens site names and where they live in a Hugging Face model) and
:mod:`~lensattr.backends.loss` (the response loss both backends differentiate).
"""
