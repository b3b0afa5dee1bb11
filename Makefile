# lmlab developer entry points. `make quickstart` runs the quickstart experiment and writes its
# report; `make test` runs the test suite. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where the data is: lmlab itself assumes no folder. It searches $LMLAB_DATA_DIR when set, then
# its cache (~/.cache/lmlab), then downloads WikiText-2; $LMLAB_FALLBACK_CORPUS is trained on
# only when WikiText-2 can be had neither way. This workplace keeps its offline copy beside the
# checkout (../shared/data): when that folder exists, make points both variables into it.
WORKPLACE_DATA := $(wildcard $(abspath ../shared/data))
ifneq ($(WORKPLACE_DATA),)
export LMLAB_DATA_DIR ?= $(WORKPLACE_DATA)
export LMLAB_FALLBACK_CORPUS ?= $(wildcard $(WORKPLACE_DATA)/wikitext-2-test-articles)
endif

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
# network, no files) trains on $LMLAB_FALLBACK_CORPUS instead, named as such everywhere.
quickstart: install
	$(BIN)/lmlab run examples/quickstart.yaml --out runs/quickstart
	$(BIN)/lmlab report runs/quickstart

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
