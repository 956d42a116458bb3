# pgbusd: every target installs what it needs into .venv on a new machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The daemon that `make run` starts: the local PostgreSQL, a socket under the checkout.
DSN     ?= postgresql://postgres@127.0.0.1:5432/postgres
CHANNEL ?= forge_changes
SOCKET  ?= $(CURDIR)/.run/pgbusd.sock

.PHONY: install run test test-systemd lint bench clean demo

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

# Only the tests under a live systemd, booted in private namespaces on an overlay of / (needs
# root; docs/systemd.md, "Proven under a live systemd"). `make test` runs them too.
test-systemd: $(STAMP)
	$(BIN)/pytest -m systemd_lab

# The daemon against the local PostgreSQL (DSN above), pgbusctl listen, a few NOTIFYs, a forced
# reconnect; scripts/demo.py stops everything it started, also on failure or Ctrl-C.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py --dsn '$(DSN)' --socket $(CURDIR)/.run/demo.sock

# The benchmark suite (bench/, docs/benchmarks.md): its own daemons, workers and PostgreSQL load.
# `make bench BENCH_ARGS=--quick` for a smoke run; every option is also a PGBUS_BENCH_* variable.
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS  ?=

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .run .mypy_cache .pytest_cache .ruff_cache .hypothesis
