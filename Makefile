# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= cpu,test,bench
BIN    := $(VENV)/bin

.PHONY: install system-deps run test test-unit lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m cluster.venv_repair
	@touch $@

# Builds the tiny models if missing, starts Ray + Serve + the engines on http://127.0.0.1:8000, stays until Ctrl-C.
run: install
	$(BIN)/anker up

# Debian packages the tests use: PostgreSQL (a throwaway server on loopback for the ledger tests), chromium
# (headless, driven by Playwright, for the dashboard tests; browsers are never downloaded), Prometheus (a
# throwaway server that scrapes the test stack; promtool checks the alert rules) and wrk (the control-plane
# benchmark's native load client).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -x /usr/bin/promtool || missing="$$missing prometheus"; \
	test -x /usr/bin/wrk || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Lint and types, then the tests: unit tests (seconds) and the real stack (anker up on free ports, tests, anker down).
test: install system-deps lint
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m "not stack"

lint: install
	$(BIN)/ruff check config cluster deployments autoscaling observability testkit tests loadtests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .anker *.egg-info .pytest_cache .mypy_cache .ruff_cache
