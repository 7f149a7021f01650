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

DEMO_MODEL := models/tiny-pystdlib-moe
DEMO_PROMPT := import os\n\n\ndef read_lines(path):\n

demo: $(STAMP)
	$(BIN)/flashmoe inspect $(DEMO_MODEL)
	@printf '\n$(DEMO_PROMPT)'
	@$(BIN)/flashmoe run --model $(DEMO_MODEL) --memory-budget 9MiB --max-tokens 80 \
		--temperature 0.7 --top-p 0.95 --seed 2 --prompt "$$(printf '$(DEMO_PROMPT)')"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x -n 2 --durations=15 -m 'not slow and not gpu and not serial'
	$(BIN)/python -m pytest -q -x -m serial

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
