# Quick start: `make demo` trains the embedded SD3 pipeline with TreeGRPO; `make test` runs the tests.
# Both create .venv and install everything on first use (CPU-only torch, pinned in requirements.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install browser test demo bench bench-quick bench-micro clean

DEMO_DIR ?= runs/demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Debian's chromium for the report's browser test (tests/test_report_browser.py). Skips when a
# chromium is on PATH; as root, one `apt-get update` then `apt-get install -y chromium`. Not root:
# a note (the browser test then skips; run `sudo make browser` once), unless CI=true, where a
# missing browser is an error, as it is in the test.
browser:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "make browser: $$(command -v chromium) is installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	elif [ "$$CI" = true ]; then \
		echo "make browser: no chromium and not root (CI=true): run as root, or install Debian's chromium first" >&2; \
		exit 1; \
	else \
		echo "make browser: no chromium and not root: the report's browser test will skip (install it with: sudo make browser)"; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m pytest

# The main job: TreeGRPO on the compositional world's embedded SD3 pipeline with its rule-based reward
# (a fresh run each time), then base vs trained held-out strict accuracy per template and the run's
# HTML report (its path is printed last).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/treegrpo train configs/compose_treegrpo.yaml --output-dir $(DEMO_DIR)
	$(BIN)/treegrpo report $(DEMO_DIR)

# Every method as docs/benchmarks.md section 21 measures it on the compositional world: each
# method's rollout and leaf rule, all trained with the demo's flow-matching objective and drift
# penalty (lr 1e-4, optim.kl_coef=0.1; the policy gradient does not learn on this world, section 8),
# 150 s of training each, 5 seeds, held-out evaluation every 6 iterations on 300 prompts x 2 seeds,
# plus TreeGRPO with k = 2 children per node (`treegrpo_k2`, section 23: level with MixGRPO, DanceGRPO's
# final in a quarter of its time) beside the paper's k = 3 (about 100 minutes on 2 cores).
# Each method's own objective instead: `treegrpo bench --out runs/bench`.
BENCH_COMPOSE := optim.objective=flow_matching optim.matching_guidance=false optim.lr=1e-4 optim.kl_coef=0.1 \
  optim.minibatches=1 optim.ema_decay=0.9 method.per_depth=false eval.num_seeds=2
bench: $(STAMP)
	$(BIN)/treegrpo bench --out runs/bench --seeds 0 1 2 3 4 --eval-every 6 \
	  --variant "treegrpo_k2@treegrpo:method.k=2" $(BENCH_COMPOSE) train.max_seconds=150

# TreeGRPO vs DanceGRPO in the same setting, one seed, 40 s each (a few minutes).
bench-quick: $(STAMP)
	$(BIN)/treegrpo bench --quick --out runs/bench_quick $(BENCH_COMPOSE)

# Batched tree sampler and training step vs one model call per node (the released code's way).
bench-micro: $(STAMP)
	$(BIN)/python -m treegrpo.bench_micro --out runs/bench_micro

clean:
	rm -rf $(VENV) runs .pytest_cache
