# The two commands of README.md; each installs what it needs first (scripts/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
