"""Collection for ``pytest --doctest-modules lensattr tests``: each deprecated old module path
(``lensattr/cache.py``, ...) is the moved module itself, which is collected where it lives now."""

from lensattr._deprecated import MOVED

collect_ignore = [old.replace(".", "/") + ".py" for old in MOVED]
