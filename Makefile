# The two commands of a fresh machine:  make run  |  make test
# `make run` installs only what serving needs (`pip install -e .`: no torch, no dev tools);
# `make test` installs the dev and export extras on top. Each has its own stamp, so `make test`
# after `make run` upgrades the same .venv, and `make run` after `make test` installs nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
RUN_STAMP := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck system-deps clean

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

# Debian packages the tests drive as real peers: Chromium for the web page, nginx to check the load
# balancer's config. Installed once when missing (root on Debian); elsewhere install them yourself.
SYSTEM_DEPS := /usr/bin/chromium:chromium /usr/sbin/nginx:nginx-light
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do [ -x "$${dep%%:*}" ] || missing="$$missing $${dep#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (install them to run every test)"; fi; \
	fi

test: lint typecheck system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
