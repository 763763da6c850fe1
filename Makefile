# hpdl: `make run` trains the default model, `make test` runs the whole suite.
# Both create the virtual environment first; nothing else needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpirun
DATA ?= data/mnist.h5
# Each MPI test run is bounded so a deadlock fails the suite instead of hanging it.
MPI_TIMEOUT ?= 900
# One BLAS thread per rank: the MPI tests run several ranks on two cores.
MPI_ENV := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# The jobs/ tests start a one-node Slurm cluster (installing slurm-wlm as root; skipped where they
# cannot), submit every script and wait for it; bounded too.
SLURM_TIMEOUT ?= 900

.PHONY: run test test-unit test-mpi test-slurm test-gpu test-gpu-fake data bench clean help

help:
	@echo "make run    set up .venv, prepare MNIST, train the default model (mlp)"
	@echo "make test   set up .venv and run the whole test suite (unit + gpu tests on a CuPy stand-in + MPI + Slurm job scripts)"
	@echo "make bench  install the benchmark extras (matplotlib, PyTorch CPU) and run the benchmarks"
	@echo "make test-gpu PY=...  on a CUDA machine: the gpu tests, then the end-to-end runs with --device gpu"
	@echo "make test-gpu-fake    without a GPU: the gpu tests on tests/fakegpu's stand-in for CuPy"

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

data: $(DATA)

$(DATA): | $(VENV)/.installed
	$(PY) -m hpdl.data prepare mnist --out $@

run: $(VENV)/.installed $(DATA)
	$(PY) -m hpdl.train --data $(DATA)

test: test-unit test-gpu-fake test-mpi test-slurm

test-unit: $(VENV)/.installed
	$(PY) -m pytest -q --ignore=tests/mpi --ignore=tests/slurm

test-mpi: $(VENV)/.installed
	$(MPI_ENV) timeout -k 10 $(MPI_TIMEOUT) $(MPIRUN) -n 2 $(PY) -m pytest --with-mpi -q -p no:cacheprovider tests/mpi
	$(MPI_ENV) timeout -k 10 $(MPI_TIMEOUT) $(MPIRUN) -n 4 $(PY) -m pytest --with-mpi -q -p no:cacheprovider tests/mpi

test-slurm: $(VENV)/.installed
	$(MPI_ENV) timeout -k 10 $(SLURM_TIMEOUT) $(PY) -m pytest -q -m slurm -p no:cacheprovider tests/slurm

# On a CUDA machine, with a Python that has cupy and hpdl's requirements (no venv is made: such
# machines may be offline): the `gpu` tests, then the single-process, pipeline and parameter-server
# runs of hpdl.train end to end with --device gpu (their ranks sharing the GPU).
GPU_E2E := tests/unit/test_train.py tests/unit/test_mpi_cli.py tests/unit/test_ps_cli.py \
	tests/unit/test_precision.py tests/unit/test_resume_cli.py
test-gpu:
	$(PY) -m pytest -q -m gpu -p no:cacheprovider tests/gpu
	HPDL_DEVICE=gpu $(MPI_ENV) $(PY) -m pytest -q -p no:cacheprovider $(GPU_E2E)

# Without a GPU: the gpu tests on tests/fakegpu's stand-in for CuPy, a check of the tests' own code
# between GPU runs (about half a minute). Skipped there, with the reason: what needs cuBLAS (fp16,
# TF32); everything without g++.
test-gpu-fake: $(VENV)/.installed
	PYTHONPATH=tests/fakegpu $(MPI_ENV) $(PY) -m pytest -q -p fakegpu_plugin -m gpu -p no:cacheprovider --timeout 60 tests/gpu

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0
	touch $@

bench: $(VENV)/.bench $(DATA)
	$(PY) -m benchmarks.accuracy
	$(PY) -m benchmarks.single_process
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.staleness
	$(PY) -m benchmarks.comm
	$(PY) -m benchmarks.large_batch
	$(PY) -m benchmarks.peers
	$(PY) -m benchmarks.plan
	PYTHONPATH=tests/fakegpu $(PY) -m benchmarks.launches
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) build *.egg-info
