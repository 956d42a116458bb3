"""The daemon's half of two systemd protocols, in plain Python: sd_notify and socket activation.

Neither needs libsystemd: a notification is one datagram of newline-separated ``KEY=value``
assignments sent to ``$NOTIFY_SOCKET``, and an activated socket is a file descriptor from 3 up,
announced by ``$LISTEN_FDS`` and ``$LISTEN_PID``. Outside systemd the variables are absent and
everything here is a no-op, so the daemon behaves the same when started by hand.

What the daemon tells systemd (``Type=notify``)
------------------------------------------------
- ``READY=1`` as soon as the listening socket is bound (or inherited) and accepting clients. It
  does **not** wait for PostgreSQL, on purpose. A client can attach while PostgreSQL is down: it
  gets ``Hello`` with the current generation, and the ``Generation`` tick when the connection comes
  (back). If readiness waited for PostgreSQL, a database outage would turn into a failed
  ``systemctl start`` after ``TimeoutStartSec=`` and a restart loop, and every unit ordered
  ``After=pgbusd.service`` (the workers) would be held back by an outage the client library rides
  out on its own. Whether PostgreSQL is connected is what ``STATUS=`` reports instead.
- ``STATUS=`` one line for ``systemctl status``: whether PostgreSQL is connected, the generation
  and the number of clients. It is sent with ``READY=1`` and again whenever it changes (the
  listener's state is polled every :data:`STATUS_POLL` seconds). It never carries an error text,
  which could hold a secret; the journal has the details.
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (``WatchdogSec=``), sent by a task on the event
  loop and only while the PostgreSQL listener task is running. A blocked event loop or a crashed
  listener stops the pings, and systemd kills and restarts the daemon. A PostgreSQL outage does
  not stop them: reconnecting is the listener's job, and a restart would not bring the database
  back.
- ``STOPPING=1`` when the ordered shutdown begins.

Socket activation
-----------------
:func:`inherited_socket` returns the listening socket systemd passed (``pgbusd.socket``), if any.
The daemon then serves on it instead of binding: it takes no lock, removes no stale socket and does
not unlink the socket file on exit, because the file belongs to the socket unit, which keeps
listening (and queueing clients) while the daemon restarts.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from pgbusd.ops.log import get_logger

#: Seconds between two looks at the listener's state for ``STATUS=``.
STATUS_POLL = 0.25
#: The first file descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: Variables systemd sets for this process alone (a child must not take them for its own).
OWN_VARIABLES = (*_LISTEN_VARIABLES, "WATCHDOG_PID", "WATCHDOG_USEC")


class ActivationError(OSError):
    """systemd passed something other than one listening Unix stream socket."""


class Notifier:
    """Sends sd_notify datagrams to one address; every method is a no-op without an address.

    Sending never blocks the event loop: the socket is non-blocking, and a datagram that cannot
    be sent (systemd gone, its queue full) is dropped and logged, once.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        #: Seconds between two ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self.sent = 0
        self.failures = 0
        #: The last ``STATUS=`` text sent (the heartbeat sends a status that differs from it).
        self.last_status: str | None = None
        self._sock: socket.socket | None = None
        self._target = _socket_address(address) if address else None
        self.log: Any = get_logger(component="systemd")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for through ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``."""
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"KEY=value"``) as one datagram; True if it left."""
        if self._target is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._target)
        except OSError as exc:
            self.failures += 1
            if self.failures == 1:
                self.log.warning(
                    "cannot notify systemd", notify_socket=self.address, error=repr(exc)
                )
            return False
        self.sent += 1
        for assignment in assignments:
            if assignment.startswith("STATUS="):
                self.last_status = assignment[len("STATUS=") :]
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def main_pid(self, pid: int) -> None:
        """A successor process is the service's main process now (a hand-off reload)."""
        self.send(f"MAINPID={pid}", "STATUS=handed over to a successor")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run_heartbeat(self, alive: Callable[[], bool], status: Callable[[], str]) -> None:
        """Send ``STATUS=`` on change and ``WATCHDOG=1`` on time, for as long as ``alive()``.

        Runs on the event loop, so a blocked loop sends nothing; ``alive`` says whether the rest
        of the daemon (the PostgreSQL listener) is still running. Returns at once when systemd
        asked for nothing; the caller cancels it when the daemon stops.
        """
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        interval = self.watchdog_interval
        next_ping = loop.time()
        while alive():
            # Compared with what systemd last got, not with this loop's first look: the state
            # may change between READY=1 and the first turn here (a successor's takeover).
            text = status()
            if text != self.last_status:
                self.status(text)
            if interval is not None and loop.time() >= next_ping:
                self.watchdog()
                next_ping = loop.time() + interval
            delay = STATUS_POLL
            if interval is not None:
                delay = min(delay, max(0.0, next_ping - loop.time()))
            await asyncio.sleep(delay)


def status_line(*, connected: bool, generation: int, clients: int) -> str:
    """The ``STATUS=`` text: PostgreSQL connected or not, the generation, the clients."""
    if connected:
        postgres = "PostgreSQL connected"
    elif generation == 0:
        postgres = "PostgreSQL not connected (connecting)"
    else:
        postgres = "PostgreSQL not connected (reconnecting)"
    noun = "client" if clients == 1 else "clients"
    return f"{postgres}, generation {generation}, {clients} {noun}"


def watchdog_usec(environ: Mapping[str, str] = os.environ) -> int | None:
    """``$WATCHDOG_USEC`` if systemd set it for this process (``$WATCHDOG_PID``), else None."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> int:
    """How many sockets systemd passed to this process (fds 3, 4, ...); 0 if none.

    Like ``sd_listen_fds(1)``: the ``LISTEN_*`` variables are removed so that no child process
    takes the sockets for its own, and the passed fds are marked close-on-exec.
    """
    pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    for name in _LISTEN_VARIABLES:
        environ.pop(name, None)
    if pid != str(os.getpid()) or count is None:
        return 0
    try:
        n = int(count)
    except ValueError:
        return 0
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + max(n, 0)):
        os.set_inheritable(fd, False)
    return max(n, 0)


def inherited_socket(environ: MutableMapping[str, str] = os.environ) -> socket.socket | None:
    """The listening Unix stream socket systemd passed as fd 3, or None when not activated.

    Raises ActivationError when systemd passed several sockets or something else than a
    listening Unix stream socket (``Accept=yes`` in the socket unit, for example).
    """
    n = listen_fds(environ)
    if n == 0:
        return None
    if n != 1:
        raise ActivationError(f"systemd passed {n} sockets; pgbusd serves exactly one")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.close()
        raise ActivationError(
            "the socket systemd passed is not a listening Unix stream socket "
            "(ListenStream=/run/pgbusd/... with Accept=no)"
        )
    return sock


def _socket_address(address: str) -> str:
    # A leading "@" names a socket in the abstract namespace (a NUL byte on the wire).
    return "\0" + address[1:] if address.startswith("@") else address
