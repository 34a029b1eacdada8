# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit integration test-all bench bench-quick clean

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

test: lint typecheck
	$(BIN)/python -m pytest -q tests

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
	rm -rf $(VENV) .venv-3.* .mypy_cache .pytest_cache .ruff_cache
