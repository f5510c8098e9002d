# Tessera: `make demo` (install, start the local stack, train, query) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TESSERA_HOME ?= $(CURDIR)/.tessera

.PHONY: install demo test test-unit test-integration up down status lint bench bench-attention bench-train bench-serve bench-load bench-policy bench-weather bench-memory bench-transients bench-segmentation bench-peers clean

install: $(STAMP)

# torch first, pinned: a looser requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,all]"
	touch $@

demo: install
	$(PY) -m pipelines.demo

test: install
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not integration"

test-integration: install
	$(PY) -m pytest -m integration

up: install
	$(VENV)/bin/tessera up

down: install
	$(VENV)/bin/tessera down

status: install
	$(VENV)/bin/tessera status

lint: install
	$(VENV)/bin/ruff check shared pipelines services infra tests
	$(VENV)/bin/mypy

bench: bench-attention bench-train bench-serve bench-load bench-policy bench-weather bench-memory bench-transients bench-segmentation bench-peers

bench-attention: install
	$(PY) -m pipelines.benchmarks.attention
	$(PY) -m pipelines.benchmarks.attention_small

bench-train: install
	$(PY) -m pipelines.benchmarks.train_throughput

bench-serve: install
	$(PY) -m pipelines.benchmarks.serve_throughput

bench-load: install
	$(PY) -m pipelines.benchmarks.load

bench-policy: install
	$(PY) -m pipelines.benchmarks.robot_policy

bench-transients: install
	$(PY) -m pipelines.benchmarks.transients

bench-segmentation: install
	$(PY) -m pipelines.benchmarks.segmentation

bench-weather: install
	$(PY) -m pipelines.benchmarks.weather_rollout

bench-memory: install
	$(PY) -m pipelines.benchmarks.forecasting_memory

# Reference code from TESSERA_REFERENCE_ITRANSFORMER / TESSERA_REFERENCE_AUTOFORMER (git clones of
# thuml/iTransformer and thuml/Autoformer); without them only Tessera's models are timed.
bench-peers: install
	$(PY) -m pipelines.benchmarks.peers

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache
