# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint bench
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-dali.txt install.sh pyproject.toml
	bash install.sh $(VENV)

demo: install  ## install, then run the main job (DeiT-Ti + ToE, DeepSpeed, CPU) on the embedded synthetic data
	$(PY) -m launcher.train --config configs/deit_tiny_toe_cpu.yaml

test: install lint  ## lint, type checks and the whole test suite, CPU only (what CI runs)
	$(PY) -m pytest tests/ -q --durations=25  # the slowest 25 at the end: the suite keeps under 35 min on 2 cores

test-fast: install  ## the tests not marked slow: a few minutes, for working
	$(PY) -m pytest tests/ -q -m "not slow"

lint: install  ## ruff (lint and format) and mypy, configured in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install  ## the benchmarks (tables + JSON in bench/results/)
	$(PY) bench/toe_overhead.py
	$(PY) bench/step_throughput.py
	$(PY) bench/data_throughput.py
	$(PY) bench/batch_transfer.py
	$(PY) bench/trilevel_attention.py
	$(PY) bench/trilevel_examples.py
