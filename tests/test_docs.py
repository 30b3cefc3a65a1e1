"""The documentation site builds with ``mkdocs build --strict`` (API pages, notebooks, links)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

for module in (
    "mkdocs",
    "material",
    "mkdocstrings",
    "mkdocstrings_handlers.python",
    "mkdocs_jupyter",
):
    pytest.importorskip(module)


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert (site / "index.html").exists()
    for page in ("concepts", "api/pipeline", "tutorials/01_quickstart"):  # no directory URLs
        assert (site / f"{page}.html").exists(), page
    check_api_reference(site)
    quickstart = (site / "tutorials" / "01_quickstart.html").read_text()
    # stored outputs shown: precision among the pool first, planted AUROC second
    found = re.search(
        r"precision@\d+ among the pool (\d\.\d{3}).*planted AUROC \d\.\d{3}", quickstart
    )
    assert found, "the quickstart's stored outputs (precision among the pool, then AUROC)"


def check_api_reference(site: Path) -> None:
    """Issue 27 item 13: the API reference opens with ``lensattr.__all__``, every public name
    documented there, once in the whole reference; the other pages hold no name twice."""
    import lensattr

    ids: dict[str, list[str]] = {}
    for page in sorted((site / "api").glob("*.html")):
        for anchor in re.findall(r'<h[1-6] id="(lensattr[\w.]*)"', page.read_text()):
            ids.setdefault(anchor, []).append(page.name)
    twice = {k: v for k, v in ids.items() if len(v) > 1}
    assert not twice, twice
    first = re.findall(
        r'<h3 id="(lensattr\.[\w.]+)"',
        (site / "api" / "index.html").read_text(),  # not members
    )
    public = [n for n in lensattr.__all__ if n != "__version__"]
    shown = [a.rsplit(".", 1)[-1] for a in first]
    assert sorted(shown) == sorted(public), set(shown) ^ set(public)
    for anchor in first:  # each under its own module's name, so nothing else takes its anchor
        name = anchor.rsplit(".", 1)[-1]
        assert getattr(lensattr, name) is getattr(
            __import__(anchor.rsplit(".", 1)[0], fromlist=[name]), name
        )
    # elsewhere a public name is only a module's (lensattr.rank, the module of rank)
    import importlib.util

    def is_module(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent is a module, not a package
            return False

    again = [
        a
        for a, pages in ids.items()
        if pages != ["index.html"] and a.rsplit(".", 1)[-1] in public and not is_module(a)
    ]
    assert not again, again


def test_datasets_page_names_every_source(tmp_path):
    """Issue 27 item 10: the sources table of the data guide is what the loader takes: every
    file type its error message lists, hub datasets written hf://owner/name, DataFrames."""
    from lensattr import load_examples

    text = (ROOT / "docs" / "howto" / "datasets.md").read_text()
    table = text.split("## Sources", 1)[1].split("\n## ", 1)[0]
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="unsupported file type") as err:
        load_examples(tmp_path / "x.txt")
    suffixes = set(
        re.findall(r"\.(?:jsonl|json|csv|parquet|\w+)\b", str(err.value).split("use ")[1])
    )
    assert suffixes == {".jsonl", ".json", ".csv", ".parquet"}
    for suffix in suffixes:
        assert f"| `{suffix}` |" in table, suffix
    assert '`"hf://org/name"`' in table and "pandas.DataFrame" in table
    assert '(`"org/name"`)' not in text


