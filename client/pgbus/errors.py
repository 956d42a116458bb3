"""The error vocabulary of the pgbus client library (and the wire protocol).

Every error the library raises derives from :class:`PgbusError`. Where a builtin says the same
thing, the error also derives from it, so ``except ConnectionError`` keeps working.
"""

from __future__ import annotations


class PgbusError(Exception):
    """Base class of every error raised by pgbus."""


class ProtocolError(PgbusError, ValueError):
    """Bytes on the socket that are not a valid pgbus frame (or the wrong frame for this side).

    ``code`` is the short machine-readable reason that also travels in an ``Error`` frame.
    """

    def __init__(self, message: str, *, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class UnknownChannelError(PgbusError, LookupError):
    """The daemon does not relay the channel: not registered, nor allowed by its patterns."""

    def __init__(self, channel: str) -> None:
        super().__init__(
            f"channel {channel!r} is neither registered with the daemon nor allowed by its "
            "channel patterns"
        )
        self.channel = channel


class LaggedError(PgbusError):
    """The subscriber fell behind: ``skipped`` payloads were dropped (the oldest ones).

    The next ``recv()`` continues with the oldest payload still buffered. A subscriber that cannot
    tolerate the loss should resync from the database, exactly as on a generation change.
    ``channel`` names the subscription's channel when the error comes from one.
    """

    def __init__(self, skipped: int, channel: str | None = None) -> None:
        where = f" on {channel!r}" if channel is not None else ""
        super().__init__(f"subscriber lagged{where}: {skipped} notification(s) skipped")
        self.skipped = skipped
        self.channel = channel


class PayloadDecodeError(PgbusError, ValueError):
    """A payload of a typed subscription is not valid JSON for the subscription's type.

    Raised by the ``recv()`` that reached the payload; ``payload`` is the raw string exactly as
    PostgreSQL delivered it and the decoder's error is chained as the cause. Only that payload is
    consumed: the subscription keeps working, and the next ``recv()`` returns the next one.
    """

    def __init__(self, channel: str, payload: str, reason: str) -> None:
        super().__init__(f"payload on {channel!r} does not decode: {reason}")
        self.channel = channel
        self.payload = payload


class DaemonUnavailableError(PgbusError, ConnectionError):
    """The daemon's socket could not be reached, or it refused this client."""


class BusClosedError(PgbusError, ConnectionError):
    """The bus (or the subscription) was closed by this process; it will deliver nothing more."""


class RequestRefusedError(PgbusError):
    """The daemon answered a request with an error frame (``code`` says why)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class SubscriptionRefusedError(RequestRefusedError):
    """The daemon refused a subscription this process still holds: it has ended.

    Raised by ``recv()``, iteration and a selector once the subscription's buffered payloads are
    taken, every time, so that a worker's loop ends loudly rather than quietly. It happens when the
    bus re-attaches (the daemon restarted or the connection was lost) and the daemon no longer
    relays the channel to this client: the channel was dropped from its configuration, or an ACL
    was tightened. ``code`` is the daemon's reason (``unknown_channel``, ``forbidden``, ...);
    the error ``subscribe()`` would have raised is chained as the cause. Compare
    :class:`BusClosedError`, which means this process closed the subscription or its bus.
    """

    def __init__(self, channel: str, message: str, *, code: str) -> None:
        super().__init__(
            f"the daemon refused the subscription to {channel!r}: {message}", code=code
        )
        self.channel = channel
