"""The ``pgbusd`` command: options (generated from Config) in, a running daemon out. No logic."""

from __future__ import annotations

import os
import signal
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import click
from click.core import ParameterSource

from pgbusd import handoff
from pgbusd.config import Config, ConfigError

F = Callable[..., Any]


class _Octal(click.ParamType):  # type: ignore[type-arg]
    name = "octal"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 8)
        except ValueError:
            self.fail(f"{value!r} is not an octal mode such as 0660", param, ctx)


def config_options(func: F) -> F:
    """Decorate ``func`` with one click option per Config field (help and details from it)."""
    hints = typing.get_type_hints(Config)
    for f in reversed(fields(Config)):
        extra = dict(f.metadata["click"])
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "show_envvar": True}
        if "choice" in extra:
            kwargs["type"] = click.Choice(extra.pop("choice"))
        elif f.name == "socket_mode":
            kwargs["type"] = _Octal()
        elif hints[f.name] in (int, float):
            kwargs["type"] = hints[f.name]
        if f.default is not MISSING and not extra.get("multiple"):
            kwargs["default"] = f.default
            kwargs["show_default"] = (
                f"{f.default:04o}" if f.name == "socket_mode" else f.default is not None
            )
        kwargs.update(extra)
        func = click.option("--" + f.name.replace("_", "-"), f.name, **kwargs)(func)
    return func


@click.command(context_settings={"auto_envvar_prefix": "PGBUSD", "max_content_width": 100})
@config_options
@click.version_option(package_name="pgbusd")
def main(**options: Any) -> None:
    """Relay PostgreSQL LISTEN/NOTIFY to local processes over a Unix socket.

    Holds the host's single LISTEN connection and streams notifications and
    reconnect-generation ticks to pgbus clients. Every option is also an
    environment variable (PGBUSD_DSN, PGBUSD_CHANNEL, PGBUSD_SOCKET, ...).
    """
    # A SIGHUP asks a serving daemon to reload; one that comes while it is still starting (an
    # operator's kill -HUP, a script) must not kill it: ignored until the server takes it over
    # (an exec keeps it ignored: the re-exec below, whose process starts with it so).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = Config(**options)
    except ConfigError as exc:
        option = f"--{exc.option.replace('_', '-')}"
        # A reload's successor tells its predecessor why it will not take over.
        handoff.report_failure(f"the successor refuses its configuration: {option}: {exc}")
        raise click.BadParameter(str(exc), param_hint=option) from None
    ctx = click.get_current_context()
    moved = {
        name: value
        for name, value in config.secret_bearing().items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    if moved:
        _reexec_without_secrets_in_argv(moved)
    from pgbusd.app import run

    sys.exit(run(config))


def _reexec_without_secrets_in_argv(moved: dict[str, str]) -> None:
    """Re-execute with the options in ``moved`` (``{"dsn": value, ...}``) moved from argv to
    their PGBUSD_* variables.

    /proc/PID/cmdline (the process title in ps and top) is readable by every user on the host,
    /proc/PID/environ only by the same user and root. The pid stays the same.
    """
    flags = tuple(f"--{name.replace('_', '-')}" for name in moved)
    args: list[str] = []
    argv = iter(sys.argv[1:])
    for arg in argv:
        if arg in flags:
            next(argv, None)
        elif not arg.startswith(tuple(f"{flag}=" for flag in flags)):
            args.append(arg)
    env = {**os.environ, **{f"PGBUSD_{name.upper()}": value for name, value in moved.items()}}
    command = handoff.daemon_command(args)
    os.execve(command[0], command, env)
