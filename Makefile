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

.PHONY: setup demo test test-all
setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain sft --config examples/sft.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest
