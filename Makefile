# The two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.toml
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test lint typecheck unit bench clean lock

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "jobfeed needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)

# Runtime only (make run); dev tools on top for make test. constraints.txt pins everything.
$(VENV)/.installed-run: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e .
	@touch $@

# The bench extra comes with the dev tools: mypy checks bench/ against the same nats-py,
# redis and matplotlib that make bench runs.
# The Python client (clients/python) is its own package; make test installs it editable with
# its CLI extra, and lints, type-checks and tests it with the server.
$(VENV)/.installed-dev: $(VENV)/.installed-run clients/python/pyproject.toml
	$(PIP) install -c constraints.txt -e '.[dev,bench]'
	$(PIP) install -c constraints.txt -e 'clients/python[cli]'
	@touch $@

run: $(VENV)/.installed-run
	$(BIN)/jobfeed migrate --config $(CONFIG)
	$(BIN)/jobfeed serve --config $(CONFIG)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench

# Re-pin after changing dependencies: resolve fresh, then record exact versions.
lock:
	rm -rf /tmp/jobfeed-lock && $(PYTHON) -m venv /tmp/jobfeed-lock
	/tmp/jobfeed-lock/bin/pip install -q '.[dev,bench]' 'clients/python[cli]'
	/tmp/jobfeed-lock/bin/pip freeze --exclude jobfeed --exclude jobfeed-client > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
