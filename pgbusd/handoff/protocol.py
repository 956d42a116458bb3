"""The hand-off's wire: the control messages both processes exchange, and what a successor is
given in its environment (see :mod:`pgbusd.handoff` for the procedure)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from pgbusd.core.hub import ChannelSnapshot, HubSnapshot
from pgbusd.core.replay import ReplayExport

#: Environment of a successor: the control socket, the listening socket, the lock (or -1), the
#: marker channel, whether the predecessor bound the socket file itself (1) or systemd did, the
#: watchdog, the predecessor's socket path and role (settings a reload cannot change), and its
#: metrics listening socket (or -1) with the address it was configured with. A successor started
#: by a predecessor that did not set the last ones checks nothing against them.
ENV_CONTROL: Final = "PGBUSD_HANDOFF_CONTROL_FD"
ENV_LISTEN: Final = "PGBUSD_HANDOFF_LISTEN_FD"
ENV_LOCK: Final = "PGBUSD_HANDOFF_LOCK_FD"
ENV_MARKER: Final = "PGBUSD_HANDOFF_MARKER"
ENV_OWNS_PATH: Final = "PGBUSD_HANDOFF_OWNS_PATH"
ENV_WATCHDOG: Final = "PGBUSD_HANDOFF_WATCHDOG_USEC"
ENV_SOCKET: Final = "PGBUSD_HANDOFF_SOCKET"
ENV_ROLE: Final = "PGBUSD_HANDOFF_ROLE"
ENV_METRICS_FD: Final = "PGBUSD_HANDOFF_METRICS_FD"
ENV_METRICS_ADDRESS: Final = "PGBUSD_HANDOFF_METRICS_ADDRESS"
#: When the predecessor gives up (time.monotonic(): CLOCK_MONOTONIC, the same in every process).
ENV_DEADLINE: Final = "PGBUSD_HANDOFF_DEADLINE"
ALL_ENV: Final = (
    ENV_CONTROL,
    ENV_LISTEN,
    ENV_LOCK,
    ENV_MARKER,
    ENV_OWNS_PATH,
    ENV_WATCHDOG,
    ENV_SOCKET,
    ENV_ROLE,
    ENV_METRICS_FD,
    ENV_METRICS_ADDRESS,
    ENV_DEADLINE,
)

_HEADER: Final = struct.Struct(">I")
#: A State carries at most the replay buffer (--replay-bytes) and some bookkeeping.
MAX_MESSAGE: Final = 1 << 31

#: The version of the messages below. The successor states its own in ``Listening`` (the first
#: message, whose shape never changes); the predecessor refuses any other before it splits
#: anything, so that a reload across a change of these messages fails cleanly (restart instead)
#: in either direction, upgrade or downgrade. Step it whenever a message below changes.
PROTOCOL: Final = 1


def daemon_command(args: Sequence[str]) -> list[str]:
    """The command that runs the pgbusd installed now with ``args``: this interpreter, with
    ``-P`` so that nothing from the working directory goes on ``sys.path`` (a ``pgbusd/``
    folder in a checkout, or planted in a world-writable directory, is never imported)."""
    return [sys.executable, "-P", "-m", "pgbusd", *args]


class HandoffError(Exception):
    """A hand-off cannot go on; the message says why (shown by ``pgbusctl reload``)."""


class ChannelClosed(HandoffError):
    """The other process closed the hand-off channel (it exited, most often)."""


class Message(msgspec.Struct, tag_field="t", array_like=True):
    pass


class Listening(Message, tag="listening"):
    """Successor: connected to PostgreSQL, LISTENing on every channel and the marker channel.
    Its shape stays as it is in every version (see :data:`PROTOCOL`)."""

    pid: int
    version: str
    #: The successor's :data:`PROTOCOL` (0: a successor from before there was one).
    protocol: int = 0


class Split(Message, tag="split"):
    """Predecessor: the marker notification about to be committed carries ``token``; before it
    is, LISTEN on ``channels`` too (its channels now; none change until the hand-off ends) and
    say Ready."""

    token: str
    channels: list[str] = msgspec.field(default_factory=list)


class Ready(Message, tag="ready"):
    """Successor: LISTENing on every channel the Split named."""


class Replay(Message, tag="replay"):
    """Predecessor: its replay buffer as it is now (the bulk of it, shipped while it still
    relays, so that the successor takes it before the split costs anyone a wait)."""

    frames: ReplayExport


class State(Message, tag="state"):
    """Predecessor: everything clients rely on, as of the marker: the frames of the replay
    buffer kept since the Replay, and every channel's seq."""

    daemon_id: str
    generation: int
    channels: list[ChannelSnapshot]
    #: The lineage's count of notifications received, and its seq floor (see Hub.seq_floor).
    received: int
    seq_floor: int
    frames: ReplayExport

    @classmethod
    def of(cls, snapshot: HubSnapshot) -> State:
        return cls(
            snapshot.daemon_id,
            snapshot.generation,
            snapshot.channels,
            snapshot.received,
            snapshot.seq_floor,
            snapshot.frames,
        )

    def snapshot(self) -> HubSnapshot:
        """What the hub continues from."""
        return HubSnapshot(
            self.daemon_id,
            self.generation,
            self.channels,
            self.received,
            self.seq_floor,
            self.frames,
        )


