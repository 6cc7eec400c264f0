# Quick start: `make demo` trains the embedded shapes model with TreeGRPO; `make test` runs the tests.
# Both create .venv and install everything on first use (CPU-only torch, pinned in requirements.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test demo bench bench-quick bench-micro clean

DEMO_DIR ?= runs/demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The main job: TreeGRPO on the embedded shapes model (a fresh run each time), then the results
# and the run's HTML report (its path is printed last).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/treegrpo train --output-dir $(DEMO_DIR)
	$(BIN)/treegrpo report $(DEMO_DIR)

# Every method under an equal 120 s training budget, 3 seeds (about 35-45 minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/treegrpo bench --out runs/bench

# TreeGRPO vs DanceGRPO, one seed, 40 s each (a few minutes).
bench-quick: $(STAMP)
	$(BIN)/treegrpo bench --quick --out runs/bench_quick

# Batched tree sampler and training step vs one model call per node (the released code's way).
bench-micro: $(STAMP)
	$(BIN)/python -m treegrpo.bench_micro --out runs/bench_micro

clean:
	rm -rf $(VENV) runs .pytest_cache
