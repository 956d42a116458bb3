"""The units of systemd/ under a live systemd (tests/support/systemd_lab.py): installed the way
the README and docs/systemd.md print it, then every promise they make, one test each.

One lab, installed by the docs' procedure, serves every test but the README's (which boots a
lab of its own); the ``lab`` fixture puts it back to the installed state before each test:
pgbusd.service running on the socket it binds, no drop-in, no socket unit, nothing failed.
Workers run inside the lab as ``forge``, a user in the pgbusd group (``outsider`` is not), and
notifications come from psql inside the lab, through the shared PostgreSQL's Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import ClientProcess, unique_channel
from tests.support import systemd_lab
from tests.support.systemd_lab import LAB_ENV, VENV, LabHome, SystemdLab

pytestmark = [pytest.mark.systemd_lab, pytest.mark.postgres, pytest.mark.root]

TESTS = Path(__file__).resolve().parent
README = systemd_lab.REPO / "README.md"
DOCS = systemd_lab.REPO / "docs" / "systemd.md"
#: Clients run in the lab from source: its users need no access to the checkout.
CLIENTPROC = (TESTS / "support" / "clientproc.py").read_text()
LAB_CLIENTS = (TESTS / "support" / "lab_clients.py").read_text()

#: The host's PostgreSQL socket directory inside the lab (read-only), and a private cluster's.
SHARED_PG = "/srv/pgsock"
PRIVATE_PG = "/srv/pgpriv"
SOCKET = "/run/pgbusd/pgbusd.sock"
#: The channels pgbusd.service relays in the lab (unique: other tests share the PostgreSQL).
CHANNELS = (unique_channel("laba"), unique_channel("labb"))
#: A worker's user, in the pgbusd group once the docs' procedure ran, and one that is not.
WORKER = "forge"
OUTSIDER = "outsider"
#: WatchdogSec= for the watchdog test (a drop-in): short, but the daemon pings at half of it
#: from its event loop, so a loaded machine needs a margin.
WATCHDOG_SEC = os.environ.get("PGBUSD_LAB_WATCHDOG_SEC", "3s")
#: pgbusd's STATUS= line once it listens, with no client attached.
CONNECTED_IDLE = "PostgreSQL connected, generation 1, 0 clients"
#: How long to wait for anything in the lab (generous: the machine may be loaded).
WAIT = 60.0


def shared_dsn(database: str) -> str:
    return f"postgresql://postgres@/{database}?host={SHARED_PG}"


# -- the procedures as printed -----------------------------------------------------------------


def venv_command(markdown: str, heading: str) -> str:
    """The section's commands that create the virtualenv, joined with ``&&``."""
    commands = [
        systemd_lab.strip_comment(line)
        for block in systemd_lab.shell_blocks(markdown, heading)
        for line in systemd_lab.logical_lines(block)
        if f"{VENV}/bin/pip" in line or "-m venv" in line
    ]
    assert commands, f"no virtualenv command under {heading}"
    return " && ".join(commands)


def edit_env(lab: SystemdLab, path: str, settings: dict[str, str]) -> None:
    """Edit an installed environment file the way a person would: uncomment or change each
    ``NAME=`` line named, or add it."""
    file = lab.path(path)
    text = file.read_text()
    for name, value in settings.items():
        text, found = re.subn(rf"^#?{name}=.*$", f"{name}={value}", text, count=1, flags=re.M)
        if not found:
            text += f"{name}={value}\n"
    file.write_text(text)


def run_procedure(
    lab: SystemdLab, blocks: list[str], edits: dict[str, dict[str, str]] | None = None
) -> None:
    """Run printed shell blocks in the lab, command by command, from its copy of the checkout.

    Three kinds of line are not run as printed: the virtualenv's (done before the lab booted,
    see :meth:`LabHome.build_venv`), ``editor FILE...`` and a line whose comment says to edit
    what it installed (``edits`` says what to change in which file), and ``journalctl -f``
    (it never ends; the tests read the journal instead).
    """
    pending = dict(edits or {})

    def edit() -> None:
        for path in [p for p in pending if lab.path(p).exists()]:
            edit_env(lab, path, pending.pop(path))

    for block in blocks:
        for line in systemd_lab.logical_lines(block):
            command = systemd_lab.strip_comment(line)
            if "-m venv" in command or command.startswith(f"{VENV}/bin/pip"):
                continue
            if command.startswith("editor "):
                edit()
                continue
            if command.startswith("journalctl") and " -f" in command:
                continue
            lab.sh(command, cwd=str(lab.home.checkout))
            if "edit it" in line:
                edit()
    assert not pending, f"the procedure never had these edited: {sorted(pending)}"


def install_as_the_docs_say(lab: SystemdLab) -> None:
    docs = DOCS.read_text()
    for user in (WORKER, OUTSIDER):
        lab.run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user)
    settings = {"PGBUSD_DSN": shared_dsn("postgres"), "PGBUSD_CHANNEL": f'"{" ".join(CHANNELS)}"'}
    run_procedure(
        lab, systemd_lab.shell_blocks(docs, "## Install"), {"/etc/pgbusd/pgbusd.env": settings}
    )
    run_procedure(lab, systemd_lab.shell_blocks(docs, "## Let a worker attach"))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab_home() -> Iterator[LabHome]:
    """The labs' directory, with the virtualenv built by the README's command."""
    reason = systemd_lab.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with LabHome() as home:
        home.build_venv(venv_command(README.read_text(), "## Running it under systemd"))
        yield home


@pytest.fixture(scope="session")
def installed(lab_home: LabHome) -> Iterator[SystemdLab]:
    """A lab with pgbusd installed by docs/systemd.md's procedure, shared by the tests."""
    private_pg = lab_home.directory("pgpriv", owner="postgres")
    binds = {SHARED_PG: Path("/run/postgresql"), PRIVATE_PG: private_pg}
    with lab_home.boot("docs", binds) as lab:
        install_as_the_docs_say(lab)
        yield lab


@pytest.fixture
def lab(installed: SystemdLab) -> SystemdLab:
    """The installed lab, back in its installed state: pgbusd.service running on the socket it
    binds, no drop-in, pgbusd.socket off, nothing failed."""
    socket = installed.show("pgbusd.socket", "ActiveState", "UnitFileState")
    if socket["ActiveState"] != "inactive" or socket["UnitFileState"] != "disabled":
        installed.systemctl("disable", "--now", "pgbusd.socket")
        installed.systemctl("stop", "pgbusd.service")
    if installed.path("/etc/systemd/system/pgbusd.service.d").exists():
        installed.remove("/etc/systemd/system/pgbusd.service.d")
        installed.systemctl("daemon-reload")
        installed.systemctl("restart", "pgbusd.service")
    installed.systemctl("reset-failed")
    installed.systemctl("start", "pgbusd.service")
    return installed


# -- helpers -----------------------------------------------------------------------------------


async def start_client(
    lab: SystemdLab, procs: list[ClientProcess], source: str, *args: str, user: str = WORKER
) -> ClientProcess:
    """A client (``source`` with ``args``) running in the lab as ``user``; stopped after the
    test (``client_processes``)."""
    proc = await asyncio.create_subprocess_exec(
        *lab.python(source, *args, user=user), stdout=asyncio.subprocess.PIPE, env=dict(LAB_ENV)
    )
    client = ClientProcess(proc)
    procs.append(client)
    return client


async def subscriber(
    lab: SystemdLab, procs: list[ClientProcess], socket: str, channel: str, user: str = WORKER
) -> tuple[ClientProcess, int]:
    """tests/support/clientproc.py as a worker in the lab, subscribed to ``channel`` once the daemon
    listens: the client and its generation (a NOTIFY sent now reaches it)."""
    client = await start_client(lab, procs, CLIENTPROC, socket, channel, user=user)
    generation: int = (await client.expect("ready", WAIT))["generation"]
    if generation == 0:  # attached before the daemon reached PostgreSQL
        generation = (await client.expect("generation", WAIT))["generation"]
    return client, generation


def psql_notify(lab: SystemdLab, channel: str, payload: str, database: str = "postgres") -> None:
    """NOTIFY from psql in the lab, through the shared PostgreSQL's socket."""
    lab.run(
        "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", SHARED_PG, "-U", "postgres",
        "-d", database, "-c", f"SELECT pg_notify('{channel}', '{payload}')",
    )  # fmt: skip


async def payloads_until(client: ClientProcess, last: str) -> list[str]:
    """The payloads ``client`` prints up to and including ``last``; fails on anything else."""
    got: list[str] = []
    while not got or got[-1] != last:
        event = await client.next_event(WAIT)
        assert event["event"] == "payload", f"{event} among payloads {got}"
        got.append(event["payload"])
    return got


