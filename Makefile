# Two entry points (README): `make demo` and `make test`. Both create .venv/ on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	bash scripts/test-deps.sh
	$(BIN)/ruff check retrieval indexer api eval tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the quick loop while editing: no external engines (Orthanc, Chromium), no kill tests, no slow runs
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check retrieval indexer api eval tests
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf demo-out .pytest_cache
