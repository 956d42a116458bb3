"""``pgbusctl``: ask a running pgbusd over its socket.

- ``status``: the daemon's state as a table (``--json`` for machines). Exit codes: 0 the daemon is
  up and listening on PostgreSQL, 1 the daemon is up but PostgreSQL is not connected, 3 the daemon
  cannot be reached, or answers with a status document this pgbusctl cannot read (another
  version). So ``pgbusctl status`` doubles as a health check, and never reports an unreadable
  answer as a PostgreSQL outage.
- ``listen CHANNEL...``: like psql's LISTEN, but through the daemon: one line per notification and
  one per generation change, until Ctrl-C (exit 0).
- ``metrics``: the status in the Prometheus text format (see :mod:`pgbusd.ops.metrics`).
- ``reload``: replace the running daemon with a new process started from the code installed now
  (a hand-off, see :mod:`pgbusd.handoff`: clients lose nothing and their generation does not
  move); returns once the successor serves. Exit codes: 0 done, 1 the reload failed (the daemon
  serves on; the reason is printed), 3 the daemon cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

import pgbus
import pgbusd
from pgbus import protocol as p
from pgbusd.ops import metrics as prom
from pgbusd.ops.status import (
    ClientStatus,
    FleetStatus,
    IncompatibleStatusError,
    Omitted,
    Status,
    parse,
)

EXIT_OK = 0
EXIT_PG_DOWN = 1
EXIT_RELOAD_FAILED = 1
EXIT_USAGE = 2
#: The daemon cannot be reached, or its answer cannot be read (another version of the daemon).
EXIT_UNREACHABLE = 3


class _NoStatus(Exception):
    """No usable status: the daemon is unreachable or answered in another shape (the message)."""


async def fetch_status(path: str, timeout: float) -> dict[str, Any]:
    """The daemon's status document, as it came."""
    async with pgbus.connect(path, name="pgbusctl", attach_timeout=timeout) as bus:
        return await asyncio.wait_for(bus.status(), timeout)


def _ask(path: str, timeout: float) -> tuple[dict[str, Any], Status]:
    """The document as it came and as a :class:`Status`; :class:`_NoStatus` saying why not."""
    try:
        doc = asyncio.run(fetch_status(path, timeout))
    except (pgbus.PgbusError, OSError, TimeoutError) as exc:
        raise _NoStatus(f"pgbusd is unreachable at {path}: {exc}") from exc
    try:
        return doc, parse(doc)
    except IncompatibleStatusError as exc:
        version = doc.get("version")
        theirs = f"pgbusd {version}" if isinstance(version, str) else "a daemon of another version"
        raise _NoStatus(
            f"{theirs} at {path} sent a status document that pgbusctl {pgbusd.__version__} "
            f"cannot read ({exc}); use the pgbusctl of the daemon's version"
        ) from exc


def _unreachable(path: str, exc: BaseException) -> None:
    click.echo(f"pgbusctl: pgbusd is unreachable at {path}: {exc}", err=True)


# -- status --------------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    """``4.2s``, ``45s``, ``12m05s``, ``3h07m``, ``2d04h``: two units at most."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _relative(ts: float | None, now: float) -> str:
    """``2024-05-01 12:00:00 UTC (4s ago)``, or ``(in 2s)`` for a time still ahead."""
    if ts is None:
        return "-"
    delta = now - ts
    rel = f"{_duration(delta)} ago" if delta >= 0 else f"in {_duration(-delta)}"
    return f"{_when(ts)} ({rel})"


def _printable(text: str) -> str:
    """``text`` as is if it prints on one line, else JSON-quoted (so control bytes stay visible)."""
    return text if text.isprintable() else json.dumps(text, ensure_ascii=False)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _subscriptions(client: ClientStatus) -> str:
    if client.subscribed and not client.subscriptions:  # left out of a large document
        return f"({client.subscribed} channels)"
    return ",".join(_printable(s) for s in client.subscriptions) or "-"


def _omitted(omitted: Omitted) -> str:
    parts = [
        f"{n} {what}"
        for n, what in (
            (omitted.subscriptions, "subscription names"),
            (omitted.channels, "channels"),
            (omitted.clients, "clients"),
        )
        if n
    ]
    return (
        f"omitted     {', '.join(parts)}: the status reply is limited to "
        f"{p.MAX_SERVER_FRAME >> 20} MiB (counts and totals are complete)"
    )


