# Every target bootstraps what it needs: a .venv with torch 2.13.0 (CPU wheel) first, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints/ci.txt -e '.[dev]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints/ci.txt -e '.[dev,bench]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(BENCH_STAMP)
	$(PY) examples/demo.py

bench: $(BENCH_STAMP)
	$(PY) benchmarks/bench_text5.py
	$(PY) benchmarks/bench_atm.py
	$(PY) benchmarks/bench_merge_io.py
	$(PY) benchmarks/bench_subspace.py --layers 2
	$(PY) benchmarks/bench_lora.py
	$(PY) benchmarks/bench_c2m3.py

lint: $(STAMP)
	$(PY) -m ruff check hf_merge tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
