# The two commands a newcomer needs: `make run` and `make test`.
# Everything bootstraps `.venv` first; nothing needs installing by hand but Python >= 3.11.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check lint fmt typecheck bench clean image

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v -E "^WARNING: Location '.*' is ignored" || true
	@$(BIN)/python -c 'import lacuna_webhooks' && touch $(STAMP)

run: $(STAMP)
	$(BIN)/lacuna-webhooks dev

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check service tests examples bench
	$(BIN)/ruff check service tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

fmt: $(STAMP)
	$(BIN)/ruff format service tests examples bench
	$(BIN)/ruff check --fix service tests examples bench

bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
	$(BIN)/python bench/dispatch.py $(DISPATCH_ARGS)

# The container image, built with podman and no registry (deploy/build-image.sh says how).
image: $(STAMP)
	deploy/build-image.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .bench dist build deploy/.build