def test_docs_point_at_data_users_have():
    """Users have no ``../shared/data`` (the developers' benchmark data): the pages point at
    the bundled files or say where the data comes from."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    offenders = [p.relative_to(ROOT).as_posix() for p in pages if "shared/data" in p.read_text()]
    assert not offenders, offenders


def test_docs_nav_has_no_duplicate_pages():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use !!python/name tags; only the nav matters here
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)["nav"]

    def leaves(items):
        for item in items:
            if isinstance(item, dict):
                for title, value in item.items():
                    yield from leaves(value) if isinstance(value, list) else [(title, value)]
            else:
                yield (None, item)

    pairs = list(leaves(nav))
    files = [f for _, f in pairs]
    assert len(files) == len(set(files)), files
    titles = [t.lower().replace("-", " ") for t, _ in pairs if t]
    assert "scale out" not in titles and titles.count("scaling out") == 1, titles


def test_custom_methods_guide_runs(tmp_path):
    """The Python blocks of the custom-methods guide run top to bottom on the tiny model (in a
    subprocess: their registrations must not leak into the test session), and ``select`` picks
    one of the four methods the guide names."""
    text = (ROOT / "docs" / "howto" / "custom-methods.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if not b.startswith(">>>")]
    assert len(blocks) >= 5, "the guide lost its examples"
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks) + "\nprint('CHOSEN', sel.method)\n")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    chosen = re.search(r"^CHOSEN (\S+)$", proc.stdout, re.M)
    assert chosen, proc.stdout[-2000:]
    assert chosen.group(1) in {
        "sign_contrast|residual_change|abs_cosine",
        "clipped_pool_contrast|resid_post|centered_cosine",
        "pool_contrast|resid_post|deflated_cosine",
        "residual_change|residual_change|cosine",
    }


def _docs_tables():
    """``scripts/docs_tables.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(
        "docs_tables", ROOT / "scripts" / "docs_tables.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_tables_agree_with_their_results_files(capsys):
    """Every table between ``<!-- generated: NAME -->`` markers is what
    ``scripts/docs_tables.py`` renders from its results file: no page quotes a number its file
    does not hold."""
    assert _docs_tables().main(["--check"]) == 0, capsys.readouterr().err


def test_every_table_is_on_a_page_and_every_results_file_has_its_layout():
    """Each table is generated somewhere; each results file, placeholder or not, renders every
    table that reads it (a placeholder's empty slots as "not measured yet")."""
    t = _docs_tables()
    text = "".join(p.read_text() for p in t.pages())
    for name, (file, fn, _) in t.TABLES.items():
        assert f"<!-- generated: {name} -->" in text, name
        data = json.loads((t.RESULTS / file).read_text())
        placeholder = data.pop("placeholder", False)
        rendered = fn(data)
        assert rendered.startswith(("|", data.get("setup", {}).get("model") or "|")), rendered
        if placeholder:
            assert t.MISSING in rendered and t.MISSING in t.render(name).lower()


def test_demo_table_reads_what_the_demo_writes():
    """The demo table from a summary in ``lensattr demo``'s layout: metrics, intervals and
    top-10 counts as written, a layer set joined, the method's ``|`` kept out of the cells, a
    baseline row only when the summary has it."""
    t = _docs_tables()
    auto = {"method": "pool_contrast|resid_post|deflated_cosine", "layer": [3, 6, 2], "k": 12}
    auto |= {"planted_in_top10": 9, "p_at_k": 0.75, "p_at_k_ci": [0.5, 0.9167], "ap": 0.8139}
    paper = {"method": "residual_change|residual_change|cosine", "layer": 19, "k": 12}
    paper |= {"planted_in_top10": 4, "p_at_k": 0.4167, "p_at_k_ci": [0.1667, 0.6667], "ap": 0.3}
    rows = t.render_demo({"auto": auto, "paper": paper}).splitlines()
    assert rows[0].split(" | ")[4] == "P@12 [95% CI]"
    assert rows[2] == (
        "| `auto` | `pool_contrast / resid_post / deflated_cosine` | 3, 6, 2 "
        "| 9 | 0.75 [0.50, 0.92] | 0.81 |"
    )
    assert rows[3].endswith("| 19 | 4 | 0.42 [0.17, 0.67] | 0.30 |")
    assert len(rows) == 4  # no lexical or repsim row in this summary
    lexical = {"kind": "tfidf", "p_at_k": 0.5, "k": 12}
    assert "| text search (TF-IDF / BM25) | `tfidf` |  | not measured yet | 0.50 |" in (
        t.render_demo({"auto": auto, "paper": paper, "lexical": lexical})
    )


def test_generalisation_and_peers_tables_compute_what_they_claim():
    """Per-behaviour rows and group means as the report holds them; bergson ratios from the
    fastest round of each side (the highest peak memory), checked against plain arithmetic."""
    t = _docs_tables()
    rows = {"a": {"auto (LOBO)": 0.5, "hindsight": 0.75, "paper": 0.25}, "b": {"auto (LOBO)": 1.0}}
    means = {
        "auto (LOBO)": {"mean": 0.75, "ci": [0.5, 1.0]},
        "hindsight": {"mean": 0.75, "ci": None},
    }
    summary = {"all": {"means": means, "within_0.05_of_hindsight": {"auto (LOBO)": 1}}}
    out = t.render_generalisation({"rows": rows, "summary": summary}).splitlines()
    assert out[0] == "| behaviour | auto | authors' method | hindsight |"
    assert out[2] == "| a | 0.50 | 0.25 | 0.75 |"
    assert out[3] == "| b | 1.00 | not measured yet | not measured yet |"
    assert out[4] == "| **mean, all** | 0.75 [0.50, 1.00] | not measured yet | 0.75 |"
    rules = t.render_generalisation_rules({"rows": rows, "summary": summary}).splitlines()
    assert rules[2] == "| `auto (LOBO)` | 0.75 [0.50, 1.00] | 1 of 2 |"

    runs = {
        "bergson": [
            {"pipeline_s": 250.0, "peak_rss_mb": 6000.0},
            {"pipeline_s": 200.0, "peak_rss_mb": 6200.0},
        ],
        "full": [
            {"pipeline_s": 130.0, "peak_rss_mb": 3000.0},
            {"pipeline_s": 110.0, "peak_rss_mb": 3100.0},
        ],
    }
    peers = t.render_peers({"runs": runs}).splitlines()
    full = next(r for r in peers if "`build_cache`" in r)
    assert full.split(" | ")[1:] == [
        "110 s",
        f"{110 / 200:.2f}",
        "3,100 MB",
        f"{3100 / 6200:.2f} |",
    ]
    assert peers[-1].count("not measured yet") == 4  # cheapgrad did not run


def test_generated_blocks_are_rewritten_and_bad_markers_named(tmp_path):
    """A stale block is rewritten from its file and text outside it is kept; an unknown table or
    an unclosed block stops with the page and line."""
    t = _docs_tables()
    page = "intro\n<!-- generated: demo -->\nold numbers\n<!-- /generated -->\noutro"
    new = t.regenerate(page, "p.md")
    assert (
        new
        == f"intro\n<!-- generated: demo -->\n\n{t.render('demo')}\n\n<!-- /generated -->\noutro"
    )
    assert t.regenerate(new, "p.md") == new
    with pytest.raises(SystemExit, match=r"p\.md:2: no table named 'nope'"):
        t.regenerate("x\n<!-- generated: nope -->\n<!-- /generated -->", "p.md")
    with pytest.raises(SystemExit, match=r"p\.md:1: 'demo' has no <!-- /generated -->"):
        t.regenerate("<!-- generated: demo -->\ntext", "p.md")
