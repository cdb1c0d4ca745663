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

.PHONY: venv build test bench bench-models flops clean

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

bench: build
	$(PY) benchmarks/bench_blocks.py

bench-models: build
	$(PY) benchmarks/bench_models.py

flops: build
	$(PY) -m resnet_fused.flops --paper

clean:
	rm -rf build *.egg-info resnet_fused/_C*.so $(VENV)/.built
