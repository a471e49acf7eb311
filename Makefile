# CHIAR-Former serving. Quick start: `make serve` (sets up, serves the default model on
# 127.0.0.1:8000) and `make test` (system tools if missing, sets up, ruff + the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# guidellm has a venv of its own: it pins click~=8.4, our lock has click 8.5 (requirements-guidellm.txt)
GUIDELLM_VENV ?= .venv-guidellm
CHECKPOINT ?= checkpoints/chiar-small
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup setup-guidellm bench-guidellm lock-guidellm system test test-random lint serve experiments bench bench-model bench-server bench-fairness bench-step bench-compile bench-kv bench-prefix bench-gpu loadtest loadtest-sweep loadtest-stress loadtest-flood dashboard lock demo-checkpoints reliability reliability-short clean
LOADTEST_ARGS ?=
# e.g. BENCH_SERVER_ARGS=--llamacpp adds llama.cpp's server to the peers (built once from the llama-cpp-python sdist)
# BENCH_SERVER_ARGS=--long-only runs only the long-context rows (1-2k-token prompts), --no-long skips them
BENCH_SERVER_ARGS ?=

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py requirements.txt requirements-dev.txt deploy/install.sh $(wildcard csrc/*.cpp csrc/*.h)
	bash deploy/install.sh --dev $(VENV)
	touch $@

setup-guidellm: $(GUIDELLM_VENV)/.installed

$(GUIDELLM_VENV)/.installed: requirements-guidellm.txt deploy/install.sh
	bash deploy/install.sh --tool guidellm $(GUIDELLM_VENV)
	touch $@

# Debian packages the tests run (prometheus, promtool, chromium, chromedriver): the script does
# nothing when they are on PATH, installs them as root, else stops with one line naming them.
system:
	@bash deploy/install-system.sh

lint: setup
	$(VENV)/bin/ruff check .

test: system setup setup-guidellm lint
	$(VENV)/bin/pytest -q

# Property tests with a fresh random seed and more examples (profile "random" in tests/conftest.py;
# `make test` runs them derandomized). A failure prints the seed: rerun with --hypothesis-seed=N.
test-random: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider --hypothesis-profile=random tests/model tests/training/test_listops.py tests/training/test_data.py

serve: setup
	$(PY) -m server --checkpoint $(CHECKPOINT) --host $(HOST) --port $(PORT)

bench: bench-model bench-server bench-fairness bench-step bench-kv bench-prefix bench-guidellm

bench-model: setup
	$(PY) -m bench.model --write BENCHMARKS.md

bench-server: setup
	$(PY) -m bench.server --write BENCHMARKS.md $(BENCH_SERVER_ARGS)

# guidellm (a load generator nobody here wrote) against our server: its TTFT/ITL/throughput beside ours
bench-guidellm: setup setup-guidellm
	$(PY) -m bench.guidellm --guidellm $(GUIDELLM_VENV)/bin/guidellm --write BENCHMARKS.md

bench-fairness: setup
	$(PY) -m bench.fairness --write BENCHMARKS.md

bench-step: setup
	$(PY) -m bench.step_profile --write BENCHMARKS.md

# torch.compile (inductor) vs eager aten vs the native kernels on the dense parts of a decode step
bench-compile: setup
	$(PY) -m bench.compile_probe --write BENCHMARKS.md

# Concurrent 2k-token sequences under one --kv-cache-mb, CHIAR vs baseline (real servers).
bench-kv: setup
	$(PY) -m bench.kv_capacity --write BENCHMARKS.md

# The prefix cache and preemption (real servers): chat TTFT with a cached 1,500-token system prompt, lm-eval
# multiple choice over shared contexts, cached tokens CHIAR vs baseline, a mixed load at 4x the KV budget.
bench-prefix: setup
	$(PY) -m bench.prefix --write BENCHMARKS.md

# GPU readiness: bf16 model tests, a --device cuda server smoke test, CUDA-event layer timings;
# without CUDA it says so in one line and runs the CPU parts.
bench-gpu: setup
	$(PY) -m bench.gpu --write BENCHMARKS.md

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

lock-guidellm: setup-guidellm
	$(GUIDELLM_VENV)/bin/python deploy/freeze_requirements.py --tool guidellm

# The paper-reproduction experiments (EXPERIMENTS.md); e.g. EXPERIMENT_ARGS="--size tiny --root /tmp/exp".
EXPERIMENT_ARGS ?= --size cpu --threads 2 --publish
experiments: setup
	$(PY) -m experiments.run_all $(EXPERIMENT_ARGS)

demo-checkpoints: setup
	bash training/demo_checkpoints.sh

# Fault probes against real servers and training runs; writes RELIABILITY.md (figures never typed by hand).
reliability: setup
	$(PY) -m reliability --checkpoint $(CHECKPOINT) --write RELIABILITY.md

reliability-short: setup
	$(PY) -m reliability --short --checkpoint $(CHECKPOINT) --write RELIABILITY.md

clean:
	rm -rf $(VENV) $(GUIDELLM_VENV) .pytest_cache .ruff_cache .hypothesis
