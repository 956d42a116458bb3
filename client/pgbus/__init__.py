"""pgbus: the client library of pgbusd, the per-host PostgreSQL LISTEN/NOTIFY relay.

.. code-block:: python

    async with pgbus.connect() as bus:
        watch = bus.subscribe_reconnects()
        async with await bus.subscribe("forge_changes") as sub:
            payload = await sub.recv()
"""

from pgbus._client import DEFAULT_SOCKET, Bus, connect, default_socket_path
from pgbus._subscription import DEFAULT_BUFFER, Subscription, SubscriptionStatistics
from pgbus._watch import GenerationWatch
from pgbus.backoff import Backoff
from pgbus.errors import (
    BusClosedError,
    DaemonUnavailableError,
    LaggedError,
    PgbusError,
    ProtocolError,
    RequestRefusedError,
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
    "GenerationWatch",
    "LaggedError",
    "PgbusError",
    "ProtocolError",
    "RequestRefusedError",
    "Subscription",
    "SubscriptionStatistics",
    "UnknownChannelError",
    "connect",
    "default_socket_path",
]
