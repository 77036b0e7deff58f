# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Both create .venv, install torch first (pinned, CPU wheel where available), then safeflow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test docs bench clean

# The compiled kernels must build here (the CUDA one too wherever nvcc exists), so a broken C++ or
# CUDA build fails `make test` and CI; a plain `pip install` only warns. `make SAFEFLOW_REQUIRE_EXT=0` to relax.
SAFEFLOW_REQUIRE_EXT ?= 1
export SAFEFLOW_REQUIRE_EXT

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.h csrc/*/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/safeflow demo --out runs/demo

test: install
	$(BIN)/safeflow assets fetch
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest
	$(BIN)/sphinx-build -W -q -b html docs docs/_build/html

docs: install
	$(BIN)/sphinx-build -W -b html docs docs/_build/html

bench: install
	$(BIN)/safeflow assets fetch
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-columns=median,iqr,rounds \
		--benchmark-json=benchmarks/latest.json
	# the CPU ratios by the interleaved protocol (median of per-round ratios, with spread and machine)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/pairs.py --json benchmarks/pairs.json

clean:
	rm -rf $(VENV) docs/_build runs .pytest_cache
