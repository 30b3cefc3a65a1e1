"""docs/howto/own-model.md: every example runs as written on the tiny model saved to a directory
(``path/to/model``), and each way in gives the same weights as ``load_model("tiny-random")``."""

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

from lensattr.testing import tiny_hf_model, tiny_tokenizer

PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto" / "own-model.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
WAYS, AFTER = BLOCKS[:-1], BLOCKS[-1]


def test_the_page_has_four_ways_in_and_one_common_step():
    assert len(WAYS) == 4 and "build_cache(model" in AFTER
    assert all("load_model(" in block for block in WAYS)


@pytest.mark.parametrize("i", range(len(WAYS)), ids=["directory", "transformers", "nnsight", "tl"])
def test_each_way_in_runs_and_loads_the_same_weights(i, tiny, tmp_path, monkeypatch):
    block = WAYS[i]
    if "bridge" in block and importlib.util.find_spec("transformer_lens") is None:
        pytest.skip("the TransformerLens example needs the tl extra")
    saved = tmp_path / "model"
    tiny_hf_model().save_pretrained(saved)
    tiny_tokenizer().save_pretrained(saved)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(block.replace("path/to/model", str(saved)), namespace)  # noqa: S102
    deprecated = [str(w.message) for w in seen if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated  # the page shows each library's current API
    exec(AFTER, namespace)  # noqa: S102
    model, cache = namespace["model"], namespace["cache"]
    assert model.fingerprint()["weights_sha256"] == tiny.fingerprint()["weights_sha256"]
    assert len(cache) == 4 and cache.layers == [1]
