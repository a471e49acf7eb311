# CHIAR-Former serving. Quick start: `make serve` (sets up, serves the default model on
# 127.0.0.1:8000) and `make test` (sets up, ruff + the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= checkpoints/chiar-small
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup test lint serve bench bench-model bench-server loadtest demo-checkpoints clean

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
	$(PY) -m model.bench --write BENCHMARKS.md

bench-server: setup
	$(PY) -m server.bench --write BENCHMARKS.md

loadtest: setup
	$(PY) -m loadtests.run --checkpoint $(CHECKPOINT)

demo-checkpoints: setup
	bash training/demo_checkpoints.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
