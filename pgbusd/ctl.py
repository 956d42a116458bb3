"""``pgbusctl``: ask a running pgbusd over its socket.

Exit codes of ``status``: 0 the daemon is up and listening on PostgreSQL, 1 the daemon is up but
PostgreSQL is not connected, 3 the daemon cannot be reached. So ``pgbusctl status`` doubles as a
health check.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from typing import Any

import click

import pgbus

EXIT_PG_DOWN = 1
EXIT_UNREACHABLE = 3


async def fetch_status(path: str, timeout: float) -> dict[str, Any]:
    async with pgbus.connect(path, name="pgbusctl", attach_timeout=timeout) as bus:
        return await asyncio.wait_for(bus.status(), timeout)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(status: dict[str, Any]) -> str:
    pg = status["postgres"]
    totals = status["totals"]
    lines = [
        f"pgbusd {status['version']}  daemon {status['daemon_id']}  pid {status['pid']}  "
        f"up {status['uptime']:.0f}s",
        f"socket      {status['socket']}",
        f"postgres    {pg['state']}  server {pg['server'] or '-'}  backend pid "
        f"{pg['backend_pid'] or '-'}",
        f"generation  {status['generation']}  reconnects {totals['reconnects']}",
        f"health      last ok {_when(pg['last_health_ok'])}  queue usage "
        f"{'-' if pg['queue_usage'] is None else format(pg['queue_usage'], '.4f')}",
    ]
    if pg["last_error"]:
        lines.append(f"last error  {pg['last_error']} ({_when(pg['last_error_at'])})")
    if pg["state"] != "connected" and pg["next_retry_at"]:
        lines.append(f"next retry  {_when(pg['next_retry_at'])}")
    lines.append("")
    lines.append(f"{'CHANNEL':<40} {'SUBSCRIBERS':>11} {'RECEIVED':>10}  LAST RECEIVED")
    for name, ch in status["channels"].items():
        lines.append(
            f"{name:<40} {ch['subscribers']:>11} {ch['received']:>10}  {_when(ch['last_received'])}"
        )
    lines.append("")
    lines.append(f"{'CLIENT PID':>10} {'UID':>6} {'SENT':>10} {'WAITING':>9}  SUBSCRIPTIONS")
    for c in status["clients"]:
        lines.append(
            f"{c['pid']:>10} {c['uid']:>6} {c['messages_sent']:>10} "
            f"{c['bytes_waiting']:>9}  {','.join(c['subscriptions']) or '-'}"
        )
    lines.append("")
    lines.append("totals      " + "  ".join(f"{k} {v}" for k, v in totals.items()))
    return "\n".join(lines)


@click.group(context_settings={"auto_envvar_prefix": "PGBUSD"})
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
    """Show the daemon's state; exit 0 only if PostgreSQL is connected."""
    try:
        doc = asyncio.run(fetch_status(obj["socket"], obj["timeout"]))
    except (pgbus.PgbusError, OSError, TimeoutError) as exc:
        click.echo(f"pgbusctl: pgbusd is unreachable at {obj['socket']}: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else render(doc))
    if not doc["postgres"]["connected"]:
        sys.exit(EXIT_PG_DOWN)
