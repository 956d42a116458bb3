# pgbusd: every target installs what it needs into .venv on a new machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The daemon that `make run` starts: the local PostgreSQL, a socket under the checkout.
DSN     ?= postgresql://postgres@127.0.0.1:5432/postgres
CHANNEL ?= forge_changes
SOCKET  ?= $(CURDIR)/.run/pgbusd.sock

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	@mkdir -p $(dir $(SOCKET))
	@echo "pgbusd: socket $(SOCKET); in another shell: export PGBUSD_SOCKET=$(SOCKET)"
	$(BIN)/pgbusd --dsn '$(DSN)' --channel $(CHANNEL) --socket $(SOCKET)

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .run .mypy_cache .pytest_cache .ruff_cache .hypothesis
