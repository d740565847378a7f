# The README's two commands: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel pinned: an unpinned torch pulls gigabytes of CUDA packages. Override on GPU hosts.
TORCH ?= torch==2.13.0
# Every other package: pinned with hashes (requirements/lock.sh regenerates the locks from pyproject.toml).
LOCK ?= requirements/dev.txt
UV_VERSION ?= 0.13.9
MODEL ?= artifacts/model.onnx
PYTEST_ARGS ?=
# The peer servers of benchmarks/peers: their own venv, never needed by run or test.
PEERS_VENV ?= .venv-peers
BENCH := artifacts/bench/resnet50-random

.PHONY: run test test-fast lint docs build venv bench bench-models peers-venv bench-peers bench-slo docker-test gpu-wheels gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	@echo "==> creating $(VENV) from $(LOCK) (hash-checked pins) + $(TORCH)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --require-hashes -r $(LOCK)
	@# torch is not in the lock (CPU or CUDA build is the host's choice); its dependencies are, so pip
	@# adds torch alone. Here pip finds the local CPU wheel through its find-links configuration.
	$(BIN)/python -m pip install --progress-bar off "$(TORCH)"
	$(BIN)/uv pip install --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $@

build: venv
	$(BIN)/python -m model build --out $(MODEL)

run: build
	@echo "==> serving $(MODEL) on port $${RESNET_SERVE_PORT:-8000} (page at /, API docs at /docs)"
	RESNET_SERVE_MODEL_PATH=$(MODEL) $(BIN)/python -m app

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/yamllint --strict .

# The docs site (mkdocs.yml) into artifacts/site/: --strict, so a broken link or a page missing
# from the navigation fails the build, and with it `make test`.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The minute-by-minute command: tests/unit only (no server, no subprocess), no lint, no docs.
test-fast: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: build
	$(BIN)/python -m benchmarks

# 224x224, 1000-class artifacts for the benchmarks: random weights (speed does not depend on them).
bench-models: $(BENCH)-fp32.onnx $(BENCH)-int8.onnx

$(BENCH)-init.pth: | venv
	mkdir -p $(@D)
	$(BIN)/python -c "import torch; from model.resnet import resnet50; torch.save(resnet50().state_dict(), '$@')"

$(BENCH)-fp32.onnx: $(BENCH)-init.pth
	$(BIN)/python -m model export $< --out $@

$(BENCH)-int8.onnx: $(BENCH)-init.pth
	$(BIN)/python -m model export $< --precision int8 --calib-data digits --out $@

peers-venv: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --upgrade --progress-bar on pip
	$(PEERS_VENV)/bin/python -m pip install --progress-bar on -r $<
	@touch $@

bench-peers: venv peers-venv bench-models
	PYTHONPATH=. $(BIN)/python -m benchmarks.peers

# Open loop: capacity under a p99 bound, ours beside the script and LitServe (benchmarks/slo.py).
bench-slo: build peers-venv $(BENCH)-fp32.onnx
	PYTHONPATH=. $(BIN)/python -m benchmarks.slo --overload --with-target

docker-test:
	bash docker/test.sh

# The GPU proof (docs/gpu-check.md). gpu-wheels, here: the wheels a GPU machine with no registry
# lacks, into .whl/. gpu-check, there: installs them, runs the gpu tests and benchmarks.gpu.
gpu-wheels:
	PYTHON=$(PYTHON) bash benchmarks/gpu/wheels.sh

gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu/check.sh

clean:
	rm -rf $(VENV) $(PEERS_VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
