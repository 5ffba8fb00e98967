# robustexp — `make help` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-slow smoke bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install robustexp with its pinned dependencies (only what is missing)

run: $(STAMP)  ## install what is missing, then run the embedded default (python -m robustexp)
	$(PY) -m robustexp $(ARGS)

test: $(STAMP)  ## install what is missing, lint (ruff, pyproject.toml), run the default test suite (< 10 min on 2 CPU cores)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)  ## the slow tests only (engine vs reference accuracy, 224x224 fidelity)
	$(PY) -m pytest -q -m slow $(ARGS)

smoke: $(STAMP)  ## every job of every full paper recipe on synthetic images (debug=smoke), a status table (~10 min)
	$(PY) scripts/smoke.py $(ARGS)

bench: $(STAMP)  ## benchmarks -> bench/results/: corruption engine, certification, BN adaptation, runner overhead, the embedded default by phase (ARGS=--quick)
	$(PY) scripts/bench_corruptions.py $(ARGS)
	$(PY) scripts/bench_certify.py $(ARGS)
	$(PY) scripts/bench_adaptation.py $(ARGS)
	$(PY) scripts/bench_runner.py $(ARGS)
	$(PY) scripts/bench_default.py $(ARGS)

clean:  ## remove run outputs (not the venv)
	rm -rf outputs multirun
