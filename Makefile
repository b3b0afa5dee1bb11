# lmlab developer entry points. `make quickstart` runs the quickstart experiment and writes its
# report; `make test` runs the test suite. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The offline data folder beside a checkout of this workplace; override or unset on your machine.
LMLAB_DATA_DIR ?= $(abspath ../shared/data)
export LMLAB_DATA_DIR

.PHONY: install quickstart test lint bench clean

install: $(VENV)/.installed

# --system-site-packages lets a torch that is already installed (a CUDA build, say) be used as it
# is; torch==2.13.0 (CPU) is installed only when no torch can be imported.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# WikiText-2 is found or downloaded (sha256-verified). A machine that can have neither (no
# network, no files) trains on the offline test-articles corpus instead, named as such everywhere.
FALLBACK := $(wildcard $(LMLAB_DATA_DIR)/wikitext-2-test-articles)

quickstart: install
	$(BIN)/lmlab run examples/quickstart.yaml --out runs/quickstart $(if $(FALLBACK),--fallback-corpus $(FALLBACK))
	$(BIN)/lmlab report runs/quickstart

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
