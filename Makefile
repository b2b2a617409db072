# Two commands do it all on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: install
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -ne 5 ] || echo 'make test: no tests were collected' >&2; [ $$rc -eq 0 ]

# Side-by-side benchmarks (docs/benchmarks.md); BENCH_ARGS="--profile quick" checks the harness.
BENCH_ARGS ?= --publish
bench: install
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
