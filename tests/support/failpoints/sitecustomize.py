"""Failpoints for tests: a daemon that stops (or kills) itself at a named phase of a hand-off.

Put this directory first on ``PYTHONPATH`` of the daemon under test (:func:`tests.conftest.
failpoint_env`) and name the failpoints in ``PGBUS_TEST_FAILPOINTS``, comma-separated::

    ROLE:send:MESSAGE:ACTION   after this process sent the hand-off message MESSAGE
    ROLE:recv:MESSAGE:ACTION   after this process received it

``ROLE`` is ``predecessor`` (a daemon started afresh) or ``successor`` (one started by a
reload); ``ACTION`` is ``stop`` (SIGSTOP: a frozen VM, a cgroup freeze; the test sends SIGCONT)
or ``kill`` (SIGKILL). Each fires once per process. Python imports this module at start-up
(``site``), before the daemon's own code, and wraps the hand-off's control channel, whatever
the version of the daemon (so the same test runs against older code).
"""

from __future__ import annotations

import os
import signal
from typing import Any

_SPEC = os.environ.get("PGBUS_TEST_FAILPOINTS", "")


def _install() -> None:
    role = "successor" if "PGBUSD_HANDOFF_CONTROL_FD" in os.environ else "predecessor"
    points: dict[tuple[str, str], int] = {}
    for item in filter(None, (part.strip() for part in _SPEC.split(","))):
        who, direction, message, action = item.split(":")
        if who == role:
            points[(direction, message)] = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}[action]
    if not points:
        return
    from pgbusd import handoff

    control: Any = handoff.Control
    send, receive = control.send, control.receive

    def fire(direction: str, message: object) -> None:
        sig = points.pop((direction, type(message).__name__), None)
        if sig is not None:
            os.kill(os.getpid(), sig)

    async def send_then(self: Any, message: Any) -> None:
        await send(self, message)
        fire("send", message)

    async def receive_then(self: Any) -> Any:
        message = await receive(self)
        fire("recv", message)
        return message

    control.send = send_then
    control.receive = receive_then


if _SPEC:
    _install()
