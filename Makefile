# `make demo` and `make test` bootstrap .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.soho-installed
DEMO   ?= demo-out
# Under CPU contention the default OpenMP spin-wait collapses throughput (~10x).
export OMP_WAIT_POLICY ?= PASSIVE
export WANDB_MODE ?= offline

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/soho data synth --out $(DEMO)/synthetic --num-images 2000 --seed 0
	$(VENV)/bin/soho data shard --source synthetic --input $(DEMO)/synthetic --out $(DEMO)/shards
	$(VENV)/bin/soho pretrain --config demo --data $(DEMO)/shards --out $(DEMO)/pretrain
	@echo "demo outputs: $(DEMO)/synthetic (dataset), $(DEMO)/shards (webdataset shards), $(DEMO)/pretrain (checkpoints/, metrics.jsonl, config.json)"

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) .pytest_cache
