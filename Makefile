# The README's two commands: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel pinned: an unpinned torch pulls gigabytes of CUDA packages. Override on GPU hosts.
TORCH ?= torch==2.13.0
EXTRAS ?= cpu,train,dev,bench
MODEL ?= artifacts/model.onnx
PYTEST_ARGS ?=

.PHONY: run test lint build venv bench docker-test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) and installing resnet-serve[$(EXTRAS)] (first run: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --progress-bar on pip
	$(BIN)/python -m pip install --progress-bar on "$(TORCH)"
	$(BIN)/python -m pip install --progress-bar on -e ".[$(EXTRAS)]"
	@touch $@

build: venv
	$(BIN)/python -m model build --out $(MODEL)

run: build
	@echo "==> serving $(MODEL) on port $${RESNET_SERVE_PORT:-8000} (API docs at /docs)"
	RESNET_SERVE_MODEL_PATH=$(MODEL) $(BIN)/python -m app

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: build
	$(BIN)/python -m benchmarks

docker-test:
	bash docker/test.sh

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
