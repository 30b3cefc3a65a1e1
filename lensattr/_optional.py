"""Optional dependencies: import one, or fail with one line naming the extra that installs it.

The library itself needs only its core dependencies; ``lensattr demo`` (its plot) needs the
``demo`` extra (matplotlib) and ``lensattr bench`` (plots, LoRA fine-tuning) the ``bench`` extra
(matplotlib, peft). ``make setup`` installs all of them through the ``dev`` extra.
"""

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` that says how to install it.

    Args:
        module: the import name, e.g. ``"matplotlib"`` or ``"peft"`` (a submodule such as
            ``"matplotlib.pyplot"`` works too).
        extra: the lensattr extra that installs it, e.g. ``"demo"`` or ``"bench"``.

    Returns:
        The imported module.

    Raises:
        ImportError: ``module`` is not installed; the message names the extra and the command.
            A module that is installed but fails inside its own imports re-raises that error.

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
        raise ModuleNotFoundError(
            f"{top} is not installed; lensattr needs it here, from its '{extra}' extra: "
            f"pip install 'lensattr[{extra}]' (from a checkout: pip install -e '.[{extra}]')",
            name=top,
        ) from None
