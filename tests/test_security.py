"""Hostile and bad input: who may connect, what a frame may be, limits, names, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import pgbus
from pgbus import protocol as p
from tests.conftest import (
    Daemon,
    DaemonFactory,
    attached,
    notify,
    rss_kib,
    status_of,
    unique_channel,
    wait_until,
)
from tests.support.cluster import PrivateCluster

pytestmark = [pytest.mark.postgres, pytest.mark.root]

NOBODY = 65534


def run_as(uid: int, gid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with another uid/gid; return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: blocking code only, then _exit
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = fn()
        except BaseException as exc:
            result = {"exception": type(exc).__name__, "errno": getattr(exc, "errno", None)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def first_frames(path: str) -> Callable[[], Any]:
    """Connect, attach, and report the messages the daemon sent until it closed (or 2 s)."""

    def go() -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        decoder = p.server_decoder()
        out: list[str] = []
        with contextlib.suppress(OSError):
            sock.sendall(p.encode_frame(p.Attach(p.PROTOCOL_VERSION, os.getpid(), "nobody")))
        while True:
            try:
                data = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                out.append("EOF")
                break
            for msg in decoder.feed(data):
                out.append(msg.code if isinstance(msg, p.Error) else type(msg).__name__)
        return out

    return go


def subscribe_as_peer(path: str, channel: str) -> Callable[[], Any]:
    def go() -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        decoder = p.server_decoder()
        sock.sendall(p.encode_frame(p.Attach(p.PROTOCOL_VERSION, os.getpid(), ""),
                                    p.Subscribe(channel)))  # fmt: skip
        out: list[Any] = []
        while len(out) < 2:
            for msg in decoder.feed(sock.recv(65536)):
                out.append([type(msg).__name__, getattr(msg, "code", None)])
        return out

    return go


def open_dir(workdir: Path) -> None:
    workdir.chmod(0o755)  # so that only the socket file's own mode decides


# -- the socket file ---------------------------------------------------------------------------


async def test_socket_is_0660_and_a_created_directory_is_0750(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory(start=False)
    d.socket = str(d.workdir / "run" / "pgbusd.sock")
    d.start()
    await d.wait_serving()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(d.workdir / "run").st_mode) == 0o750


async def test_socket_group_and_mode_options(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(args=["--socket-group", "nogroup", "--socket-mode", "0640"])
    await d.wait_serving()
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, NOBODY)


async def test_user_outside_the_group_gets_eacces(daemon: Daemon, workdir: Path) -> None:
    open_dir(workdir)
    result = await asyncio.to_thread(run_as, NOBODY, NOBODY, first_frames(daemon.socket))
    assert result == {"exception": "PermissionError", "errno": 13}


async def test_group_member_may_connect_through_the_socket_group(
    daemon_factory: DaemonFactory, workdir: Path
) -> None:
    open_dir(workdir)
    d = daemon_factory(args=["--socket-group", "nogroup"])
    await d.wait_serving()
    result = await asyncio.to_thread(run_as, NOBODY, NOBODY, first_frames(d.socket))
    assert result[0] == "Hello"


def test_abstract_namespace_socket_is_refused() -> None:
    from pgbusd.config import Config, ConfigError

    with pytest.raises(ConfigError, match="abstract"):
        Config(socket="@pgbusd")


# -- peer credentials --------------------------------------------------------------------------


async def test_peer_not_in_allow_uid_is_refused_with_a_reason_and_logged(
    daemon_factory: DaemonFactory, workdir: Path
) -> None:
    open_dir(workdir)
    d = daemon_factory(args=["--socket-mode", "0666", "--allow-uid", "root"])
    await d.wait_serving()
    result = await asyncio.to_thread(run_as, NOBODY, NOBODY, first_frames(d.socket))
    assert result[0] == p.E_FORBIDDEN, "refused before any Hello, with the reason"
    assert result[1:] in ([], ["EOF"]), "then closed (EOF, or a reset since we had written)"
    refusals = [json.loads(line) for line in d.log().splitlines() if '"client refused"' in line]
    assert len(refusals) == 1
    assert refusals[0]["client_uid"] == NOBODY
    assert refusals[0]["client_gid"] == NOBODY
    assert refusals[0]["client_pid"] > 0
    async with attached(d) as bus:  # root still may
        assert (await status_of(bus)).totals.clients_refused == 1


async def test_allow_gid_admits_the_group(daemon_factory: DaemonFactory, workdir: Path) -> None:
    open_dir(workdir)
    d = daemon_factory(args=["--socket-mode", "0666", "--allow-uid", "12345",
                             "--allow-gid", "nogroup"])  # fmt: skip
    await d.wait_serving()
    result = await asyncio.to_thread(run_as, NOBODY, NOBODY, first_frames(d.socket))
    assert result[0] == "Hello"


async def test_channel_acl_refuses_subscribe_with_an_error_frame(
    daemon_factory: DaemonFactory, workdir: Path
) -> None:
    open_dir(workdir)
    secret, public = unique_channel("secret"), unique_channel("public")
    d = daemon_factory([secret, public], args=["--socket-mode", "0666",
                                               "--channel-acl", f"{secret}=uid:root"])  # fmt: skip
    await d.wait_serving()
    refused = await asyncio.to_thread(run_as, NOBODY, NOBODY, subscribe_as_peer(d.socket, secret))
    assert refused == [["Hello", None], ["Error", p.E_FORBIDDEN]]
    allowed = await asyncio.to_thread(run_as, NOBODY, NOBODY, subscribe_as_peer(d.socket, public))
    assert allowed == [["Hello", None], ["Subscribed", None]]


async def test_unknown_user_or_group_in_options_is_refused_at_startup(
    daemon_factory: DaemonFactory,
) -> None:
    from tests.test_cli import run_pgbusd

    result = await asyncio.to_thread(
        run_pgbusd, "--channel", "c", "--allow-uid", "no_such_user_xyz"
    )
    assert result.returncode == 2
    assert "no_such_user_xyz" in result.stderr
    result = await asyncio.to_thread(run_pgbusd, "--channel", "c", "--channel-acl", "d=uid:0")
    assert result.returncode == 2
    assert "not relayed" in result.stderr


# -- frames ----------------------------------------------------------------------------------


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def _read_until_eof(sock: socket.socket) -> list[p.ServerMessage]:
    decoder = p.server_decoder()
    out: list[p.ServerMessage] = []
    while data := sock.recv(65536):
        out.extend(decoder.feed(data))
    return out


ATTACH = p.encode_frame(p.Attach(p.PROTOCOL_VERSION, 1, "bad"))


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


BAD_INPUTS = {
    "oversized-prefix": ATTACH + (1 << 30).to_bytes(4, "big"),
    "not-msgpack": ATTACH + _frame(b"\xc1\xc1\xc1"),
    "unknown-type": ATTACH + _frame(b"\x91\x92\xa6launch\x01"),
    "wrong-shape": ATTACH + _frame(msgspec.msgpack.encode([["subscribe", 5, 6]])),
    "wrong-version": p.encode_frame(p.Attach(99, 1, "old")),
    "subscribe-before-attach": p.encode_frame(p.Subscribe("x")),
    "server-message-from-client": ATTACH + p.encode_frame(p.Generation(5)),
}
EXPECTED_CODE = {
    "oversized-prefix": p.E_FRAME_TOO_LARGE,
    "wrong-version": p.E_VERSION,
    "subscribe-before-attach": p.E_HANDSHAKE,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_frame_closes_only_that_client_with_a_named_error(
    daemon: Daemon, pg: Any, case: str
) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel)
        sock = _raw(daemon.socket)
        try:
            sock.sendall(BAD_INPUTS[case])
            messages = await asyncio.to_thread(_read_until_eof, sock)
        finally:
            sock.close()
        assert isinstance(messages[0], p.Hello)
        error = messages[-1]
        assert isinstance(error, p.Error)
        assert error.fatal
        assert error.code == EXPECTED_CODE.get(case, p.E_PROTOCOL)
        assert error.message
        await notify(pg, channel, "others-untouched")
        assert await asyncio.wait_for(sub.recv(), 10) == "others-untouched"
        assert bus.generation == 1
    closed = [line for line in daemon.log().splitlines() if '"client closed"' in line]
    assert len(closed) == 1, "logged once"


async def test_truncated_frame_is_logged_and_counted(daemon: Daemon) -> None:
    sock = _raw(daemon.socket)
    sock.sendall(ATTACH + p.encode_frame(p.Subscribe("x"))[:-3])
    sock.shutdown(socket.SHUT_WR)
    await asyncio.to_thread(_read_until_eof, sock)
    sock.close()
    await wait_until(lambda: "truncated frame" in daemon.log(), what="truncation logged")


async def test_handshake_must_complete_in_time(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(args=["--handshake-timeout", "0.3"])
    await d.wait_serving()
    sock = _raw(d.socket)
    try:
        messages = await asyncio.to_thread(_read_until_eof, sock)  # sends nothing at all
    finally:
        sock.close()
    assert isinstance(messages[0], p.Hello)
    assert isinstance(messages[-1], p.Error)
    assert messages[-1].code == p.E_HANDSHAKE


async def test_max_clients_refuses_one_more_cleanly(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(args=["--max-clients", "2"])
    await d.wait_generation(1)
    async with attached(d) as bus1, attached(d):
        with pytest.raises(pgbus.DaemonUnavailableError, match="at most 2 clients"):
            await pgbus.connect(d.socket)
        st = await status_of(bus1)
        assert st.totals.clients_refused == 1

    async def room_again() -> pgbus.Bus | None:  # once the daemon has seen the two leave
        try:
            return await pgbus.connect(d.socket)
        except pgbus.DaemonUnavailableError:
            return None

    bus3 = await wait_until(room_again, what="room for a new client")
    assert bus3.attached
    await bus3.close()


async def test_subscribe_unsubscribe_churn_does_not_grow_the_daemon(daemon: Daemon) -> None:
    channel = daemon.channels[0]
    sock = _raw(daemon.socket)
    try:
        sock.sendall(ATTACH)
        before = rss_kib(daemon.pid)
        decoder = p.server_decoder()
        for _ in range(200):
            sock.sendall(p.encode_frame(*[p.Subscribe(channel), p.Unsubscribe(channel)] * 50))
            acks = 0
            while acks < 100:
                acks += sum(
                    isinstance(m, p.Subscribed | p.Unsubscribed)
                    for m in decoder.feed(sock.recv(65536))
                )
        st = await daemon.status()
        assert st is not None
        assert st.channels[channel].subscribers == 0
        assert rss_kib(daemon.pid) - before < 8 * 1024
    finally:
        sock.close()


def _fuzz_connection(path: str, rng: random.Random) -> None:
    valid = [ATTACH, p.encode_frame(p.Subscribe("x")), p.encode_frame(p.StatusRequest())]
    kind = rng.randrange(6)
    if kind == 0:
        payload = rng.randbytes(rng.randrange(1, 300))
    elif kind == 1:
        payload = rng.randrange(p.MAX_CLIENT_FRAME, 1 << 32).to_bytes(4, "big")
    elif kind == 2:
        whole = b"".join(valid)
        payload = whole[: rng.randrange(1, len(whole))]
    elif kind == 3:
        payload = ATTACH + rng.randbytes(rng.randrange(1, 300))
    elif kind == 4:
        frame = bytearray(b"".join(valid))
        for _ in range(rng.randrange(1, 5)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        payload = bytes(frame)
    else:
        payload = b""  # connect and say nothing
    try:
        sock = _raw(path)
        sock.settimeout(2)
        try:
            sock.sendall(payload)
            if rng.random() < 0.5:
                sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        finally:
            sock.close()
    except OSError:
        pass


async def test_socket_fuzz_leaves_good_clients_and_the_daemon_untouched(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    d = daemon_factory(args=["--handshake-timeout", "0.5"])
    await d.wait_generation(1)
    channel = d.channels[0]
    rng = random.Random(20261129)
    async with attached(d) as bus:
        sub = await bus.subscribe(channel, buffer=10_000)
        rss_before = rss_kib(d.pid)
        sent = 0
        for round_ in range(6):
            seeds = [rng.getrandbits(32) for _ in range(25)]
            fuzz = asyncio.gather(*(
                asyncio.to_thread(_fuzz_connection, d.socket, random.Random(s)) for s in seeds
            ))  # fmt: skip
            await notify(pg, channel, *[f"{round_}:{i}" for i in range(200)])
            sent += 200
            await fuzz
        got = [await asyncio.wait_for(sub.recv(), 10) for _ in range(sent)]
        assert got == [f"{r}:{i}" for r in range(6) for i in range(200)]
        assert bus.generation == 1
        st = await status_of(bus)
        assert st.totals.frames_rejected > 0
    assert d.alive()
    assert rss_kib(d.pid) - rss_before < 16 * 1024
    async with attached(d) as fresh:  # still serves new clients
        sub = await fresh.subscribe(channel)
        await notify(pg, channel, "after-fuzz")
        assert await asyncio.wait_for(sub.recv(), 10) == "after-fuzz"


# -- channel names ---------------------------------------------------------------------------


async def test_injection_string_is_listened_to_literally_never_executed(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    table = unique_channel("victim")
    await pg.execute(f"CREATE TABLE {table} (x int)")
    try:
        channel = f'x"; DROP TABLE {table}; --'
        d = daemon_factory([channel])
        await d.wait_generation(1)
        async with attached(d) as bus:
            sub = await bus.subscribe(channel)
            await notify(pg, channel, "literal")
            assert await asyncio.wait_for(sub.recv(), 10) == "literal"
        assert await pg.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")


async def test_channel_names_are_exact_case(daemon_factory: DaemonFactory, pg: Any) -> None:
    channel = unique_channel("MiXeD")
    d = daemon_factory([channel])
    await d.wait_generation(1)
    async with attached(d) as bus:
        sub = await bus.subscribe(channel)
        await pg.execute(f"NOTIFY {channel}, 'folded'")  # unquoted: folds to lower case
        await notify(pg, channel, "exact")  # pg_notify keeps the case
        assert await asyncio.wait_for(sub.recv(), 10) == "exact"


# -- secrets ---------------------------------------------------------------------------------


async def test_password_is_not_in_the_process_title(daemon_factory: DaemonFactory) -> None:
    secret = "t1tle-Pa55word"
    d = daemon_factory(dsn=f"postgresql://postgres:{secret}@127.0.0.1:1/test")
    await d.wait_serving()
    cmdline = Path(f"/proc/{d.pid}/cmdline").read_bytes()
    assert secret.encode() not in cmdline
    assert b"pgbusd" in cmdline
    st = await d.status()
    assert st is not None
    assert secret not in msgspec.json.encode(st).decode()


async def test_password_from_a_passfile(
    daemon_factory: DaemonFactory, cluster_template: PrivateCluster, workdir: Path
) -> None:
    cluster = cluster_template.copy()
    cluster.start()
    try:
        import asyncpg

        secret = "passfile-S3cret"
        admin = await asyncpg.connect(cluster.dsn)
        await admin.execute(f"CREATE ROLE relay LOGIN PASSWORD '{secret}'")
        await admin.close()
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text("host all relay 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        cluster.reload()
        passfile = workdir / "pgpass"
        passfile.write_text(f"127.0.0.1:{cluster.port}:*:relay:{secret}\n")
        passfile.chmod(0o600)
        dsn = f"postgresql://relay@127.0.0.1:{cluster.port}/postgres"
        d = daemon_factory(dsn=dsn, env={"PGPASSFILE": str(passfile)})
        st = await d.wait_generation(1)
        assert st.postgres.connected
        without = daemon_factory(dsn=dsn, env={"PGPASSFILE": "/nonexistent"}, subdir="b")
        await without.wait_serving()

        async def auth_failed() -> bool:
            st = await without.status()
            return bool(st and "password" in (st.postgres.last_error or ""))

        await wait_until(auth_failed, what="authentication failure without the passfile")
        assert secret not in d.log() + without.log()
    finally:
        cluster.destroy()


async def test_a_refused_client_that_never_reads_is_not_kept_alive(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    d = daemon_factory(args=["--handshake-timeout", "0.5", "--write-budget", str(64 << 20)])
    await d.wait_generation(1)
    channel = d.channels[0]
    sock = _raw(d.socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(ATTACH + p.encode_frame(p.Subscribe(channel)))
        async with attached(d) as bus:
            await wait_until(lambda: _subscriber_count(bus, channel, 1), what="subscribed")
            # Fill its socket (the kernel takes a few MiB), so the daemon holds bytes it cannot
            # deliver, below the 64 MiB budget ...
            await pg.execute(
                "SELECT pg_notify($1, lpad(g::text, 1000, 'x')) FROM generate_series(1, 20000) g",
                channel,
            )
            await wait_until(lambda: _stuck_bytes(bus), what="bytes the client will not take")
            sock.sendall(b"\x00\x00\x00\x03abc")  # ... then misbehave
            await wait_until(lambda: _client_count(bus, 1), what="the bad client dropped")
    finally:
        sock.close()


async def _subscriber_count(bus: pgbus.Bus, channel: str, n: int) -> bool:
    return bool((await status_of(bus)).channels[channel].subscribers == n)


async def _client_count(bus: pgbus.Bus, n: int) -> bool:
    return len((await status_of(bus)).clients) == n


async def _stuck_bytes(bus: pgbus.Bus) -> bool:
    return any(c.bytes_waiting > 1_000_000 for c in (await status_of(bus)).clients)
