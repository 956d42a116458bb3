"""Hand-off reload: a running daemon hands its socket, its lineage and its stream to a successor.

``pgbusctl reload``, SIGHUP and ``systemctl reload`` replace the running daemon (the
*predecessor*) with a new process started from the code installed on disk (the *successor*),
so that installing a new version and reloading is an upgrade. Clients lose nothing, see nothing
twice and their generation does not move. How:

1. The predecessor starts the successor as its child, with the listening socket (and its lock
   file) inherited, a socketpair for this module's control messages, and the name of a fresh
   *marker channel* in its environment.
2. The successor reads its configuration (a refused one ends the reload here), connects to
   PostgreSQL and LISTENs on every channel and on the marker channel, holding back everything it
   receives; then it says ``Listening``.
3. The predecessor ships its replay buffer as it is (``Replay``: the bulk of it, while it
   still relays; the successor takes it meanwhile). Then it freezes its channel set (channels
   on demand wait), sends ``Split``: the marker's payload and every channel it listens on now,
   which the successor LISTENs on too before it says ``Ready``. Then the predecessor LISTENs
   on the marker channel and commits one NOTIFY on it. PostgreSQL delivers every notification
   to every listener from one queue, in commit order, so the marker stands at the same place
   in both streams: the predecessor relays everything before it and holds back everything
   after it; the successor drops everything it held before it and keeps everything after it.
4. At the marker the predecessor seals what it relayed and sends its ``State``: lineage (daemon
   id), generation, every channel's seq, and the frames its replay buffer kept since the
   ``Replay`` (a few, however large the buffer: the split waits for those only). The
   successor takes it, relays what it kept after the marker with the seqs that follow, starts
   accepting clients on the inherited socket, and says ``Serving``.
5. The predecessor stops accepting, tells systemd the successor is the main process now
   (``MAINPID=``), says ``Main`` to the successor (which then takes over the watchdog), tells
   its clients ``Goodbye(reload)`` and exits 0, leaving the socket file and the lock to the
   successor. The clients re-attach at once and resume: the same daemon id and generation, and
   the replay buffer covers whatever they had not read yet.

Until ``Serving`` nothing is final: if the successor fails at any step (a configuration it
refuses, an import error in new code, PostgreSQL unreachable within ``--reload-timeout``, the
marker never seen), the predecessor relays what it held back and serves on as if nothing had
happened, and the reload reports why. Both number the notifications after the marker alike (the
same state, the same stream), so even a successor that dies after serving a few clients leaves
them nothing to reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final

import msgspec

from pgbusd.replay import ReplayExport

#: Environment of a successor: the control socket, the listening socket, the lock (or -1), the
#: marker channel, and whether the predecessor bound the socket file itself (1) or systemd did.
ENV_CONTROL: Final = "PGBUSD_HANDOFF_CONTROL_FD"
ENV_LISTEN: Final = "PGBUSD_HANDOFF_LISTEN_FD"
ENV_LOCK: Final = "PGBUSD_HANDOFF_LOCK_FD"
ENV_MARKER: Final = "PGBUSD_HANDOFF_MARKER"
ENV_OWNS_PATH: Final = "PGBUSD_HANDOFF_OWNS_PATH"
ENV_WATCHDOG: Final = "PGBUSD_HANDOFF_WATCHDOG_USEC"
ALL_ENV: Final = (ENV_CONTROL, ENV_LISTEN, ENV_LOCK, ENV_MARKER, ENV_OWNS_PATH, ENV_WATCHDOG)

_HEADER: Final = struct.Struct(">I")
#: A State carries at most the replay buffer (--replay-bytes) and some bookkeeping.
MAX_MESSAGE: Final = 1 << 31

#: The version of the messages below. The successor states its own in ``Listening`` (the first
#: message, whose shape never changes); the predecessor refuses any other before it splits
#: anything, so that a reload across a change of these messages fails cleanly (restart instead)
#: in either direction, upgrade or downgrade. Step it whenever a message below changes.
PROTOCOL: Final = 1


class HandoffError(Exception):
    """A hand-off cannot go on; the message says why (shown by ``pgbusctl reload``)."""


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


class ChannelSnapshot(msgspec.Struct, array_like=True):
    name: str
    #: The seq the channel's next notification carries.
    next_seq: int
    last_received: float | None
    #: A --channel, or a channel of --channel-pattern listened to on demand.
    pinned: bool = True


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
            raise HandoffError("the other process closed the hand-off channel") from exc
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
    return Inherited(
        control=control,
        listen=listen,
        lock_fd=lock if lock >= 0 else None,
        marker=values[ENV_MARKER],
        owns_path=values[ENV_OWNS_PATH] == "1",
        watchdog_usec=watchdog or None,
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
