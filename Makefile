# Quick start: `make demo` and `make test` each set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := .demo

.PHONY: setup demo test test-slow lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/flashmoe synth $(DEMO)/model --arch qwen3_moe --layout mlx --bits 4 \
		--layers 8 --hidden 512 --experts 64 --topk 4 --moe-inter 256 --vocab 2048 --force
	$(BIN)/flashmoe inspect $(DEMO)/model
	$(BIN)/flashmoe run --model $(DEMO)/model --memory-budget 16MiB \
		--prompt "The quick brown fox" --max-tokens 48

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
