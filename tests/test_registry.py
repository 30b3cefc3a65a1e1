"""Registries: decorators, duplicates, entry-point plugins, custom methods end to end."""

import sys
import textwrap

import pytest
import torch

import lensattr
from lensattr import registry
from lensattr.methods import pool


def test_builtins_are_registered_eagerly():
    # no lookup has to happen first: importing the registry registers the built-ins
    builtins = {"residual_change", "residual_change_reply", "resid_post", "grad"}
    assert builtins <= set(registry.STAT)
    assert {"contrast", "residual_change", "residual_diff", "persona", "pool_contrast"} <= set(
        registry.QUERY
    )
    assert {"cosine", "dot", "centered_cosine", "deflated_cosine"} <= set(registry.SCORE)
    assert "pool_contrast" in registry.names("query")


@pytest.mark.parametrize("deco", [registry.register_stat, registry.register_score])
def test_duplicate_names_from_another_module_are_refused(deco):
    with pytest.raises(ValueError, match="already registered"):
        deco("resid_post" if deco is registry.register_stat else "cosine")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_query("residual_diff", stat="resid_post")(lambda *a: None)
    assert registry.SCORE["cosine"].module == "lensattr.methods.scores"  # nothing half-replaced


def test_re_registering_from_the_same_module_replaces_and_override_replaces_any():
    def first(acts):
        return acts.z_out.mean(1)

    def second(acts):
        return acts.z_in.mean(1)

    try:
        registry.register_stat("test_rerun", needs_grad=False)(first)
        registry.register_stat("test_rerun", needs_grad=False)(second)  # a re-run notebook cell
        assert registry.STAT["test_rerun"].fn is second
        plain = registry.SCORE["dot"]
        registry.register_score("dot", override=True)(lambda *a: None)
        assert registry.SCORE["dot"].fn is not plain.fn
    finally:
        registry.STAT.pop("test_rerun", None)
        registry.SCORE["dot"] = plain


def install_plugin(tmp_path, monkeypatch, name: str, source: str) -> None:
    """A module ``name`` registered in the ``lensattr.methods`` entry-point group (a fake dist)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[lensattr.methods]\nmine = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)


def test_a_broken_plugin_is_logged_and_skipped(tmp_path, monkeypatch, caplog):
    install_plugin(tmp_path, monkeypatch, "brokenplugin", "raise ImportError('boom')\n")
    with caplog.at_level("WARNING", logger="lensattr.registry"):
        assert registry.get_stat("resid_post").name == "resid_post"
    assert "brokenplugin" in caplog.text and "boom" in caplog.text


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="residual_change"):
        registry.get_stat("nope")


def test_custom_statistic_and_query_by_decorator_end_to_end(
    tiny, train_records, pair_records, tmp_path
):
    @lensattr.register_stat("test_attn_pooled", needs_grad=False, sites=("attn_out",))
    def attn_pooled(acts):
        return pool(acts.attn_out, acts.mask)

    @lensattr.register_query("test_treatment_only", stat="test_attn_pooled")
    def treatment_only(treatment, control, pool):
        return treatment

    try:
        cache = lensattr.build_cache(
            tiny,
            train_records,
            out=tmp_path,
            layers=[1],
            stats=["test_attn_pooled", "resid_post"],
            progress=False,
        )
        q = lensattr.behavior_query(tiny, pair_records, query="test_treatment_only", layers=[1])
        assert q.stat == "test_attn_pooled"
        r = lensattr.rank(cache, q, layer=1, top_k=3)
        # independent: cosine of the stored rows with the query vector
        rows = cache.stat("test_attn_pooled", 1)[:].float()
        cos = torch.nn.functional.cosine_similarity(rows, q.vector(1)[None], dim=1)
        assert r.ids == [cache.ids[i] for i in torch.topk(cos, 3).indices.tolist()]
    finally:
        registry.STAT.pop("test_attn_pooled")
        registry.QUERY.pop("test_treatment_only")


def test_entry_point_plugin_is_loaded_lazily_once(tmp_path, monkeypatch, tiny, train_records):
    install_plugin(
        tmp_path,
        monkeypatch,
        "myplugin",
        """
        from lensattr import register_stat
        from lensattr.methods import pool
        LOADS = [1]

        @register_stat("plugin_zin")
        def plugin_zin(acts):
            return pool(acts.z_in, acts.mask)
        """,
    )
    try:
        assert registry.get_stat("plugin_zin").name == "plugin_zin"
        registry.load_plugins()  # a second load is a no-op, not a duplicate error
        assert sys.modules["myplugin"].LOADS == [1]
        cache = lensattr.build_cache(
            tiny,
            train_records[:3],
            out=tmp_path / "c",
            layers=[2],
            stats=["plugin_zin"],
            progress=False,
        )
        assert cache.stat("plugin_zin", 2).shape == (3, tiny.d_model)
    finally:
        registry.STAT.pop("plugin_zin", None)
        sys.modules.pop("myplugin", None)
