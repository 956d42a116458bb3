"""The running daemon's side of a hand-off reload (steps 1, 3, 4 and 5 of :mod:`pgbusd.handoff`).

:meth:`Predecessor.reload` starts the successor, ships the replay buffer, splits the stream at
the marker, sends the state, and returns once the successor serves; the daemon then winds down.
Until the state is sent, any failure leaves the daemon serving as before. After it, the
successor's word decides (see the package docstring): the predecessor serves on only once the
successor cannot serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pgbusd.handoff import protocol as h
from pgbusd.handoff.successor import Listens

if TYPE_CHECKING:
    from pgbusd.config import Config
    from pgbusd.core.channels import ChannelDirectory
    from pgbusd.core.hub import Hub

#: How long a predecessor that met its deadline after the state went out still waits for the
#: successor's word (an answer already on its way: a predecessor frozen past its deadline finds
#: it at once), before it stops the successor for good.
LAST_WORD_GRACE = 1.0


class Splitter(Protocol):
    """What the predecessor needs of the PostgreSQL listener."""

    @property
    def connected(self) -> bool: ...

    async def split(self, marker_channel: str, token: str, timeout: float) -> None: ...

    def release_split(self) -> None: ...


class Splittable(Splitter, Listens, Protocol):
    """A feed a reload can hand over: the PostgreSQL listener (both sides of the split)."""


@dataclass(frozen=True)
class Inheritance:
    """What the running daemon hands its successor besides its state: the listening socket,
    the lock, the metrics socket, and what the successor must agree with."""

    listen_fd: int
    lock_fd: int | None
    #: Whether this daemon bound the socket file itself (else systemd did).
    owns_path: bool
    socket_path: str
    #: The fleet role ("" for a plain daemon).
    role: str
    watchdog_usec: int
    metrics_fd: int | None = None
    metrics_address: str | None = None


@dataclass(frozen=True)
class Handed:
    """A reload that succeeded: the successor (``pid``, running ``version``) serves."""

    pid: int
    version: str
    control: h.Control


def reason_of(exc: BaseException, timeout: float) -> str:
    """What a reload that failed with ``exc`` tells the operator."""
    if isinstance(exc, TimeoutError):
        return f"the successor did not take over within {timeout:g} s (--reload-timeout)"
    if isinstance(exc, h.HandoffError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


async def end_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a successor that will not take over (SIGTERM, then SIGKILL) and reap it."""
    deadline = time.monotonic() + grace
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    while proc.poll() is None:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            deadline = float("inf")
        await asyncio.sleep(0.02)


