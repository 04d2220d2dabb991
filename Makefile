# The two commands of a fresh machine:  make run  |  make test
# `make run` installs only what serving needs (`pip install -e .`: no torch, no dev tools);
# `make test` installs the dev and export extras on top. Each has its own stamp, so `make test`
# after `make run` upgrades the same .venv, and `make run` after `make test` installs nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
RUN_STAMP := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) -U pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PIP) -e .
	touch $(RUN_STAMP)

# The full development install (dev + export); it includes the runtime, so it satisfies `run` too.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) -e ".[dev,export]"
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/carryover serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check service model_export tests bench
	$(VENV)/bin/ruff format --check service model_export tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
