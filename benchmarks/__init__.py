"""The study and benchmark scripts: research code outside the ``lensattr`` package.

Each module is a script, run from the repository root as ``python -m benchmarks.NAME``, and
importable as ``benchmarks.NAME`` (the tests check their parts). They use lensattr's public API
only, as a user would: names that do not start with an underscore, imported from the package
or one of its public modules; no ``sys.path`` edits and no patched modules
(``tests/test_public_api.py`` checks it). A study that compares choice rules registers each rule
with :func:`lensattr.register_criterion` and passes its name (``select(criterion=...)``,
``lensattr.criterion.evaluate(criterion=...)``); ``choice_study.py`` is the example.
"""