def _fleet(fleet: FleetStatus) -> list[str]:
    """Fleet mode's lines: role, stream, position, lag, lease."""
    nats = "connected" if fleet.nats_connected else "NOT CONNECTED"
    lines = [
        f"fleet       {fleet.role}, {fleet.state}; stream {fleet.stream} on {fleet.nats} "
        f"(NATS {nats})",
        f"stream      lineage {fleet.lineage or '-'}  generation "
        f"{'-' if fleet.generation is None else fleet.generation}  last sequence "
        f"{'-' if fleet.last_stream_seq is None else fleet.last_stream_seq}  lag "
        f"{'-' if fleet.lag is None else fleet.lag}",
    ]
    lease = fleet.lease
    if fleet.role == "bridge":
        holder = "-" if lease is None or lease.holder is None else lease.holder
        held = "held by this bridge" if lease is not None and lease.held else f"holder {holder}"
        ttl = "" if lease is None else f", ttl {lease.ttl:g} s"
        lines.append(
            f"lease       {held}{ttl}; published {fleet.published}, dropped {fleet.dropped}, "
            f"takeovers {fleet.takeovers} ({fleet.exact_takeovers} exact)"
            + ("; ready to take over exactly" if fleet.exact_ready else "")
        )
    else:
        lines.append(
            f"host        local steps {fleet.local_steps}; state file {fleet.state_file or '-'}"
        )
    if fleet.unrelayed_count:
        who = "no bridge relays" if fleet.role == "host" else "the publishing bridge does not relay"
        names = _names(fleet.unrelayed, fleet.unrelayed_count)
        lines.append(f"channels    {fleet.unrelayed_count} that {who}: {names}")
    if fleet.not_here_count:
        lines.append(
            f"channels    {fleet.not_here_count} that the publishing bridge relays and this one "
            f"does not: {_names(fleet.not_here, fleet.not_here_count)}"
        )
    if fleet.failure:
        lines.append(f"fleet error {fleet.failure}")
    return lines


def _names(names: list[str], count: int, shown: int = 10) -> str:
    text = ", ".join(names[:shown])
    return text + (f" and {count - min(shown, len(names))} more" if count > shown else "")


