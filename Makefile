# The two commands that do everything on a fresh machine:
#   make bench   set up .venv, build, run the block benchmark (small sizes on a CPU-only machine)
#   make test    set up .venv, build, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Require the compiled extension in the tests when a CUDA toolkit is here to build it.
CUDA_HOME ?= /usr/local/cuda
REQUIRE_C ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
PYTEST_ARGS ?=
# Test files spread over every core (pytest-xdist); whole files per worker, so a module-scoped
# fixture (the sm_90 compile of every config) runs once. PYTEST_JOBS=0 runs serially.
PYTEST_JOBS ?= auto
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_JOBS)),,-n $(PYTEST_JOBS) --dist loadfile)

# The GPU machine's versions (torch 2.11 brings triton 3.6; numpy < 2.4 for its interpreter): a
# second environment, without the extension (it is built against .venv's torch), running the
# sm_90 AOT compile of every selector config and a short interpreted parity subset.
# Python 3.12 as on the GPU machine where one runs (a pyenv shim that fails does not count).
PYTHON211_FOUND := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys' >/dev/null 2>&1 && { echo $$p; break; }; done)
PYTHON211 ?= $(or $(PYTHON211_FOUND),$(PYTHON))
VENV211 ?= .venv-torch211
PY211 := $(VENV211)/bin/python
TORCH211_TESTS ?= tests/test_triton_aot.py tests/test_triton_forward.py
TORCH211_SELECT ?= test_triton_aot or (test_forward_parity and bottleneck-projection-s2 and fp16) or (test_backward_parity and bottleneck-projection-s2 and train and fp16) or test_torch_compile_fullgraph

.PHONY: venv build test bench bench-models flops clean venv-torch211 test-torch211 gpu-check-dry-run gpu-check-file gpu-check-plan

venv: $(VENV)/.deps-installed

$(VENV)/.deps-installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# The extension is rebuilt when its sources or the build script change.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps-installed setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

test: build
	RESNET_FUSED_REQUIRE_C=$(REQUIRE_C) $(PY) -m pytest --durations=15 $(PYTEST_PARALLEL) $(PYTEST_ARGS) tests

venv-torch211: $(VENV211)/.deps-installed

$(VENV211)/.deps-installed: requirements-torch211.txt
	test -x $(PY211) || $(PYTHON211) -m venv $(VENV211)
	$(PY211) -m pip install -r requirements-torch211.txt
	touch $@

# The package is imported from the source tree (pyproject's pytest pythonpath); _C is not built
# here (it belongs to .venv's torch), so the tests that need it skip, and REQUIRE_C stays 0.
test-torch211: venv-torch211
	$(PY211) -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	RESNET_FUSED_REQUIRE_C=0 $(PY211) -m pytest -p no:cacheprovider --durations=10 $(PYTEST_PARALLEL) $(TORCH211_TESTS) -k "$(TORCH211_SELECT)"

# The CPU dry run of scripts/gpu_check.sh quick + tune (tests/test_gpu_check.py runs it too, with
# GPU_CHECK_DRY_RUN_FAULT injecting a CUDA fault and an eager model block).
gpu-check-dry-run: build
	OUT=$(or $(OUT),out/dry-run) PYTHON=$(PY) bash scripts/gpu_check.sh --dry-run quick tune

# The GPU quick plan's predicted time per part against its budget.
gpu-check-plan: venv
	$(PY) scripts/gpu_plan.py

# File what a GPU run brought back (OUT=<folder>): benchmarks/results/, the tuned table,
# AUTO_CUDA_TABLE and README's Results section.
gpu-check-file: venv
	test -n "$(OUT)" || { echo "make gpu-check-file OUT=<the folder the run's files came back into>"; exit 2; }
	$(PY) scripts/file_gpu_results.py $(OUT)

bench: build
	$(PY) benchmarks/bench_blocks.py

bench-models: build
	$(PY) benchmarks/bench_models.py

flops: build
	$(PY) -m resnet_fused.flops --paper

clean:
	rm -rf build *.egg-info resnet_fused/_C*.so $(VENV)/.built
