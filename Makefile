# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt install.sh
	bash install.sh $(VENV)

demo: install  ## install, then run the main job on the embedded synthetic data
	$(PY) -m launcher.demo

test: install  ## the whole test suite, CPU only
	$(PY) -m pytest tests/ -q

bench: install
	$(PY) bench/toe_overhead.py