def render(status: Status) -> str:
    """The status document as a human-readable report."""
    pg = status.postgres
    totals = status.totals
    now = status.started_at + status.uptime  # the daemon's clock when it answered
    lines = [
        f"pgbusd {status.version}  daemon {status.daemon_id}  pid {status.pid}  "
        f"up {_duration(status.uptime)} (since {_when(status.started_at)})",
        f"socket      {status.socket}",
    ]
    if status.metrics_address:
        lines.append(f"metrics     http://{status.metrics_address}/metrics")
    if pg.connected:
        lines.append(
            f"postgres    connected to {pg.server or '-'}, backend pid "
            f"{pg.backend_pid or '-'}, since {_relative(pg.connected_since, now)}"
        )
    else:
        retry = pg.next_retry_at if pg.state == "connecting" else None
        lines.append(
            f"postgres    {pg.state.upper()}"
            + (f", next retry {_relative(retry, now)}" if retry else "")
        )
    if pg.last_error:
        lines.append(f"last error  {_relative(pg.last_error_at, now)}: {pg.last_error}")
    lines += [
        f"generation  {status.generation}  (reconnects {totals.reconnects})",
        f"health      last ok {_relative(pg.last_health_ok, now)}",
        "queue usage "
        + ("-" if pg.queue_usage is None else f"{pg.queue_usage:.4f}")
        + "  (pg_notification_queue_usage() at the last health check)",
    ]
    if pg.relay_errors:
        lines.append(f"relay errors {pg.relay_errors}  (contained; see the daemon's log)")
    if pg.listening_channels is not None:
        lines.append(
            f"listening   {pg.listening_channels} channels (pg_listening_channels(), the "
            "daemon's probe included)"
        )
    if totals.listens or totals.unlistens or totals.subscribes_refused:
        refused = ", ".join(f"{code} {n}" for code, n in sorted(totals.subscribes_refused.items()))
        lines.append(
            f"on demand   listened {totals.listens}, unlistened {totals.unlistens}"
            + (f", refused: {refused}" if refused else "")
        )
    if status.fleet is not None:
        lines += _fleet(status.fleet)
    if status.view == "restricted":
        lines.append(
            "view        restricted: your own subscriptions and aggregate counts (the whole "
            "status is for root, the daemon's user and --operator-gid members)"
        )
    elif status.omitted:
        lines.append(_omitted(status.omitted))
    lines.append("")
    channels = status.channels
    lines += _table(
        ["CHANNEL", "KIND", "SUBSCRIBERS", "RECEIVED", "LAST RECEIVED"],
        [
            [
                _printable(name),
                "pinned" if ch.pinned else "dynamic",
                str(ch.subscribers),
                str(ch.received),
                _relative(ch.last_received, now),
            ]
            for name, ch in channels.items()
        ],
        right={2, 3},
    )
    if not status.channel_count:
        lines.append("(no channels registered)")
    elif status.omitted.channels:
        lines.append(f"(and {status.omitted.channels} more channels)")
    lines.append("")
    lines += _table(
        ["CLIENT PID", "UID", "NAME", "WAITING", "NOTIFIED", "SUBSCRIPTIONS"],
        [
            [
                str(c.pid),
                str(c.uid),
                _printable(c.name) or "-",
                str(c.bytes_waiting),
                str(c.notifications_sent),
                _subscriptions(c),
            ]
            for c in status.clients
        ],
        right={0, 1, 3, 4},
    )
    if status.omitted.clients and status.view == "restricted":
        lines.append(f"(and {status.omitted.clients} other clients)")
    elif status.omitted.clients:
        lines.append(f"(and {status.omitted.clients} more clients, with fewer bytes waiting)")
    lines.append("")
    shown = [
        ("clients", totals.clients),
        ("received", totals.notifications_received),
        ("sent", totals.notifications_sent),
        ("reconnects", totals.reconnects),
        ("cut slow", totals.clients_cut_slow),
        ("refused", totals.clients_refused),
        ("frames rejected", totals.frames_rejected),
        ("status requests", totals.status_requests),
    ]
    lines.append("totals      " + "  ".join(f"{label} {value}" for label, value in shown))
    return "\n".join(lines)


