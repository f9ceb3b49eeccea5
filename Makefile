# nbdweb: `make run` brings the whole stack up in the foreground; `make test` runs the suite.

# Debian's interpreter, so that python3-libnbd's `nbd` module is importable from the venv.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: help venv venv-dev run test lint format check bench bench-deps bench-scale clean

help:
	@echo "make run     - install into $(VENV), migrate, start web, Celery worker and beat, nbdworker (foreground)"
	@echo "make test    - install dev requirements into $(VENV) and run the whole suite"
	@echo "make lint    - ruff check and ruff format --check"
	@echo "make format  - ruff format and ruff check --fix"
	@echo "make bench   - nbdworker vs nbdkit benchmark (see bench/README.md)"
	@echo "make bench-scale - one control plane, several nbdworker nodes (bench/scale.py)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"' \
	  || { echo "nbdweb needs Python >= 3.11 (Debian 12: apt-get install python3 python3-venv)"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 \
	  || { echo "python3-venv is missing: apt-get install python3-venv"; exit 1; }
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run pip only when a requirements file changed.
$(VENV)/.installed: $(BIN)/python requirements.txt
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $@

# The `nbdweb` command-line client, editable: $(BIN)/nbdweb runs this checkout's nbdweb_cli.
$(VENV)/.installed-cli: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

venv: $(VENV)/.installed $(VENV)/.installed-cli
venv-dev: $(VENV)/.installed-dev $(VENV)/.installed-cli

run: venv
	$(BIN)/python scripts/runstack.py

test: venv-dev
	PATH="$(CURDIR)/$(BIN):/usr/bin:$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The benchmark's clients and the server it compares against, from Debian's packages.
BENCH_PACKAGES = nbdkit:nbdkit nbdcopy:libnbd-bin fio:fio gcc:gcc mkfs.xfs:xfsprogs
bench-deps:
	@missing=""; for pair in $(BENCH_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing="$$missing python3-libnbd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "bench needs:$$missing (apt-get install$$missing)"; exit 1; fi; fi

# Every filesystem at hand (BENCH_FS="local tmpfs xfs btrfs"), 3 interleaved rounds each unless
# BENCH_ARGS says otherwise; the tables go to BENCH_OUT (bench/README.md).
bench: venv-dev bench-deps
	bench/filesystems.sh $(BIN)/python $(BENCH_ARGS)

# Issue 19's scale figures at a size that fits 2 cores; a scratch database on DATABASE_URL's
# server (default postgres://postgres@127.0.0.1:5432). Other sizes: BENCH_SCALE_ARGS.
BENCH_SCALE_ARGS ?= --nodes 4 --exports 250
bench-scale: venv-dev
	$(BIN)/python bench/scale.py $(BENCH_SCALE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
