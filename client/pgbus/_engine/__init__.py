"""The client's protocol engine: every rule of the client side of the protocol, without I/O.

Both clients (the asyncio :class:`~pgbus.Bus` and the blocking :class:`~pgbus.sync.SyncBus`) are
thin drivers of this package, in the manner of h11 and wsproto: they own a socket and a way to
wait (futures on an event loop; conditions over a lock and a reader thread), and they move bytes
and wake-ups. What a message *means*, what to send and when, how the generation moves, which
subscription gets a payload, when a request is answered, refused or lost: all of that is decided
here, once. Nothing here blocks, locks, sleeps or touches a socket.

The pieces:

- :class:`Engine`: the client's state across attachments (subscriptions wanted, the generation,
  the daemon's channels) and the application's requests (subscribe, unsubscribe, status).
- :class:`Attachment`: one connection to the daemon. The driver connects a socket, asks the
  engine for an attachment, gives it the bytes it reads (:meth:`Attachment.get_buffer` and
  :meth:`Attachment.buffer_updated`, the shape of :class:`asyncio.BufferedProtocol`), writes what
  :meth:`Attachment.data_to_send` returns, and reports the end of the socket
  (:meth:`Attachment.lost`). An engine has at most one live attachment at a time.
- :class:`Changes`: what an entry point changed that a driver must act on: requests answered
  (wake their waiters), the generation or the attached state moved (wake watchers), the link
  must be dropped. Payloads wake their subscription directly (:meth:`PayloadQueue._wake`).
- :class:`GenerationClock`, :class:`PayloadQueue`, :class:`GenerationCursor`, :class:`SelectCore`:
  the generation rules, one subscription's lag-bounded queue, one watcher's view, and the choice
  of a selector's next event.
- :class:`DriverRoom` and :data:`Waiters`: what the engine holds for its drivers, typed.

One concept per module; the imports run one way (``make lint`` keeps them acyclic):

- ``driver``: what the engine needs from a driver (:class:`DriverRoom`, :data:`Waiters`).
- ``clock``: the generation (:class:`GenerationClock`), a watch's view (:class:`GenerationCursor`).
- ``queue``: one subscription's payloads (:class:`PayloadQueue`, :func:`payload_decoder`).
- ``runs``: notifications a run of one channel at a time (:func:`runs`, :func:`deliver`).
- ``select``: a selector's events and the choice of the next one (:class:`SelectCore`).
- ``changes``: requests until their replies (:class:`Request`) and :class:`Changes`.
- ``state``: the state across attachments and its bookkeeping (:class:`EngineState`).
- ``attachment``: one connection: handshake, frames, replies (:class:`Attachment`).
- ``engine``: the application's requests and the attachments' lifecycle (:class:`Engine`).
- ``bus``: what both clients' buses share that never waits (:class:`BusBase`).
"""

from pgbus._engine.attachment import Attachment, check_version
from pgbus._engine.bus import (
    DEFAULT_SOCKET,
    BusBase,
    ConnectSettings,
    check_timeout,
    default_socket_path,
)
from pgbus._engine.changes import NO_CHANGES, Changes, Request
from pgbus._engine.clock import GenerationClock, GenerationCursor, HasGeneration
from pgbus._engine.driver import DriverRoom, Waiters
from pgbus._engine.engine import Engine
from pgbus._engine.queue import (
    DEFAULT_BUFFER,
    PayloadQueue,
    SubscriptionStatistics,
    T_co,
    payload_decoder,
)
from pgbus._engine.runs import Run, deliver, runs
from pgbus._engine.select import (
    Event,
    GenerationChanged,
    Lagged,
    Received,
    SelectCore,
    SelectorBase,
)
from pgbus._engine.state import EngineState, NotificationHook, refusal

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_SOCKET",
    "NO_CHANGES",
    "Attachment",
    "BusBase",
    "Changes",
    "ConnectSettings",
    "DriverRoom",
    "Engine",
    "EngineState",
    "Event",
    "GenerationChanged",
    "GenerationClock",
    "GenerationCursor",
    "HasGeneration",
    "Lagged",
    "NotificationHook",
    "PayloadQueue",
    "Received",
    "Request",
    "Run",
    "SelectCore",
    "SelectorBase",
    "SubscriptionStatistics",
    "T_co",
    "Waiters",
    "check_timeout",
    "check_version",
    "default_socket_path",
    "deliver",
    "payload_decoder",
    "refusal",
    "runs",
]
