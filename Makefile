# CHIAR-Former serving. Quick start: `make serve` (sets up, serves the default model on
# 127.0.0.1:8000) and `make test` (sets up, ruff + the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= checkpoints/chiar-small
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup test lint serve bench bench-model bench-server loadtest loadtest-sweep loadtest-stress loadtest-flood dashboard lock demo-checkpoints clean
LOADTEST_ARGS ?=
# e.g. BENCH_SERVER_ARGS=--llamacpp adds llama.cpp's server to the peers (built once from the llama-cpp-python sdist)
BENCH_SERVER_ARGS ?=

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-dev.txt deploy/install.sh
	bash deploy/install.sh --dev $(VENV)
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest -q

serve: setup
	$(PY) -m server --checkpoint $(CHECKPOINT) --host $(HOST) --port $(PORT)

bench: bench-model bench-server

bench-model: setup
	$(PY) -m bench.model --write BENCHMARKS.md

bench-server: setup
	$(PY) -m bench.server --write BENCHMARKS.md $(BENCH_SERVER_ARGS)

loadtest: setup
	$(PY) -m loadtests.run --checkpoint $(CHECKPOINT) $(LOADTEST_ARGS)

loadtest-sweep: setup
	$(PY) -m loadtests.sweep --checkpoint checkpoints/chiar-small --checkpoint checkpoints/baseline-small --write BENCHMARKS.md

loadtest-stress: setup
	$(PY) -m loadtests.run --checkpoint $(CHECKPOINT) --scenario stress $(LOADTEST_ARGS)

loadtest-flood: setup
	$(PY) -m loadtests.run --checkpoint $(CHECKPOINT) --scenario mixed-flood $(LOADTEST_ARGS)

dashboard: setup
	$(PY) deploy/grafana/build_dashboard.py

lock: setup
	$(PY) deploy/freeze_requirements.py

demo-checkpoints: setup
	bash training/demo_checkpoints.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
