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

# every benchmark with the command its committed JSON came from (see each script's docstring), then the
# README's table from the JSON files; peft.py runs its sections one after the other (the committed run had
# two in parallel)
bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/finetune_step.py
	$(PY) benchmarks/streaming.py
	$(PY) benchmarks/spatialdata_io.py
	$(PY) benchmarks/store_run.py
	$(PY) benchmarks/cell_level.py --parallel
	$(PY) benchmarks/tissue_level.py --level1-preset small --level1-epochs 200 --level2-epochs 80 \
		--level2-seeds 0 1 2
	$(PY) benchmarks/peft.py --threads 1
	$(PY) benchmarks/summarize.py --write README.md

clean:
	rm -rf xscale-demo .pytest_cache
