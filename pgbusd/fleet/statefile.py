"""A host's state file: where it is in the stream, kept across restarts.

It holds, after the last message the host applied, the stream sequence and message id,
lineage, generation, local steps, position, the per-channel seq vector and when the newest
message it applied was stored (:class:`HostState`, JSON). It is written atomically (a
temporary file, fsync, rename, fsync of the directory) by :mod:`pgbusd.fleet.source`, at most
every half second while messages flow, and on stop. Losing the last writes (a crash, a power
loss) only makes the next start read a little more; a state file that is gone makes the host
start as a new one (its clients step once). A state file that cannot be (it does not decode,
or holds impossible values: a negative sequence, generation, local step count or seq; a
position without a lineage) is *corrupt*: :meth:`StateFile.load` says why, and the host
starts as a new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec

Count = Annotated[int, msgspec.Meta(ge=0)]


class HostState(msgspec.Struct):
    """What a host keeps across restarts (JSON). Counts are never negative."""

    stream: str
    lineage: str | None
    stream_seq: Count
    generation: Count
    local_steps: Count
    seqs: dict[str, Count]
    mark: str | None = None
    off: Count = 0
    #: The message id of the message at ``stream_seq`` (checked against the stream at start).
    msg_id: str | None = None
    #: When the stream stored the newest message the host applied (nanoseconds since the
    #: epoch, the server's clock; 0: not known): a stream that went back is re-read until it
    #: holds something newer (:mod:`pgbusd.fleet.hostview`).
    stored_at: Count = 0


class StateFile:
    """The host's state file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: Why the last :meth:`load` found the file unusable (None: it was fine, or absent).
        self.corrupt: str | None = None

    def load(self) -> HostState | None:
        """The state kept, or None (absent, or corrupt: :attr:`corrupt` says why)."""
        self.corrupt = None
        try:
            state = msgspec.json.decode(self.path.read_bytes(), type=HostState)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.corrupt = str(exc)
            return None
        if state.stream_seq > 0 and state.lineage is None:
            self.corrupt = "a stream position without a lineage"
            return None
        return state

    def save(self, state: HostState) -> None:
        """Replace the file with ``state``, atomically and durably (blocking: call it off the
        event loop)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = msgspec.json.encode(state)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
