# Two entry points on a fresh machine: `make train` (the main job) and `make test`.
# Both create .venv on first use with the CPU build of torch, then the project.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test lint docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train]"
	$(PY) -m lstmkit.backends.native  # build the C++ backend once (or say why it cannot)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# a character-level language model of Python's own documentation, then a sample of its text
train: $(VENV)/.installed
	$(PY) -m lstmkit train

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror src/lstmkit/backends/native/csrc/*.cpp src/lstmkit/backends/native/csrc/*.h

test: lint
	$(PY) -m pytest -q

# the benchmark tables of README.md and docs/ from the committed results (tests/test_render.py
# fails while one is stale)
docs: $(VENV)/.installed
	$(PY) -m lstmkit.bench.render