def attach_once(lab: SystemdLab, user: str, socket: str | None = None) -> dict[str, Any]:
    """tests/support/lab_clients.py ``attach`` as ``user``: its one event (attached or refused)."""
    args = ["attach"] if socket is None else ["attach", socket]
    out = lab.run(f"{VENV}/bin/python", "-c", LAB_CLIENTS, *args, user=user).stdout
    event: dict[str, Any] = json.loads(out.splitlines()[-1])
    return event


def active_with_status(status: str) -> Callable[[dict[str, str]], bool]:
    """For :meth:`SystemdLab.wait_unit`: the unit is active and says ``status``."""
    return lambda shown: shown["ActiveState"] == "active" and shown["StatusText"] == status


# -- the install procedures --------------------------------------------------------------------


async def test_readme_install_procedure_works_as_printed(
    lab_home: LabHome, client_processes: list[ClientProcess]
) -> None:
    # A lab of its own: the README installs less than the docs, for a user named worker.
    with lab_home.boot("readme", {SHARED_PG: Path("/run/postgresql")}) as lab:
        lab.run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "worker")
        block = systemd_lab.shell_blocks(README.read_text(), "## Running it under systemd")
        settings = {"PGBUSD_DSN": shared_dsn("test"), "PGBUSD_CHANNEL": CHANNELS[0]}
        run_procedure(lab, block, {"/etc/pgbusd/pgbusd.env": settings})
        await lab.wait_unit("pgbusd.service", "connected", active_with_status(CONNECTED_IDLE))

        # "" makes the library use its default socket, /run/pgbusd/pgbusd.sock.
        client, _ = await subscriber(lab, client_processes, "", CHANNELS[0], user="worker")
        psql_notify(lab, CHANNELS[0], "hi", database="test")
        assert await payloads_until(client, "hi") == ["hi"]
        await client.stop()

        # "journalctl -u pgbusd -f  # JSON lines, one per event": the daemon's own lines.
        lines = lab.journal("_SYSTEMD_UNIT=pgbusd.service").splitlines()
        assert lines
        for line in lines:
            assert "event" in json.loads(line), line


async def test_docs_install_procedure_works_as_printed(lab: SystemdLab) -> None:
    docs, readme = DOCS.read_text(), README.read_text()
    assert venv_command(docs, "## Install") == venv_command(readme, "## Running it under systemd")
    home = lab.path(f"{VENV}/pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", home, re.M), f"the daemon's user runs: {home}"

    shown = await lab.wait_unit(
        "pgbusd.service", "connected status", active_with_status(CONNECTED_IDLE)
    )
    assert lab.show("pgbusd.service", "UnitFileState")["UnitFileState"] == "enabled"
    status = lab.systemctl("status", "pgbusd")
    assert f'Status: "{CONNECTED_IDLE}"' in status, status
    assert shown["MainPID"] != "0"

    attached = attach_once(lab, WORKER)
    assert attached == {"event": "attached", "channels": list(CHANNELS)}, attached


# -- what the daemon tells systemd -------------------------------------------------------------


