"""Small clients that the systemd lab runs inside itself, as one user or another.

The lab passes this file's source to the interpreter of the installed pgbusd (``python -c``), so
that a user of the lab needs no access to the checkout. Output is JSON lines, one per event.

Usage:
  attach [SOCKET]  try to attach once (default socket: the library's); prints
                   {"event": "attached", "channels": [...]} or
                   {"event": "refused", "error": "...", "cause": "..."}
  raw SOCKET       attach with the bare protocol and print every message the daemon sends,
                   {"event": "Hello"}, {"event": "Goodbye", "reason": "..."}, ..., then
                   {"event": "eof"} when the daemon closes the connection

For a subscriber that prints what it receives, the lab uses ``tests/support/clientproc.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import pgbus
from pgbus import protocol as p


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def attach(path: str | None) -> None:
    try:
        async with pgbus.connect(path, attach_timeout=10) as bus:
            emit(event="attached", channels=bus.channels())
    except pgbus.DaemonUnavailableError as exc:
        emit(event="refused", error=str(exc), cause=repr(exc.__cause__))


def raw(path: str) -> None:
    decoder = p.server_decoder()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(p.encode_frame(p.Attach(p.PROTOCOL_VERSION, os.getpid(), "lab-raw")))
        while data := sock.recv(65536):
            for message in decoder.feed(data):
                fields = {"reason": message.reason} if isinstance(message, p.Goodbye) else {}
                emit(event=type(message).__name__, **fields)
    emit(event="eof")


def main(argv: list[str]) -> None:
    match argv:
        case ["attach"]:
            asyncio.run(attach(None))
        case ["attach", path]:
            asyncio.run(attach(path))
        case ["raw", path]:
            raw(path)
        case _:
            sys.exit(f"usage: {__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
