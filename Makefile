# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv (if missing) and install the pinned dependencies first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JSONARGPARSE_DEPRECATION_WARNINGS := off

.PHONY: setup demo lint test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned on the same line as everything else (see ../shared/STACK.md)
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xscale demo --out xscale-demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --timeout=900

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout=3600

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf xscale-demo .pytest_cache
