# One command each: `make demo` (set up + run the demo), `make test` (set up + run the tests).
# `make test-fast`: the unit tests only (no Flower processes, no long runs; under a minute), for the edit loop.
# The virtual environment is created on first use. torch is installed FIRST and pinned, so that no
# dependency pulls a multi-GB CUDA build on a CPU machine; GPU users: see README "GPU".
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
BIN    := $(VENV)/bin
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0
export FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE=16777216

.PHONY: setup compile demo demo-local test test-fast lint bench clean

$(BIN)/brainjepa: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/brainjepa

setup: $(BIN)/brainjepa

demo: setup
	$(BIN)/brainjepa-server simulate --sites 3 --subjects 150 --rounds 20 --local-steps 100 \
		--run-config n-rois=50 --run-config n-frames=64 --run-config batch-size=16
	$(BIN)/brainjepa synth --out runs/federated/new_sites --sites 5 --only site_d --only site_e --subjects 100 \
		--rois 50 --duration 300 --split 0 0 1 --no-progress
	$(BIN)/brainjepa evaluate --protocol configs/protocols/demo.yaml --out-dir runs/demo-eval \
		--checkpoint "$$(ls -td runs/federated/*-run*/ | head -1)checkpoint.pt"

demo-local: setup
	$(BIN)/brainjepa demo

# Two pytest workers (pytest-xdist): the Flower tests mostly wait on their processes, so two run side by side.
# One torch / OpenMP thread per process (OMP_NUM_THREADS=1): two workers with two threads each on 2 cores spin
# against each other (the unit tests took 1.7x the CPU time). `--dist loadscope`: the tests sharing a
# module-scoped fixture run on one worker (tests/conftest.py), so it is built once.
# `compile`: the project's bytecode written once (`__pycache__/`, git-ignored). Where PYTHONDONTWRITEBYTECODE is
# set (as on some CI machines), every process would otherwise compile the modules it imports from source again,
# and the tests start a few hundred (each Flower message runs in a fresh process): up to ~0.2 CPU-s each.
compile: setup
	$(BIN)/python -m compileall -q brainjepa client server sites scripts tests

test: compile
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

test-fast: compile
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder -m "not slow and not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/brainjepa bench --size tiny --size base --batch 1 --steps 2

clean:
	rm -rf runs data/demo