async def test_start_returns_once_clients_can_attach_and_status_counts_them(
    lab: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    assert lab.show("pgbusd.service", "Type")["Type"] == "notify"
    lab.systemctl("restart", "pgbusd.service")  # returns on READY=1
    assert attach_once(lab, WORKER)["event"] == "attached"  # at once: no polling
    await lab.wait_unit("pgbusd.service", "connected status", active_with_status(CONNECTED_IDLE))

    client, _ = await subscriber(lab, client_processes, SOCKET, CHANNELS[0])
    one = "PostgreSQL connected, generation 1, 1 client"
    await lab.wait_unit("pgbusd.service", "a status counting the client", active_with_status(one))
    await client.stop()
    await lab.wait_unit("pgbusd.service", "the count back at 0", active_with_status(CONNECTED_IDLE))


def test_readiness_does_not_wait_for_postgresql(lab: SystemdLab) -> None:
    lab.sh("install -m 0640 systemd/pgbusd.env /etc/pgbusd/nowhere.env", cwd=str(lab.home.checkout))
    dsn = "postgresql://postgres@/postgres?host=/srv/no-postgresql-here"
    edit_env(lab, "/etc/pgbusd/nowhere.env", {"PGBUSD_DSN": dsn, "PGBUSD_CHANNEL": CHANNELS[0]})
    try:
        lab.systemctl("start", "pgbusd@nowhere")  # succeeds: READY=1 once the socket is bound
        shown = lab.show("pgbusd@nowhere", "ActiveState", "StatusText")
        assert shown["ActiveState"] == "active"
        assert shown["StatusText"].startswith("PostgreSQL not connected (connecting), generation 0")
        assert attach_once(lab, WORKER, "/run/pgbusd/nowhere.sock")["event"] == "attached"
    finally:
        lab.systemctl("stop", "pgbusd@nowhere")


def test_exit_status_2_fails_the_start_and_is_not_restarted(lab: SystemdLab) -> None:
    lab.sh("install -m 0640 systemd/pgbusd.env /etc/pgbusd/broken.env", cwd=str(lab.home.checkout))
    too_long = "x" * 64  # LISTEN would truncate it: refused at startup, exit 2
    edit_env(lab, "/etc/pgbusd/broken.env", {"PGBUSD_DSN": shared_dsn("postgres"),
                                            "PGBUSD_CHANNEL": too_long})  # fmt: skip
    try:
        assert lab.run("systemctl", "start", "pgbusd@broken", check=False).returncode != 0
        shown = lab.show("pgbusd@broken", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert shown == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2",
                         "NRestarts": "0"}  # fmt: skip
    finally:
        lab.systemctl("reset-failed", "pgbusd@broken")


async def test_watchdog_restarts_a_stopped_daemon_and_the_journal_has_its_stack(
    lab: SystemdLab,
) -> None:
    dropin = "/etc/systemd/system/pgbusd.service.d/lab-watchdog.conf"
    lab.write(dropin, f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n")
    lab.systemctl("daemon-reload")
    lab.systemctl("restart", "pgbusd.service")
    before = lab.show("pgbusd.service", "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] not in ("0", "infinity", "30s"), "the drop-in applies"
    cursor = lab.cursor()

    lab.run("kill", "-STOP", before["MainPID"])
    await lab.wait_unit(
        "pgbusd.service",
        "a restart",
        lambda shown: (
            shown["NRestarts"] == str(int(before["NRestarts"]) + 1)
            and shown["ActiveState"] == "active"
            and shown["MainPID"] not in ("0", before["MainPID"])
        ),
        properties=("NRestarts", "ActiveState", "MainPID"),
    )
    journal = await lab.wait_journal("Fatal Python error: Aborted", "--after-cursor", cursor)
    assert f"pgbusd.service: Watchdog timeout (limit {before['WatchdogUSec']})!" in journal
    assert f"Killing process {before['MainPID']} (pgbusd) with signal SIGABRT" in journal
    assert "Failed with result 'watchdog'" in journal


async def test_stop_tells_attached_clients_and_exits_cleanly(
    lab: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    raw = await start_client(lab, client_processes, LAB_CLIENTS, "raw", SOCKET)
    assert (await raw.next_event(WAIT))["event"] == "Hello"
    cursor = lab.cursor()

    lab.systemctl("stop", "pgbusd.service")  # returns once the daemon is gone

    shown = lab.show("pgbusd.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    # Result=timeout if TimeoutStopSec= ran out, ExecMainCode=2 (killed) if it took a signal.
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                     "ExecMainStatus": "0"}  # fmt: skip
    events = [await raw.next_event(WAIT) for _ in range(2)]
    assert events == [{"event": "Goodbye", "reason": "shutdown"}, {"event": "eof"}]
    journal = await lab.wait_journal(
        '"event": "stopped"', "--after-cursor", cursor, "_SYSTEMD_UNIT=pgbusd.service"
    )
    said = [json.loads(line) for line in journal.splitlines()]
    assert [e["event"] for e in said if e["event"] in ("shutting down", "stopped")] == [
        "shutting down",
        "stopped",
    ]
    assert next(e for e in said if e["event"] == "shutting down")["clients"] == 1


# -- reload: a hand-off to a successor --------------------------------------------------------


async def psql_stream(lab: SystemdLab, channel: str, count: int) -> asyncio.subprocess.Process:
    """psql in the lab committing 1..count on ``channel``, one every 10 ms, in the background."""
    script = "".join(
        f"SELECT pg_notify('{channel}', '{i}'); SELECT pg_sleep(0.01);\n"
        for i in range(1, count + 1)
    )
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", SHARED_PG, "-U", "postgres",
            "-d", "postgres", "-o", "/dev/null"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *lab.command(argv, None, "/"), stdin=asyncio.subprocess.PIPE, env=dict(LAB_ENV)
    )
    assert proc.stdin is not None
    proc.stdin.write(script.encode())
    proc.stdin.close()
    return proc


async def test_reload_under_load_moves_no_generation_and_hands_over_main_pid_and_watchdog(
    lab: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    dropin = "/etc/systemd/system/pgbusd.service.d/lab-watchdog.conf"
    lab.write(dropin, f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n")
    lab.systemctl("daemon-reload")
    lab.systemctl("restart", "pgbusd.service")
    client, _ = await subscriber(lab, client_processes, SOCKET, CHANNELS[0])
    before = lab.show("pgbusd.service", "MainPID", "NRestarts")
    cursor = lab.cursor()
    sender = await psql_stream(lab, CHANNELS[0], 400)

    pids = [before["MainPID"]]
    for _ in range(2):
        lab.systemctl("reload", "pgbusd.service")  # returns once the successor serves
        shown = lab.show("pgbusd.service", "MainPID", "ActiveState")
        assert shown["ActiveState"] == "active"
        assert shown["MainPID"] not in pids, "the successor is the main process"
        pids.append(shown["MainPID"])
    assert await sender.wait() == 0
    # Every number, in order, with no generation step (payloads_until fails on anything else);
    # the stream outlasted WatchdogSec after the last reload, so the successor pings.
    assert await payloads_until(client, "400") == [str(i) for i in range(1, 401)]
    after = lab.show("pgbusd.service", "MainPID", "NRestarts", "ActiveState", "StatusText")
    assert after["MainPID"] == pids[-1]
    assert after["NRestarts"] == before["NRestarts"], "no watchdog restart"
    assert after["StatusText"].startswith("PostgreSQL connected, generation 1,")
    journal = lab.journal("--after-cursor", cursor, "-u", "pgbusd.service")
    assert "Watchdog timeout" not in journal
    assert "reload: the successor serves" in journal


async def test_reload_under_socket_activation_keeps_the_socket_and_its_activation(
    socket_activated: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    lab = socket_activated
    client, _ = await subscriber(lab, client_processes, SOCKET, CHANNELS[1])
    first = lab.show("pgbusd.service", "MainPID")["MainPID"]

    lab.systemctl("reload", "pgbusd.service")

    assert lab.show("pgbusd.service", "MainPID")["MainPID"] != first
    psql_notify(lab, CHANNELS[1], "after the reload")
    assert await payloads_until(client, "after the reload") == ["after the reload"]
    # The socket unit still owns the socket: stopped, the service is activated again.
    lab.systemctl("stop", "pgbusd.service")
    assert lab.show("pgbusd.socket", "ActiveState")["ActiveState"] == "active"
    assert attach_once(lab, WORKER)["event"] == "attached"
    assert lab.show("pgbusd.service", "ActiveState")["ActiveState"] == "active"


# -- workers and the group ---------------------------------------------------------------------


async def test_notification_reaches_a_worker_in_the_pgbusd_group(
    lab: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    assert lab.run("stat", "-c", "%U:%G %a", "/run/pgbusd", SOCKET).stdout.split("\n")[:2] == [
        "pgbusd:pgbusd 750",
        "pgbusd:pgbusd 660",
    ]
    assert "pgbusd" in lab.run("id", "-nG", WORKER).stdout.split()
    client, _ = await subscriber(lab, client_processes, SOCKET, CHANNELS[1])
    psql_notify(lab, CHANNELS[1], "from psql")
    assert await payloads_until(client, "from psql") == ["from psql"]


def test_a_user_outside_the_group_is_refused(lab: SystemdLab) -> None:
    assert "pgbusd" not in lab.run("id", "-nG", OUTSIDER).stdout.split()
    refused = attach_once(lab, OUTSIDER)
    assert refused["event"] == "refused", refused
    assert "PermissionError" in refused["cause"], refused


# -- socket activation -------------------------------------------------------------------------


@pytest.fixture
def socket_activated(lab: SystemdLab) -> SystemdLab:
    """pgbusd.socket listening and pgbusd.service stopped, by the docs' commands."""
    run_procedure(
        lab, systemd_lab.shell_blocks(DOCS.read_text(), "## Socket activation (optional)")
    )
    assert lab.show("pgbusd.socket", "ActiveState")["ActiveState"] == "active"
    assert lab.show("pgbusd.service", "ActiveState")["ActiveState"] == "inactive"
    return lab


async def test_socket_activation_starts_the_daemon_on_the_first_client(
    socket_activated: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    lab = socket_activated
    assert lab.run("stat", "-c", "%U:%G %a", SOCKET).stdout.strip() == "pgbusd:pgbusd 660"
    cursor = lab.cursor()
    client, _ = await subscriber(lab, client_processes, SOCKET, CHANNELS[0])
    shown = lab.show("pgbusd.service", "ActiveState", "TriggeredBy")
    assert shown == {"ActiveState": "active", "TriggeredBy": "pgbusd.socket"}
    journal = await lab.wait_journal(
        "serving the socket passed by systemd", "--after-cursor", cursor, "-u", "pgbusd.service"
    )
    assert "not the configured one" not in journal
    psql_notify(lab, CHANNELS[0], "activated")
    assert await payloads_until(client, "activated") == ["activated"]


async def test_restart_under_socket_activation_moves_an_attached_client_one_generation(
    socket_activated: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    lab = socket_activated
    client, generation = await subscriber(lab, client_processes, SOCKET, CHANNELS[0])
    first = lab.show("pgbusd.service", "MainPID")["MainPID"]

    lab.systemctl("restart", "pgbusd.service")

    assert lab.show("pgbusd.service", "MainPID")["MainPID"] != first
    step = await client.next_event(WAIT)
    assert (step["event"], step["generation"]) == ("generation", generation + 1)
    # Once listening again: a marker comes next, with no second generation step before it.
    psql_notify(lab, CHANNELS[0], "after the restart")
    assert await payloads_until(client, "after the restart") == ["after the restart"]


# -- one daemon per database -------------------------------------------------------------------


@pytest.fixture
def instances(lab: SystemdLab) -> Iterator[SystemdLab]:
    """The docs' pgbusd@orders (database postgres) and pgbusd@billing (database test), both
    relaying CHANNELS[0]; every instance unit stopped afterwards."""
    yield lab
    units = [f"pgbusd@{name}{kind}" for name in ("orders", "billing") for kind in ("", ".socket")]
    lab.systemctl("disable", "--now", *units)
    lab.systemctl("reset-failed")


INSTANCE_EDITS = {
    # PGBUSD_SOCKET in NAME.env is ignored: the socket is the instance's.
    "/etc/pgbusd/orders.env": {"PGBUSD_DSN": shared_dsn("postgres"), "PGBUSD_CHANNEL": CHANNELS[0],
                               "PGBUSD_SOCKET": "/run/pgbusd/elsewhere.sock"},
    "/etc/pgbusd/billing.env": {"PGBUSD_DSN": shared_dsn("test"), "PGBUSD_CHANNEL": CHANNELS[0]},
}  # fmt: skip


async def test_template_instances_relay_their_own_database(
    instances: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    lab = instances
    blocks = systemd_lab.shell_blocks(DOCS.read_text(), "## Several databases on one host")
    run_procedure(lab, blocks[:1], INSTANCE_EDITS)
    orders, _ = await subscriber(lab, client_processes, "/run/pgbusd/orders.sock", CHANNELS[0])
    billing, _ = await subscriber(lab, client_processes, "/run/pgbusd/billing.sock", CHANNELS[0])
    assert not lab.path("/run/pgbusd/elsewhere.sock").exists()

    # One queue for the whole cluster, read in commit order: had a notification of the other
    # database reached a relay, it would arrive before that relay's "end".
    psql_notify(lab, CHANNELS[0], "o1", database="postgres")
    psql_notify(lab, CHANNELS[0], "b1", database="test")
    psql_notify(lab, CHANNELS[0], "o-end", database="postgres")
    psql_notify(lab, CHANNELS[0], "b-end", database="test")
    assert await payloads_until(orders, "o-end") == ["o1", "o-end"]
    assert await payloads_until(billing, "b-end") == ["b1", "b-end"]

    # RuntimeDirectoryPreserve=yes: stopping one instance leaves the others' sockets.
    lab.systemctl("stop", "pgbusd@orders")
    assert attach_once(lab, WORKER, "/run/pgbusd/billing.sock")["event"] == "attached"


async def test_instance_sockets_start_their_instance_on_the_first_client(
    instances: SystemdLab, client_processes: list[ClientProcess]
) -> None:
    lab = instances
    blocks = systemd_lab.shell_blocks(DOCS.read_text(), "## Several databases on one host")
    run_procedure(lab, blocks, INSTANCE_EDITS)
    assert lab.show("pgbusd@orders.service", "ActiveState")["ActiveState"] == "inactive"
    client, _ = await subscriber(lab, client_processes, "/run/pgbusd/orders.sock", CHANNELS[0])
    assert lab.show("pgbusd@orders.service", "ActiveState")["ActiveState"] == "active"
    assert lab.show("pgbusd@billing.service", "ActiveState")["ActiveState"] == "inactive"
    psql_notify(lab, CHANNELS[0], "orders, activated", database="postgres")
    assert await payloads_until(client, "orders, activated") == ["orders, activated"]


# -- the password as a credential --------------------------------------------------------------


@pytest.fixture
def scram_cluster(lab: SystemdLab, cluster_template: Any) -> Iterator[Any]:
    """A private PostgreSQL that wants a password (scram-sha-256) on its Unix socket, which is
    in the directory the lab sees as PRIVATE_PG; postgres over TCP needs none (trust)."""
    cluster = cluster_template.copy()
    with open(cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write(f"unix_socket_directories = '{lab.binds[PRIVATE_PG]}'\n")
    (cluster.datadir / "pg_hba.conf").write_text(
        "local all all scram-sha-256\nhost all postgres 127.0.0.1/32 trust\n"
    )
    cluster.start()
    yield cluster
    cluster.destroy()


async def test_passfile_credential_authenticates_a_password_role(
    lab: SystemdLab, scram_cluster: Any, client_processes: list[ClientProcess]
) -> None:
    role, password = f"pgbusd_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    conn = await asyncpg.connect(scram_cluster.dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        port = scram_cluster.port
        denied = lab.run(
            "psql", "-w", "-h", PRIVATE_PG, "-p", str(port), "-U", role, "-d", "postgres",
            "-c", "SELECT 1", check=False,
        )  # fmt: skip
        assert denied.returncode != 0
        assert "no password supplied" in denied.stderr, denied.stderr

        lab.sh("install -m 0640 systemd/pgbusd.env /etc/pgbusd/vault.env",
               cwd=str(lab.home.checkout))  # fmt: skip
        dsn = f"postgresql://{role}@/postgres?host={PRIVATE_PG}&port={port}"
        edit_env(lab, "/etc/pgbusd/vault.env", {"PGBUSD_DSN": dsn, "PGBUSD_CHANNEL": CHANNELS[1]})
        # As docs/systemd.md step 4 says, for the instance's passfile (localhost: a socket DSN).
        lab.sh("install -m 0600 /dev/null /etc/pgbusd/vault.pgpass")
        lab.sh(f"echo 'localhost:{port}:postgres:{role}:{password}' > /etc/pgbusd/vault.pgpass")
        try:
            lab.systemctl("start", "pgbusd@vault")
            await lab.wait_unit(
                "pgbusd@vault", "connected status", active_with_status(CONNECTED_IDLE)
            )
            client, _ = await subscriber(
                lab, client_processes, "/run/pgbusd/vault.sock", CHANNELS[1]
            )
            await conn.execute("SELECT pg_notify($1, 'authenticated')", CHANNELS[1])
            assert await payloads_until(client, "authenticated") == ["authenticated"]

            shown = lab.show("pgbusd@vault", "Environment")["Environment"]
            assert "PGPASSFILE=/run/credentials/pgbusd@vault.service/pgpass" in shown.split()
            assert password not in shown
            assert password not in lab.journal("-u", "pgbusd@vault")
        finally:
            lab.systemctl("stop", "pgbusd@vault")
    finally:
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


# -- hardening ---------------------------------------------------------------------------------


def test_systemd_analyze_security_rates_the_running_service_ok_or_better(
    lab: SystemdLab, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    result = lab.run(
        "systemd-analyze", "security", "--no-pager", "--threshold=49", "pgbusd.service",
        check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for pgbusd\.service: (\d+\.\d) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    score, level = float(found[1]), found[2]
    record_property("systemd_security_exposure_live", f"{score} {level}")
    with capsys.disabled():
        print(f"\nsystemd-analyze security (live systemd): pgbusd.service {score} {level}")
    assert result.returncode == 0, result.stdout
    assert level in ("PERFECT", "SAFE", "OK"), result.stdout
