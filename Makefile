# Every target installs what it needs into .venv first (torch pinned to the CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GUARD_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: install demo test lint bench bench-0.6b clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

## Build the demo model (cached) and moderate the showcase conversations.
demo: install
	$(BIN)/guard demo

## The whole test suite, lint included (what CI runs).
test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

## Stream-engine benchmark on the demo model; results in benchmarks/results/.
bench: install
	$(BIN)/python benchmarks/stream_bench.py --model demo --json benchmarks/results/demo-cpu.json

bench-0.6b: install
	$(BIN)/python benchmarks/stream_bench.py --model 0.6B --contexts 128,512,1024,2048,4096 \
	  --naive-contexts 128,512,2048 --tokens 8 --naive-reps 1 --streams 1,4,16 --chunks 1,8 \
	  --tokens-per-stream 8 --json benchmarks/results/0.6B-cpu.json

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