# -- listen --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """One notification as it reached this process, with what the payload alone does not say."""

    at: float
    channel: str
    payload: str
    pid: int
    seq: int
    generation: int


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _stamp(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class ListenPrinter:
    """Writes ``pgbusctl listen`` events, as text lines or as JSON objects (one per line)."""

    def __init__(self, as_json: bool, write: Callable[[str], None]) -> None:
        self.as_json = as_json
        self._write = write

    def _emit(self, event: dict[str, Any], text: str) -> None:
        self._write(json.dumps(event) if self.as_json else text)

    def listening(self, channels: list[str], socket: str, daemon_id: str, generation: int) -> None:
        now = time.time()
        self._emit(
            {
                "event": "listening",
                "time": _iso(now),
                "channels": channels,
                "socket": socket,
                "daemon_id": daemon_id,
                "generation": generation,
            },
            f"{_stamp(now)}  listening on {', '.join(map(_printable, channels))} via {socket} "
            f"(daemon {daemon_id}, generation {generation}); Ctrl-C to stop",
        )

    def notification(self, env: Envelope) -> None:
        self._emit(
            {
                "event": "notification",
                "time": _iso(env.at),
                "channel": env.channel,
                "pid": env.pid,
                "payload": env.payload,
                "generation": env.generation,
                "seq": env.seq,
            },
            f"{_stamp(env.at)}  {_printable(env.channel)}  pid {env.pid}  "
            f"{_printable(env.payload)}",
        )

    def generation(self, previous: int, generation: int) -> None:
        now = time.time()
        why = (
            "pgbusd is listening on PostgreSQL"
            if previous == 0
            else "the relay reconnected; notifications sent in between were not delivered"
        )
        self._emit(
            {
                "event": "generation",
                "time": _iso(now),
                "generation": generation,
                "previous": previous,
            },
            f"{_stamp(now)}  === generation {previous} -> {generation}: {why} ===",
        )


async def listen(
    path: str, channels: list[str], timeout: float, printer: ListenPrinter, stop: asyncio.Event
) -> int:
    """Print what arrives on ``channels`` until ``stop`` is set; returns the exit code.

    A generation line is printed before the first notification received under the new
    generation, and after every notification of the old one.
    """
    # Subscription.recv() hands out payloads, which is what a worker acts on; an operator watching
    # the relay also wants the sending backend's pid and one stream across all channels in arrival
    # order: the bus's notification hook gives exactly that. The queue needs no bound of its own:
    # printing is synchronous, so while stdout blocks nothing is read from the daemon, and the
    # daemon's write budget bounds what can pile up.
    envelopes: asyncio.Queue[Envelope] = asyncio.Queue()

    def tap(bus: pgbus.Bus, msg: p.Notification) -> None:
        envelopes.put_nowait(
            Envelope(time.time(), msg.channel, msg.payload, msg.pid, msg.seq, bus.generation)
        )

    try:
        bus = await pgbus.connect(
            path, name="pgbusctl listen", attach_timeout=timeout, on_notification=tap
        )
    except (pgbus.PgbusError, OSError) as exc:
        _unreachable(path, exc)
        return EXIT_UNREACHABLE
    try:
        patterns = bus.channel_patterns()
        unknown = [
            ch
            for ch in channels
            if ch not in bus.channels() and not any(fnmatch.fnmatchcase(ch, g) for g in patterns)
        ]
        if unknown:
            relayed = ", ".join(bus.channels()) or "none"
            globs = f"; on demand: {', '.join(patterns)}" if patterns else ""
            click.echo(
                f"pgbusctl: pgbusd does not relay {', '.join(map(repr, unknown))} "
                f"(it relays: {relayed}{globs})",
                err=True,
            )
            return EXIT_USAGE
        watch = bus.subscribe_reconnects()
        for channel in channels:
            # The subscriptions make the bus subscribe (and re-subscribe after a re-attach); the
            # payloads are read from the hook's envelopes.
            await bus.subscribe(channel, buffer=1)
        shown = watch.borrow()
        printer.listening(channels, path, bus.daemon_id, shown)

        def show(env: Envelope) -> None:
            nonlocal shown
            if env.generation > shown:
                printer.generation(shown, env.generation)
                shown = env.generation
            printer.notification(env)

        stopping = asyncio.ensure_future(stop.wait())
        changed = asyncio.ensure_future(watch.changed())
        arrived = asyncio.ensure_future(envelopes.get())
        try:
            while not stopping.done():
                await asyncio.wait(
                    (stopping, changed, arrived), return_when=asyncio.FIRST_COMPLETED
                )
                # Oldest first: the envelope already taken, then the queue, then the generation.
                if arrived.done():
                    show(arrived.result())
                    arrived = asyncio.ensure_future(envelopes.get())
                while not envelopes.empty():
                    show(envelopes.get_nowait())
                if changed.done():
                    changed.result()
                    changed = asyncio.ensure_future(watch.changed())
                if watch.borrow() > shown:
                    printer.generation(shown, watch.borrow())
                    shown = watch.borrow()
        finally:
            for fut in (stopping, changed, arrived):
                fut.cancel()
    except pgbus.UnknownChannelError as exc:
        click.echo(f"pgbusctl: {exc}", err=True)
        return EXIT_USAGE
    finally:
        await bus.close()
    return EXIT_OK


async def _listen_until_signalled(
    path: str, channels: list[str], timeout: float, printer: ListenPrinter
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await listen(path, channels, timeout, printer, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _write_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- the commands --------------------------------------------------------------------------------


@click.group(context_settings={"auto_envvar_prefix": "PGBUSD", "max_content_width": 100})
@click.option(
    "--socket",
    default=pgbus.default_socket_path,
    show_default="$PGBUSD_SOCKET or " + pgbus.DEFAULT_SOCKET,
    help="The daemon's socket.",
    show_envvar=True,
)
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the daemon.")
@click.pass_context
def main(ctx: click.Context, socket: str, timeout: float) -> None:
    """Talk to a running pgbusd."""
    ctx.obj = {"socket": socket, "timeout": timeout}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
@click.pass_obj
def status(obj: dict[str, Any], as_json: bool) -> None:
    """Show the daemon's state.

    Exit status: 0 PostgreSQL is connected, 1 the daemon is up but PostgreSQL is not connected,
    3 the daemon is unreachable or sent a status document of another version's shape.
    """
    try:
        doc, parsed = _ask(obj["socket"], obj["timeout"])
    except _NoStatus as exc:
        click.echo(f"pgbusctl: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    # --json prints the document as the daemon sent it (a newer daemon's extra fields included).
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else render(parsed))
    if not parsed.postgres.connected:
        sys.exit(EXIT_PG_DOWN)


@main.command(name="listen")
@click.argument("channels", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def listen_command(obj: dict[str, Any], channels: tuple[str, ...], as_json: bool) -> None:
    """Print notifications on CHANNELS as pgbusd relays them, until Ctrl-C.

    Each line: the time it arrived here (UTC), the channel, the pid of the PostgreSQL backend
    that sent it, and the payload (JSON-quoted if it holds control characters). A line marked
    === says the generation changed: notifications sent while the relay was reconnecting were
    not delivered. With --json every line is a JSON object whose "event" is "listening",
    "notification" or "generation".

    Exit status: 0 on Ctrl-C or SIGTERM, 2 for a channel the daemon does not relay, 3 when the
    daemon is unreachable.
    """
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    printer = ListenPrinter(as_json, _write_line)
    unique = list(dict.fromkeys(channels))
    try:
        code = asyncio.run(_listen_until_signalled(obj["socket"], unique, obj["timeout"], printer))
    except BrokenPipeError:
        # The reader went away (`pgbusctl listen x | head`): a normal end, not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handler
        code = EXIT_OK
    sys.exit(code)


@main.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to FILE atomically (rename into place), e.g. for node_exporter's textfile "
    "collector, instead of to stdout.",
)
@click.pass_obj
def metrics(obj: dict[str, Any], output: str | None) -> None:
    """Print the daemon's counters in the Prometheus text format.

    When the daemon is unreachable, or sends a status document of another version's shape, the
    output is just pgbusd_up 0 and the exit status 3.
    """
    code = EXIT_OK
    try:
        text = prom.render(_ask(obj["socket"], obj["timeout"])[1])
    except _NoStatus as exc:
        click.echo(f"pgbusctl: {exc}", err=True)
        text, code = prom.render_unreachable(), EXIT_UNREACHABLE
    if output is None:
        click.echo(text, nl=False)
    else:
        _write_atomically(output, text)
    sys.exit(code)


@main.command()
@click.option(
    "--with-environment",
    is_flag=True,
    help="Start the successor with this command's PGBUSD_* and PG* variables instead of the "
    "running daemon's: how `systemctl reload` applies an edited environment file.",
)
@click.option(
    "--wait",
    default=60.0,
    show_default=True,
    help="Seconds to wait for the successor to take over (the daemon gives up after its "
    "--reload-timeout).",
)
@click.pass_obj
def reload(obj: dict[str, Any], with_environment: bool, wait: float) -> None:
    """Hand the daemon over to a new process started from the code installed now.

    The successor takes the socket, the lineage, every channel's sequence and the replay buffer,
    and splits the PostgreSQL stream with the running daemon exactly: clients re-attach to it
    and resume, with nothing lost or repeated and no generation step. Installing a new version
    and reloading is an upgrade. If the successor cannot take over (a configuration it refuses,
    PostgreSQL unreachable for it, new code that does not start), the running daemon serves on
    as if nothing happened and this command prints why.

    Exit status: 0 reloaded, 1 the reload failed, 3 the daemon is unreachable.
    """
    environment = None
    if with_environment:
        environment = {
            k: v
            for k, v in os.environ.items()
            if k.startswith("PG") and not k.startswith("PGBUSD_HANDOFF_")
        }

    async def ask() -> p.Reloaded:
        async with pgbus.connect(
            obj["socket"], name="pgbusctl reload", attach_timeout=obj["timeout"]
        ) as bus:
            return await bus.reload(environment, timeout=wait)

    try:
        reply = asyncio.run(ask())
    except pgbus.RequestRefusedError as exc:
        click.echo(f"pgbusctl: reload failed: {exc}", err=True)
        sys.exit(EXIT_RELOAD_FAILED)
    except (pgbus.PgbusError, OSError, TimeoutError) as exc:
        _unreachable(obj["socket"], exc)
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"reloaded: pgbusd {reply.version} (pid {reply.pid}) serves {obj['socket']}")


def _write_atomically(path: str, text: str) -> None:
    """Readers (node_exporter) see the old file or the new one, never a half-written one."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


if __name__ == "__main__":
    main(prog_name="pgbusctl")
