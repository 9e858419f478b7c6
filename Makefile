# enc: two commands on a fresh machine: `make demo` and `make test`.
PY     ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DEMO    = demo-out

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch is pinned here only: 2.13.0 is the CPU build on disk; an unpinned torch pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	rm -rf $(DEMO)
	$(BIN)/enc inspect examples/albert_tiny --no-tensors
	$(BIN)/enc convert examples/albert_tiny -o $(DEMO)/albert-tiny-hf
	$(BIN)/enc parity examples/albert_tiny $(DEMO)/albert-tiny-hf
	$(BIN)/enc fill-mask "plants create [MASK] through photosynthesis." --model $(DEMO)/albert-tiny-hf --top-k 5

test: install
	$(BIN)/python -m pytest -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_albert_convert.py
	$(BIN)/python benchmarks/bench_fill_mask_cold.py

clean:
	rm -rf $(DEMO) bench-out .pytest_cache