class Serving(Message, tag="serving"):
    """Successor: state taken, relaying from the marker on, accepting clients."""

    pid: int


class Main(Message, tag="main"):
    """Predecessor: systemd was told the successor is the main process; it owns the watchdog."""


class Abort(Message, tag="abort"):
    """Either side: the hand-off is off, and why."""

    reason: str


ControlMessage = Listening | Replay | Split | Ready | State | Serving | Main | Abort

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(ControlMessage)


class Control:
    """One end of the control socketpair: length-prefixed msgpack messages, asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Control:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, message: ControlMessage) -> None:
        body = _encoder.encode(message)
        self._writer.write(_HEADER.pack(len(body)) + body)
        await self._writer.drain()

    async def receive(self) -> ControlMessage:
        """The next message; HandoffError when the other side is gone or speaks nonsense."""
        try:
            (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
            if size > MAX_MESSAGE:
                raise HandoffError(f"control message of {size} bytes")
            return _decoder.decode(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed("the other process closed the hand-off channel") from exc
        except msgspec.DecodeError as exc:
            raise HandoffError(f"malformed hand-off message: {exc}") from exc

    async def expect(self, kind: type[Message], timeout: float | None) -> ControlMessage:
        """The next message, which must be ``kind`` (an Abort raises its reason)."""
        async with asyncio.timeout(timeout):
            message = await self.receive()
        if isinstance(message, Abort):
            raise HandoffError(message.reason)
        if not isinstance(message, kind):
            raise HandoffError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    def close(self) -> None:
        self._writer.close()


@dataclass(frozen=True)
class Inherited:
    """What a successor was handed by its predecessor (see :func:`inherited`)."""

    control: socket.socket
    listen: socket.socket
    lock_fd: int | None
    marker: str
    owns_path: bool
    watchdog_usec: int | None
    #: The predecessor's --socket and fleet role ("" for a plain daemon); None: not told.
    socket_path: str | None = None
    role: str | None = None
    #: The predecessor's metrics listening socket and its --metrics-address, if it served one.
    metrics: socket.socket | None = None
    metrics_address: str | None = None
    #: When the predecessor gives up on this successor (time.monotonic()), if it said.
    deadline: float | None = None

    def refusal(self, socket_path: str, role: str | None) -> str | None:
        """Why a successor configured with ``socket_path`` and fleet ``role`` cannot take over
        (a setting a reload cannot change), or None."""
        if self.socket_path is not None and socket_path != self.socket_path:
            return (
                f"--socket (PGBUSD_SOCKET) cannot change on a reload: the running daemon serves "
                f"{self.socket_path!r}, the successor was given {socket_path!r}; restart instead"
            )
        if self.role is not None and (role or "") != self.role:
            shown = {"": "a plain daemon", "bridge": "a bridge", "host": "a host"}
            return (
                "the fleet role (--publish, --source) cannot change on a reload: the running "
                f"daemon is {shown.get(self.role, self.role)}, the successor would be "
                f"{shown.get(role or '', role)}; restart instead"
            )
        return None

    def refuse(self, reason: str) -> None:
        """Tell the predecessor why this successor will not take over (before anything)."""
        body = _encoder.encode(Abort(reason))
        with contextlib.suppress(OSError):
            self.control.sendall(_HEADER.pack(len(body)) + body)


def inherited(environ: MutableMapping[str, str] | None = None) -> Inherited | None:
    """The hand-off this process was started for, or None (a plain start). The variables are
    removed, so that no child of this process takes them for its own."""
    env = os.environ if environ is None else environ
    if ENV_CONTROL not in env:
        return None
    values = {name: env.pop(name, "") for name in ALL_ENV}
    control = socket.socket(fileno=int(values[ENV_CONTROL]))
    listen = socket.socket(fileno=int(values[ENV_LISTEN]))
    lock = int(values[ENV_LOCK])
    for sock in (control, listen):
        sock.set_inheritable(False)
    if lock >= 0:
        os.set_inheritable(lock, False)
    watchdog = int(values[ENV_WATCHDOG] or 0)
    metrics_fd = int(values[ENV_METRICS_FD] or -1)
    metrics = socket.socket(fileno=metrics_fd) if metrics_fd >= 0 else None
    if metrics is not None:
        metrics.set_inheritable(False)
    return Inherited(
        control=control,
        listen=listen,
        lock_fd=lock if lock >= 0 else None,
        marker=values[ENV_MARKER],
        owns_path=values[ENV_OWNS_PATH] == "1",
        watchdog_usec=watchdog or None,
        socket_path=values[ENV_SOCKET] or None,
        role=values[ENV_ROLE] if values[ENV_SOCKET] else None,
        metrics=metrics,
        metrics_address=values[ENV_METRICS_ADDRESS] or None,
        deadline=float(values[ENV_DEADLINE]) if values[ENV_DEADLINE] else None,
    )


def report_failure(reason: str, environ: Mapping[str, str] | None = None) -> None:
    """A successor that cannot even start (its configuration) says why, if it is one."""
    env = os.environ if environ is None else environ
    fd = env.get(ENV_CONTROL)
    if fd is None:
        return
    body = _encoder.encode(Abort(reason))
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), _HEADER.pack(len(body)) + body)
