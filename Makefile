# pgbusd: every target installs what it needs into .venv on a new machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The daemon that `make run` starts: the local PostgreSQL, a socket under the checkout.
DSN     ?= postgresql://postgres@127.0.0.1:5432/postgres
CHANNEL ?= forge_changes
SOCKET  ?= $(CURDIR)/.run/pgbusd.sock

# The Rust client (client/rust) builds against the crates Debian ships, not crates.io.
CARGO     ?= $(shell command -v cargo 2>/dev/null || ls $$HOME/.cargo/bin/cargo 2>/dev/null)
RUST_DEBS := librust-tokio-dev librust-serde-dev librust-serde-derive-dev librust-rmp-serde-dev \
             librust-serde-json-dev librust-log-dev

.PHONY: install run test test-rust build-rust rust-deps test-systemd lint bench clean demo soak

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	touch $@

install: $(STAMP) rust-deps

# Debian's crates for the Rust client: installed where we are root, else said in one line.
# PGBUS_REQUIRE_RUST=1 (CI) makes anything missing an error.
rust-deps:
	@missing=$$(for p in $(RUST_DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
		|| { echo "rust client: could not install $$missing"; [ -z "$$PGBUS_REQUIRE_RUST" ]; }; \
	else \
		echo "rust client: missing Debian packages (as root: apt-get install $$missing)"; \
		[ -z "$$PGBUS_REQUIRE_RUST" ]; \
	fi

run: $(STAMP)
	@mkdir -p $(dir $(SOCKET))
	@echo "pgbusd: socket $(SOCKET); in another shell: export PGBUSD_SOCKET=$(SOCKET)"
	$(BIN)/pgbusd --dsn '$(DSN)' --channel $(CHANNEL) --socket $(SOCKET)

# Both clients: pytest (the Python client, the daemon, both clients' conformance vectors), then
# cargo test for the Rust client, whose build runs meanwhile at a low priority (pytest mostly
# waits on sockets). Either failing fails the target; both run.
test: $(STAMP)
	@mkdir -p .run; status=0; \
	nice -n 19 $(MAKE) --no-print-directory build-rust >.run/build-rust.log 2>&1 & build=$$!; \
	$(BIN)/pytest || status=$$?; \
	wait $$build || cat .run/build-rust.log; \
	$(MAKE) --no-print-directory test-rust || status=$$?; exit $$status

# The Rust client's tests, built (not run); quiet when cargo or the crates are missing.
build-rust:
	@if [ -n "$(CARGO)" ] && ls /usr/share/cargo/registry 2>/dev/null | grep -q '^rmp-serde-'; then \
		cd client/rust && $(CARGO) test --quiet --tests --no-run; \
	fi

# The Rust client's tests (its conformance vectors, and the tests against the real daemon from
# .venv). Without cargo or Debian's crates it says so in one line and passes, unless
# PGBUS_REQUIRE_RUST=1.
test-rust: $(STAMP)
	@if [ -z "$(CARGO)" ]; then \
		echo "rust client: cargo is missing; its tests did not run"; [ -z "$$PGBUS_REQUIRE_RUST" ]; \
	elif [ ! -d /usr/share/cargo/registry ] || ! ls /usr/share/cargo/registry | grep -q '^rmp-serde-'; then \
		echo "rust client: Debian's crates are missing (make rust-deps as root); its tests did not run"; \
		[ -z "$$PGBUS_REQUIRE_RUST" ]; \
	else \
		cd client/rust && $(CARGO) test --quiet --tests; \
	fi

# Only the tests under a live systemd, booted in private namespaces on an overlay of / (needs
# root; docs/systemd.md, "Proven under a live systemd"). `make test` runs them too.
test-systemd: $(STAMP)
	$(BIN)/pytest -m systemd_lab

# The daemon against the local PostgreSQL (DSN above), pgbusctl listen, a few NOTIFYs, a forced
# reconnect; scripts/demo.py stops everything it started, also on failure or Ctrl-C.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py --dsn '$(DSN)' --socket $(CURDIR)/.run/demo.sock

# The nemesis soak (tests/soak/, docs/testing.md): seeded faults against a daemon (MODE=single),
# a fleet (MODE=fleet) or both at once, a checker over every client's history; exits 1 on a
# violation. SOAK_PYTHON=/other/checkout/.venv/bin/python runs that checkout's daemons and clients.
SEED      ?= 1
DURATION  ?= 120
MODE      ?= both
SOAK_ARGS ?=

soak: $(STAMP)
	SOAK_PYTHON=$${SOAK_PYTHON:-$(CURDIR)/$(BIN)/python} $(BIN)/python -m tests.soak \
		--seed $(SEED) --duration $(DURATION) --mode $(MODE) --out .run/soak $(SOAK_ARGS)

# The benchmark suite (bench/, docs/benchmarks.md): its own daemons, workers and PostgreSQL load.
# `make bench BENCH_ARGS=--quick` for a smoke run; every option is also a PGBUS_BENCH_* variable.
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS  ?=

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

# The rust section (the Rust client beside the others) runs where cargo is; PGBUS_BENCH_RUST=
# leaves it out.
PGBUS_BENCH_RUST ?= $(if $(CARGO),1,)

bench: $(BENCH_STAMP)
	PGBUS_BENCH_RUST=$(PGBUS_BENCH_RUST) $(BIN)/python -m bench $(BENCH_ARGS)

# ruff, mypy --strict, the import rules of pyproject.toml ([tool.importlinter]: the daemon's
# layers, no cycles, the fleet a plug-in) and the shape of the code (scripts/lint_shape.py).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/lint_shape.py

clean:
	rm -rf $(VENV) .run .mypy_cache .pytest_cache .ruff_cache .hypothesis client/rust/target
