# Two entry points for a fresh machine: `make demo` and `make test` (both create .venv and install first).
# The CPU install pins torch 2.14.1 / torchvision 0.29.1 (CUDA builds that also run on CPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_SHARDS := demo/shards
TEST_JOBS ?= 2

.PHONY: install demo demo-compare test test-all lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing torch, DeepSpeed, timm, webdataset, MLflow into $(VENV) (a few minutes)"
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[dev]"
	DS_ACCELERATOR=cpu $(PY) -m largessl.distributed.ops
	touch $@

# Shards from the bundled images, a few hundred MAE steps of ViT-Tiny on CPU through DeepSpeed, k-NN.
demo: install
	rm -rf $(DEMO_SHARDS) runs/demo
	$(PY) -m data_tools imagefolder demo/imagenette-mini/train $(DEMO_SHARDS) --split train --samples-per-shard 128
	$(PY) -m data_tools imagefolder demo/imagenette-mini/val $(DEMO_SHARDS) --split val --samples-per-shard 128
	$(VENV)/bin/largessl pretrain --config debug/mae_vit_tiny run.name=demo
	$(VENV)/bin/largessl eval knn --checkpoint runs/demo --train $(DEMO_SHARDS) --val $(DEMO_SHARDS) --baseline
	@echo ""
	@echo "run directory: runs/demo (config.yaml, checkpoints/, metrics.jsonl, eval/)"
	@echo "MLflow UI:     $(abspath $(VENV))/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db  (then open http://127.0.0.1:5000)"

# After `make demo`: two more runs beside it (MAE at mask ratio 0.5, DINO), then the comparison of all three
# (docs/compare-demo.png in the README was made this way). About 10 minutes on 2 cores.
demo-compare: install
	test -f runs/demo/config.yaml || { echo "run 'make demo' first"; exit 2; }
	$(VENV)/bin/largessl pretrain --config debug/mae_vit_tiny run.name=demo-mask50 objective.mask_ratio=0.5 eval.knn_every=100
	$(VENV)/bin/largessl pretrain --config debug/dino_vit_tiny run.name=demo-dino trainer.max_steps=100 eval.knn_every=50
	$(VENV)/bin/largessl compare --experiment largessl-debug --runs demo demo-mask50 demo-dino --plot runs/compare.png \
		--csv runs/compare.csv
	$(VENV)/bin/largessl compare --experiment largessl-debug --runs demo demo-mask50 demo-dino --plot runs/compare.html \
		> /dev/null
	@echo "picture: runs/compare.png; page with the tables: runs/compare.html"

# TEST_JOBS test processes (pytest-xdist); each test file's tests stay in one of them, so its fixtures run once.
test: install
	$(PY) -m pytest -q --durations=25 -n $(TEST_JOBS) --dist loadfile

test-all: install
	$(PY) -m pytest -q --runslow --durations=25 -n $(TEST_JOBS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check largessl data_tools tests
