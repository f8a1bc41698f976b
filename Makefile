# The two commands of README.md; each installs what it needs first (scripts/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	@# CI (root, CI=true): Debian's SLURM for the local-cluster test (~7-25 s); it skips elsewhere
	if [ "$$CI" = true ] && [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends slurmctld slurmd slurm-client munge; fi
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
