"""pgbus: the client library of pgbusd, the per-host PostgreSQL LISTEN/NOTIFY relay.

.. code-block:: python

    async with pgbus.connect() as bus:
        watch = bus.subscribe_reconnects()
        async with await bus.subscribe("forge_changes") as sub:
            payload = await sub.recv()

The blocking client for threaded workers is :mod:`pgbus.sync` (``pgbus.sync.connect()``); see
docs/client.md for both, for typed payloads and for waiting on several subscriptions at once.
Both are drivers of one I/O-free protocol engine, ``pgbus._engine``.
"""

from pgbus import sync
from pgbus._client import Bus, connect
from pgbus._engine import (
    DEFAULT_BUFFER,
    DEFAULT_SOCKET,
    Event,
    GenerationChanged,
    Lagged,
    Received,
    SubscriptionStatistics,
    default_socket_path,
)
from pgbus._subscription import GenerationWatch, Selector, Subscription
from pgbus.backoff import Backoff
from pgbus.errors import (
    BusClosedError,
    DaemonUnavailableError,
    LaggedError,
    PayloadDecodeError,
    PgbusError,
    ProtocolError,
    RequestRefusedError,
    SubscriptionRefusedError,
    UnknownChannelError,
)
from pgbus.protocol import PROTOCOL_VERSION

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_SOCKET",
    "PROTOCOL_VERSION",
    "Backoff",
    "Bus",
    "BusClosedError",
    "DaemonUnavailableError",
    "Event",
    "GenerationChanged",
    "GenerationWatch",
    "Lagged",
    "LaggedError",
    "PayloadDecodeError",
    "PgbusError",
    "ProtocolError",
    "Received",
    "RequestRefusedError",
    "Selector",
    "Subscription",
    "SubscriptionRefusedError",
    "SubscriptionStatistics",
    "UnknownChannelError",
    "connect",
    "default_socket_path",
    "sync",
]
