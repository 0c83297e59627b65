# Two commands on a fresh machine: `make test` and `make demo`.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo demo-quick bench venv clean

venv: $(STAMP)

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Lint (ruff) and the layering contracts (import-linter, pyproject.toml) first.
# The tests run on every core, a test file per worker (its module fixtures stay
# in one process); the workers share the persistent compilation cache.
test: $(STAMP)
	$(VENV)/bin/ruff check jaxent tests bench
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n auto --dist loadfile tests

# Includes the checks marked slow (a faster test covers each in `make test`).
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests

demo: $(STAMP)
	$(VENV)/bin/jaxent demo --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/jaxent demo --quick --out runs/demo-quick

bench: $(STAMP)
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) runs .pytest_cache