async def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` (a stopped process too) and reap it: it can serve nobody after this."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    while proc.poll() is None:
        await asyncio.sleep(0.01)


class Predecessor:
    """One reload from the running daemon's side. Runtime state only."""

    def __init__(
        self,
        config: Config,
        hub: Hub,
        listener: Splitter,
        channels: ChannelDirectory,
        log: Any,
    ) -> None:
        self.config = config
        self.hub = hub
        self.listener = listener
        self.channels = channels
        self.log = log

    async def reload(self, inheritance: Inheritance, environment: dict[str, str] | None) -> Handed:
        """Hand over to a successor started from the code installed now; returns once it
        serves. HandoffError says why not, with this daemon serving on as before.
        ``environment``: the successor's PGBUSD_* and PG* variables instead of this daemon's."""
        if not self.listener.connected:
            raise h.HandoffError(
                "PostgreSQL is not connected, so there is no stream to split: reload once it "
                "is, or restart (one generation step)"
            )
        self.log.info("reload: starting a successor")
        timeout = self.config.reload_timeout
        successor: subprocess.Popen[bytes] | None = None
        control: h.Control | None = None
        try:
            ours, theirs = socket.socketpair()
            marker = f"pgbusd.handoff.{secrets.token_hex(8)}"
            deadline = time.monotonic() + timeout
            with ours, theirs:
                successor = self._spawn(theirs, marker, inheritance, environment, deadline)
                theirs.close()
                control = await h.Control.open(ours.dup())
            async with asyncio.timeout(timeout):
                listening = await self._from(successor, control.expect(h.Listening, None))
                assert isinstance(listening, h.Listening)
                if listening.protocol != h.PROTOCOL:
                    raise h.HandoffError(
                        f"the successor (pgbusd {listening.version}) speaks hand-off protocol"
                        f" {listening.protocol}, this daemon {h.PROTOCOL}: restart instead"
                    )
                bulk, since = await self.hub.export_replay()  # the rest goes at the split
                await control.send(h.Replay(bulk))
            with self.channels.frozen() as freeze:  # the channel set stays as Split names it
                try:
                    async with asyncio.timeout_at(_loop_time(deadline)):
                        token = secrets.token_hex(8)
                        await control.send(h.Split(token, list(self.hub.channels)))
                        await self._from(successor, control.expect(h.Ready, None))
                        await self.listener.split(marker, token, timeout)
                        await control.send(h.State.of(self.hub.snapshot(since)))
                    # The successor may serve from now on: its word decides.
                    refusal = await self._refusal(successor, control, deadline)
                    if refusal is not None:
                        raise h.HandoffError(refusal)
                except BaseException:
                    self.listener.release_split()  # before the channel set thaws
                    raise
                freeze.hand_over()  # the successor LISTENs from now on, never this daemon
        except BaseException as exc:
            reason = reason_of(exc, timeout)
            if control is not None:
                with contextlib.suppress(Exception):
                    await control.send(h.Abort(reason))
                control.close()
            if successor is not None:
                await end_process(successor)
            self.log.error("reload failed: serving on", reason=reason)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise h.HandoffError(reason) from exc
        return Handed(successor.pid, listening.version, control)

    async def _refusal(
        self, successor: subprocess.Popen[bytes], control: h.Control, deadline: float
    ) -> str | None:
        """After the state went out: None if the successor serves, else why not. Its
        ``Serving`` says it does (read however late: it may have waited while this process was
        frozen past the deadline); its ``Abort`` or its exit says it does not; silence past the
        deadline, and a short grace for a word already on its way, stops it for good (SIGKILL:
        it serves nobody after that)."""
        reason = (
            f"the successor did not take over within {self.config.reload_timeout:g} s "
            "(--reload-timeout); it was stopped"
        )
        for wait in (max(0.0, deadline - time.monotonic()), LAST_WORD_GRACE):
            try:
                await self._from(successor, control.expect(h.Serving, wait))
                return None
            except TimeoutError:
                continue
            except h.HandoffError as exc:
                reason = str(exc)
                break
        await kill_process(successor)
        return reason

    def _spawn(
        self,
        control: socket.socket,
        marker: str,
        inheritance: Inheritance,
        environment: dict[str, str] | None,
        deadline: float,
    ) -> subprocess.Popen[bytes]:
        """Start the installed pgbusd (:func:`h.daemon_command`) with this daemon's arguments,
        the sockets and the lock."""
        env = dict(os.environ)
        if environment is not None:
            env = {k: v for k, v in env.items() if not k.startswith("PG")}
            env.update({k: v for k, v in environment.items() if k.startswith("PG")})
        from pgbusd.ops import sdnotify

        for name in (*h.ALL_ENV, *sdnotify.OWN_VARIABLES):
            env.pop(name, None)
        fds = [control.fileno(), inheritance.listen_fd]
        env.update(
            {
                h.ENV_CONTROL: str(control.fileno()),
                h.ENV_LISTEN: str(inheritance.listen_fd),
                h.ENV_LOCK: str(inheritance.lock_fd if inheritance.lock_fd is not None else -1),
                h.ENV_MARKER: marker,
                h.ENV_OWNS_PATH: "1" if inheritance.owns_path else "0",
                h.ENV_WATCHDOG: str(inheritance.watchdog_usec),
                h.ENV_SOCKET: inheritance.socket_path,
                h.ENV_ROLE: inheritance.role,
                h.ENV_METRICS_FD: str(
                    inheritance.metrics_fd if inheritance.metrics_fd is not None else -1
                ),
                h.ENV_METRICS_ADDRESS: inheritance.metrics_address or "",
                h.ENV_DEADLINE: repr(deadline),
            }
        )
        if inheritance.lock_fd is not None:
            fds.append(inheritance.lock_fd)
        if inheritance.metrics_fd is not None:
            fds.append(inheritance.metrics_fd)
        return subprocess.Popen(
            h.daemon_command(sys.argv[1:]),
            env=env,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )

    async def _from(
        self, successor: subprocess.Popen[bytes], waiting: Awaitable[h.ControlMessage]
    ) -> h.ControlMessage:
        """What the successor says next; HandoffError with its exit status if it dies first
        (or closes the channel by dying)."""
        message = asyncio.ensure_future(waiting)
        try:
            while True:
                done, _ = await asyncio.wait((message,), timeout=0.05)
                if done:
                    try:
                        return message.result()
                    except h.ChannelClosed:
                        code = await _exit_status(successor)
                        if code is not None:
                            raise _exited(code) from None
                        raise
                code = successor.poll()
                if code is not None:
                    raise _exited(code)
        finally:
            message.cancel()


def _exited(code: int) -> h.HandoffError:
    return h.HandoffError(
        f"the successor exited with status {code} before it took over (its log says why)"
    )


async def _exit_status(proc: subprocess.Popen[bytes], wait: float = 0.5) -> int | None:
    """``proc``'s exit status if it exits within ``wait`` seconds (a closed hand-off channel is
    most often a successor on its way out), else None."""
    deadline = time.monotonic() + wait
    while (code := proc.poll()) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return code


def _loop_time(deadline: float) -> float:
    """``deadline`` (time.monotonic) on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
