"""Optional dependencies: import one, or fail with one line naming the extra that installs it.

The library itself needs only its core dependencies; ``lensattr demo`` (its plot, the lexical
baseline) needs the ``demo`` extra (matplotlib, scikit-learn, bm25s), ``lensattr bench`` (plots,
LoRA fine-tuning, the lexical baselines) the ``bench`` extra (matplotlib, peft, scikit-learn,
bm25s) and the TransformerBridge backend the ``tl`` extra. ``make setup`` installs
all of them through the ``dev`` extra.
"""

import importlib
from types import ModuleType

EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("matplotlib", "sklearn", "bm25s"),
    "bench": ("matplotlib", "peft", "sklearn", "bm25s"),
    "tl": ("transformer_lens",),
}
"""The top-level modules that each extra of ``pyproject.toml`` installs."""


def install_hint(module: str, extra: str) -> str:
    """The one-line message for ``module`` (an import name) missing from ``extra``.

    Example:
        >>> install_hint("peft", "bench").split(": ")[1]
        "pip install 'lensattr[bench]' (from a checkout"
    """
    return (
        f"{module} is not installed; lensattr needs it here, from its '{extra}' extra: "
        f"pip install 'lensattr[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
    )


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` that says how to install it.

    Args:
        module: the import name, e.g. ``"matplotlib"`` or ``"peft"`` (a submodule such as
            ``"matplotlib.pyplot"`` works too).
        extra: the lensattr extra that installs it, e.g. ``"demo"`` or ``"bench"``.

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: ``module`` is not installed; the message names the extra and the
            command. A module that is installed but fails inside its own imports re-raises
            that error.

    Example:
        >>> require("json", "demo").dumps([1])
        '[1]'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.partition(".")[0]
        if err.name not in (module, top):
            raise  # installed, but broken inside: that error is the useful one
        raise ModuleNotFoundError(install_hint(top, extra), name=top) from None


def explain(err: BaseException, command: str = "") -> str:
    """``str(err)``, or, when ``err`` is a missing package of an extra, the install hint.

    Args:
        err: the exception to report.
        command: the CLI command that raised it (``"demo"``, ``"bench"``): its extra is named
            when it is one that installs the missing package.

    Returns:
        One line for the user.

    Example:
        >>> explain(ModuleNotFoundError("No module named 'peft'", name="peft"), "bench")[:30]
        'peft is not installed; lensatt'
    """
    name = getattr(err, "name", None)
    if not isinstance(err, ModuleNotFoundError) or name is None or "pip install" in str(err):
        return str(err)
    top = name.partition(".")[0]
    extras = [extra for extra, modules in EXTRAS.items() if top in modules]
    if not extras:
        return str(err)
    return install_hint(top, command if command in extras else extras[0])
