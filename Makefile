# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit integration test-all conformance bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/demo.py

lint: venv
	$(BIN)/ruff check src tests benchmarks examples

typecheck: venv
	$(BIN)/mypy

# Two pytest workers (the machines have 2 cores, and most tests wait on processes): about half
# the time of one. Every Ray test goes to one worker (tests/conftest.py). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

test: lint typecheck
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests
	$(MAKE) --no-print-directory conformance

# CPython 3.13's own concurrent.futures process-pool tests (the installed `test` package, not
# copied here) against corral.ProcessPoolExecutor, under fork, forkserver and spawn: about 1.5
# minutes. Needs pyenv's 3.13 (its own venv, .venv-3.13); skipped with a message without it.
PY313 = $(shell r=$$(pyenv root 2>/dev/null) && v=$$(pyenv versions --bare 2>/dev/null | grep '^3\.13' | tail -1) && [ -n "$$v" ] && echo $$r/versions/$$v/bin/python)

conformance:
	@if [ -z "$(PY313)" ] || [ ! -x "$(PY313)" ]; then \
	  echo "conformance: no Python 3.13 from pyenv here; skipped"; \
	else \
	  $(MAKE) --no-print-directory $(CONF_STAMP) PY=$(PY313) && \
	  $(CONF_VENV)/bin/python tests/conformance/run_cpython_futures.py; \
	fi

# The conformance run needs corral and its dependencies only, not the test extra (Ray alone is
# most of that install's time).
CONF_VENV := .venv-conformance
CONF_STAMP := $(CONF_VENV)/.installed

$(CONF_STAMP): pyproject.toml
	$(PY) -m venv $(CONF_VENV)
	$(CONF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CONF_VENV)/bin/python -m pip install --quiet -e .
	touch $(CONF_STAMP)

unit: venv
	$(BIN)/python -m pytest -q tests/unit

# The suite on every supported interpreter (pyenv's), each in its own venv.
test-all:
	@for v in 3.11 3.12 3.13; do \
	  py=$$(pyenv root)/versions/$$(pyenv versions --bare | grep "^$$v" | tail -1)/bin/python; \
	  echo "== Python $$v ($$py)"; \
	  $(MAKE) --no-print-directory test PY=$$py VENV=.venv-$$v || exit 1; \
	done

# The bench makes and uses its own venv (benchmarks/.venv-bench, with the original from PyPI).
bench:
	$(PY) benchmarks/run.py

bench-quick:
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .venv-3.* $(CONF_VENV) .mypy_cache .pytest_cache .ruff_cache
