"""The daemon's command line: validation at the edge, environment variables, secrets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import msgspec
import pytest

import pgbus
from pgbusd.config import MAX_SECONDS, Config, ConfigError, redact
from pgbusd.ops.status import Status
from tests.conftest import (
    DSN,
    FAST,
    Daemon,
    DaemonFactory,
    attached,
    notify,
    unique_channel,
    wait_until,
)

pytestmark = pytest.mark.postgres


def run_pgbusd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgbusd", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "why"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("a" * 64, "64 bytes", id="64-ascii"),
        pytest.param("é" * 32, "64 bytes", id="32-e-acute"),
    ],
)
def test_invalid_channel_name_is_refused_at_startup_naming_it(
    workdir: Path, name: str, why: str
) -> None:
    result = run_pgbusd("--socket", str(workdir / "s.sock"), "--channel", "ok", "--channel", name)
    assert result.returncode == 2
    assert "--channel" in result.stderr
    assert why in result.stderr
    if name:
        assert repr(name) in result.stderr
    assert not (workdir / "s.sock").exists()


def test_channel_name_with_nul_is_refused() -> None:
    with pytest.raises(ConfigError, match="NUL") as err:
        Config(channel=("bad\x00name",))
    assert err.value.option == "channel"


@pytest.mark.parametrize("name", ["a" * 63, "é" * 31 + "x", "MiXeD_Case", 'x"; DROP TABLE t; --'])
def test_valid_channel_names_are_accepted_exactly(name: str) -> None:
    assert Config(channel=(name,)).channel == (name,)


def test_dsn_that_is_not_a_uri_is_refused(workdir: Path) -> None:
    result = run_pgbusd("--socket", str(workdir / "s.sock"), "--channel", "c", "--dsn", "notaurl")
    assert result.returncode == 2
    assert "--dsn" in result.stderr
    assert "postgresql://" in result.stderr


def test_dsn_with_impossible_settings_exits_with_a_clear_error(workdir: Path) -> None:
    result = run_pgbusd(
        "--socket", str(workdir / "s.sock"), "--channel", "c", "--log-format", "json",
        "--dsn", "postgresql://postgres:hunter2@127.0.0.1/test?sslmode=bogus",
    )  # fmt: skip
    assert result.returncode == 2
    assert "sslmode" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert not (workdir / "s.sock").exists()


def test_help_lists_options_with_their_environment_variables() -> None:
    result = run_pgbusd("--help")
    assert result.returncode == 0
    for env in ("PGBUSD_DSN", "PGBUSD_CHANNEL", "PGBUSD_SOCKET", "PGBUSD_HEALTH_INTERVAL"):
        assert env in result.stdout


async def test_every_option_is_also_an_environment_variable(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    a, b = unique_channel("env_a"), unique_channel("env_b")
    d = daemon_factory([], env={"PGBUSD_CHANNEL": f"{a} {b}", "PGBUSD_HEALTH_INTERVAL": "0.7"})
    st = await d.wait_generation(1)
    assert sorted(st.channels) == sorted([a, b])
    async with attached(d) as bus:
        sub = await bus.subscribe(b)
        await notify(pg, b, "via-env")
        assert await asyncio.wait_for(sub.recv(), 10) == "via-env"


async def test_client_finds_the_socket_through_pgbusd_socket(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGBUSD_SOCKET", daemon.socket)
    assert pgbus.default_socket_path() == daemon.socket
    async with pgbus.connect() as bus:
        assert sorted(bus.channels()) == sorted(daemon.channels)


async def test_password_never_appears_in_logs_or_status(daemon_factory: DaemonFactory) -> None:
    secret = "s3cr3t-Pa55word"
    d = daemon_factory(dsn=f"postgresql://postgres:{secret}@127.0.0.1:1/test")
    await d.wait_serving()
    st = await wait_until(
        lambda: _status_with_error(d), what="the connect failure to show in status"
    )
    text = msgspec.json.encode(st).decode()
    assert secret not in text
    assert "postgres:***@127.0.0.1:1/test" in text
    log = d.log()
    assert "postgres unavailable" in log
    assert secret not in log
    d.terminate()
    assert secret not in d.log()


async def _status_with_error(d: Daemon) -> Status | None:
    st = await d.status()
    return st if st and st.postgres.last_error else None


def test_redact_masks_uri_and_keyword_passwords() -> None:
    assert redact("postgresql://u:pw@h/db", []) == "postgresql://u:***@h/db"
    assert redact("host=h password='a b' user=u", []) == "host=h password=*** user=u"
    assert redact("error: bad token xyzzy", ["xyzzy"]) == "error: bad token ***"


def test_fast_intervals_are_options() -> None:
    # The suite depends on these options existing; keep them in sync with the fixtures.
    result = run_pgbusd(*FAST, "--help")
    assert result.returncode == 0


def test_log_format_and_level_options(workdir: Path) -> None:
    args = ["--socket", str(workdir / "s.sock"), "--channel", "c", "--dsn", "postgresql://x@h/d",
            "--channel", "a" * 64]  # fmt: skip
    # A bad channel exits before logging; use a bad --dsn scheme check instead for both formats.
    assert run_pgbusd(*args).returncode == 2
    result = run_pgbusd("--socket", str(workdir / "s.sock"), "--log-format", "json",
                        "--dsn", "postgresql://postgres@127.0.0.1/test?sslmode=bogus")  # fmt: skip
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"event", "level", "timestamp"} <= set(lines[0])
    result = run_pgbusd("--socket", str(workdir / "s.sock"), "--log-format", "console",
                        "--dsn", "postgresql://postgres@127.0.0.1/test?sslmode=bogus")  # fmt: skip
    assert not result.stderr.lstrip().startswith("{")
    assert "serving" in result.stderr
    result = run_pgbusd("--socket", str(workdir / "s.sock"), "--log-format", "json",
                        "--log-level", "error",
                        "--dsn", "postgresql://postgres@127.0.0.1/test?sslmode=bogus")  # fmt: skip
    levels = {json.loads(line)["level"] for line in result.stderr.splitlines()}
    assert levels == {"error"}


#: Every option that takes a number of seconds or a fraction (every float field of Config).
FLOAT_OPTIONS = [f.name for f in fields(Config) if typing.get_type_hints(Config)[f.name] is float]


def test_the_float_options_are_the_ones_expected() -> None:
    # So that the parametrisation below cannot silently shrink.
    assert len(FLOAT_OPTIONS) >= 8
    assert {"health_interval", "health_timeout", "handshake_timeout", "queue_warn"} <= set(
        FLOAT_OPTIONS
    )


@pytest.mark.parametrize("value", ["nan", "inf", "1e308"])
@pytest.mark.parametrize("option", FLOAT_OPTIONS)
def test_float_option_that_is_not_a_usable_number_exits_2_naming_it(
    workdir: Path, option: str, value: str
) -> None:
    flag = "--" + option.replace("_", "-")
    # Unfixed, the daemon runs (and never connects, or takes no client): the timeout ends it.
    result = run_pgbusd(
        "--socket", str(workdir / "s.sock"), "--channel", "c",
        "--dsn", "postgresql://postgres@127.0.0.1:1/test", flag, value, timeout=10,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr
    assert not (workdir / "s.sock").exists()


def test_float_option_from_the_environment_is_checked_too(workdir: Path) -> None:
    result = run_pgbusd(
        "--socket", str(workdir / "s.sock"), "--channel", "c",
        env={"PGBUSD_HEALTH_TIMEOUT": "nan"}, timeout=10,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--health-timeout" in result.stderr


@pytest.mark.parametrize("option", [o for o in FLOAT_OPTIONS if o != "queue_warn"])
def test_time_options_are_bounded_at_a_day(option: str) -> None:
    longest: dict[str, Any] = {option: MAX_SECONDS}
    too_long: dict[str, Any] = {option: MAX_SECONDS + 1}
    assert getattr(Config(**longest), option) == MAX_SECONDS
    with pytest.raises(ConfigError, match="at most 86400") as err:
        Config(**too_long)
    assert err.value.option == option


def test_max_clients_is_bounded(workdir: Path) -> None:
    result = run_pgbusd(
        "--socket", str(workdir / "s.sock"), "--channel", "c", "--max-clients", str(1 << 40),
        timeout=10,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--max-clients" in result.stderr


def _signal_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _start_and_hup_while_starting(socket: str) -> tuple[subprocess.Popen[str], bool]:
    """Start a daemon (SIGHUP at its default, whatever this process does with it) and send it
    SIGHUP in the window between the command's start and the server's own handler, seen in
    /proc (SIGHUP ignored, not yet caught). Whether it was sent in that window."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgbusd", "--dsn", DSN, "--channel", "c", "--socket", socket],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )  # fmt: skip
    hup = 1 << (signal.SIGHUP - 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _signal_mask(proc.pid, "SigCgt") & hup:
                return proc, False  # the server's handler: past the window
            if _signal_mask(proc.pid, "SigIgn") & hup:
                proc.send_signal(signal.SIGHUP)
                return proc, True
        except OSError:
            pass
        time.sleep(0.0005)
    return proc, False


async def test_a_sighup_while_the_daemon_starts_is_ignored_not_fatal(workdir: Path) -> None:
    """kill -HUP of a daemon still starting (before it can reload): it starts and serves."""
    socket = str(workdir / "d.sock")
    proc, sent = _start_and_hup_while_starting(socket)
    try:
        assert sent, "SIGHUP was never ignored before the server's handler took it"
        await wait_until(
            lambda: proc.poll() is None and Path(socket).exists(), 20, what="the daemon serving"
        )
        async with pgbus.connect(socket) as bus:
            assert bus.channels() == ["c"]
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        proc.wait(10)
