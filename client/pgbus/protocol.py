"""The pgbus wire protocol: the one definition both the daemon and the clients use.

The specification (framing, every message and field, ordering, resume, the client's rules,
error codes, versioning) is docs/protocol.md, for every client writer; the vectors both
clients pass are in client/conformance/. tests/test_protocol_doc.py keeps that document and
this module in step.
"""

from __future__ import annotations

import struct
from typing import Any, Final, Generic, TypeVar

import msgspec

from pgbus.errors import ProtocolError

PROTOCOL_VERSION: Final = 1

#: Largest frame body a client may send (subscribe frames are tiny).
MAX_CLIENT_FRAME: Final = 4096
#: Largest frame body the daemon sends; the daemon splits batches to stay under it.
MAX_SERVER_FRAME: Final = 1 << 20
#: PostgreSQL rejects a payload of 8000 bytes or more.
MAX_PAYLOAD_BYTES: Final = 7999
#: PostgreSQL identifiers (and so channel names) are at most 63 bytes (NAMEDATALEN - 1).
MAX_CHANNEL_BYTES: Final = 63

_HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = _HEADER.size


class Message(msgspec.Struct, tag_field="t", array_like=True):
    """Base of every message."""


# -- daemon to client ---------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    version: int
    daemon_id: str
    generation: int
    channels: list[str]
    max_frame: int
    #: The --channel-pattern globs: any channel they match may be subscribed to as well.
    patterns: list[str] = msgspec.field(default_factory=list)


class Notification(Message, tag="notify"):
    channel: str
    payload: str
    pid: int
    generation: int
    seq: int


class Generation(Message, tag="gen"):
    generation: int


class Subscribed(Message, tag="subscribed"):
    channel: str
    #: The channel's last ``Notification.seq`` so far: the next one for this client is seq + 1.
    seq: int


class Unsubscribed(Message, tag="unsubscribed"):
    channel: str


class Error(Message, tag="error"):
    code: str
    message: str
    channel: str | None = None
    fatal: bool = False


class StatusReply(Message, tag="status"):
    status: dict[str, Any]


class Goodbye(Message, tag="bye"):
    reason: str


class Reloaded(Message, tag="reloaded"):
    """The answer to ``Reload``: the successor (``pid``, running pgbusd ``version``) serves."""

    pid: int
    version: str


ServerMessage = (
    Hello
    | Notification
    | Generation
    | Subscribed
    | Unsubscribed
    | Error
    | StatusReply
    | Goodbye
    | Reloaded
)

# -- client to daemon ---------------------------------------------------------------------------


class Attach(Message, tag="attach"):
    version: int
    pid: int
    name: str = ""


class Subscribe(Message, tag="subscribe"):
    channel: str
    #: Resume: the last seq the client holds on the channel; the daemon replays what follows it.
    after: int | None = None


class Unsubscribe(Message, tag="unsubscribe"):
    channel: str


class StatusRequest(Message, tag="status?"):
    pass


class Reload(Message, tag="reload"):
    #: The successor's PGBUSD_* and PG* variables instead of the daemon's own (None: its own).
    environment: dict[str, str] | None = None


ClientMessage = Attach | Subscribe | Unsubscribe | StatusRequest | Reload

# -- error codes carried in Error frames ----------------------------------------------------------

E_PROTOCOL: Final = "protocol"
E_FRAME_TOO_LARGE: Final = "frame_too_large"
E_VERSION: Final = "version"
E_HANDSHAKE: Final = "handshake"
E_UNKNOWN_CHANNEL: Final = "unknown_channel"
#: Not a name PostgreSQL can LISTEN on exactly (1 to 63 bytes of UTF-8, no NUL).
E_INVALID_CHANNEL: Final = "invalid_channel"
#: The daemon listens on --max-channels channels already.
E_TOO_MANY_CHANNELS: Final = "too_many_channels"
#: PostgreSQL refused to LISTEN on the channel (the message is its error).
E_LISTEN_REFUSED: Final = "listen_refused"
E_TOO_MANY_CLIENTS: Final = "too_many_clients"
E_FORBIDDEN: Final = "forbidden"
E_SHUTDOWN: Final = "shutdown"
#: The reason of a Goodbye when a successor process takes over the socket (a hand-off reload).
E_RELOAD: Final = "reload"
#: A reload that did not happen (the daemon serves on); the message says why.
E_RELOAD_FAILED: Final = "reload_failed"

# -- encoding -----------------------------------------------------------------------------------

_encoder: Final = msgspec.msgpack.Encoder()


def encode_item(message: Message) -> bytes:
    """Encode one message as an array item, ready to be joined under :func:`frame_items`."""
    return _encoder.encode(message)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def frame_items(items: list[bytes], size: int | None = None) -> bytes:
    """One frame holding already-encoded message items (length prefix + array header + items).

    ``size`` is ``sum(map(len, items))``, for a caller that already knows it. A frame carries
    at least one message: ValueError for none.
    """
    if not items:
        raise ValueError("a frame carries at least one message")
    head = _array_header(len(items))
    if size is None:
        size = sum(map(len, items))
    return b"".join([_HEADER.pack(len(head) + size) + head, *items])


def encode_frame(*messages: Message) -> bytes:
    """One frame holding ``messages``."""
    return frame_items([_encoder.encode(m) for m in messages])


# -- batch frames, built in place (the daemon's hot path) ----------------------------------------

#: A batch frame starts with its length and a 32-bit msgpack array header, both filled in when
#: it is sealed (:func:`seal_batch`); the notifications are appended in between.
BATCH_HEAD: Final = struct.Struct(">IBI")
#: The first element of every encoded :class:`Notification` (its tag).
NOTIFY_TAG: Final = Notification.__struct_config__.tag
#: The most one encoded notification can take. PostgreSQL's limits (7999 bytes of payload, 63 of
#: channel name) count bytes of the server encoding, and a notification arrives in UTF-8, in
#: which one byte of a single-byte server encoding can take three (WIN1252's 0x80 is U+20AC).
MAX_ITEM: Final = 4 * (MAX_PAYLOAD_BYTES + MAX_CHANNEL_BYTES) + 64
#: A batch is sealed once it passes this size, so that no frame exceeds MAX_SERVER_FRAME.
BATCH_LIMIT: Final = MAX_SERVER_FRAME - BATCH_HEAD.size - MAX_ITEM
#: ``encode_into((NOTIFY_TAG, channel, payload, pid, generation, seq), batch, -1)`` appends a
#: notification to a batch, encoded exactly as ``Notification(channel, payload, pid,
#: generation, seq)``: the one encoding of a notification, written where it is built (a
#: function around it would cost the relay a call per notification).
encode_into: Final = _encoder.encode_into


def new_batch() -> bytearray:
    """An empty batch frame: room for its head, and nothing else yet."""
    return bytearray(BATCH_HEAD.size)


def seal_batch(frame: bytearray, count: int) -> None:
    """Fill in the head of a batch of ``count`` notifications: it is a frame now."""
    BATCH_HEAD.pack_into(frame, 0, len(frame) - HEADER_SIZE, 0xDD, count)


# -- decoding -----------------------------------------------------------------------------------

M = TypeVar("M", bound=Message)


class FrameDecoder(Generic[M]):
    """Incremental, socket-free frame parser: give it bytes, get back complete messages.

    Two ways to give it bytes: :meth:`feed` (any bytes-like object), or read straight into its
    buffer: ``n = sock.recv_into(decoder.get_buffer())`` then ``decoder.buffer_updated(n)`` (the
    shape of :class:`asyncio.BufferedProtocol`), which spares copying large frames.

    Both raise :class:`~pgbus.errors.ProtocolError` (and only that) for anything that is not a
    valid stream of frames of this side's message type; after an error the stream is unusable.
    The buffered bytes never exceed one maximal frame plus one read.
    """

    __slots__ = ("_buf", "_decoder", "_end", "_max_frame", "_need", "_start", "_view")

    #: Free space offered for one read when no frame under way needs more.
    READ_SIZE: Final = 256 * 1024

    def __init__(self, message_type: Any, max_frame: int) -> None:
        self._decoder: msgspec.msgpack.Decoder[list[M]] = msgspec.msgpack.Decoder(
            list[message_type]
        )
        self._max_frame = max_frame
        # Received bytes not yet decoded are _buf[_start:_end]. The bytearray is never resized
        # (a read may still hold a view of it): it is replaced by a larger one when needed.
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        #: Bytes needed from _start before the next step can be taken (a header, or a frame).
        self._need = HEADER_SIZE

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return self._end - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> list[M]:
        """Decode ``data`` after whatever was buffered; returns the messages it completed."""
        if self._end == self._start:  # nothing buffered: decode in place, keep only the tail
            view = memoryview(data)
            out, pos = self._parse(view, 0, len(view))
            if pos < len(view):
                rest = len(view) - pos
                self.get_buffer(rest)[:rest] = view[pos:]
                self._end += rest
            return out
        size = len(data)
        self.get_buffer(size)[:size] = data
        return self.buffer_updated(size)

    def get_buffer(self, size: int = 0) -> memoryview:
        """Writable space for the next read: at least ``size`` bytes, and room for the rest of
        the frame under way. Fill a prefix of it, then call :meth:`buffer_updated`."""
        live = self._end - self._start
        want = max(size, self._need - live, self.READ_SIZE if size <= 0 else 0)
        if len(self._buf) - self._end < want:
            if live + want <= len(self._buf):  # move the partial frame to the front
                self._view[:live] = self._view[self._start : self._end]
            else:
                grown = bytearray(max(live + want, 2 * len(self._buf)))
                grown[:live] = self._view[self._start : self._end]
                self._buf, self._view = grown, memoryview(grown)
            self._start, self._end = 0, live
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[M]:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`; decode them."""
        self._end += nbytes
        if self._end - self._start < self._need:
            return []
        out, self._start = self._parse(self._view, self._start, self._end)
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def _parse(self, view: memoryview, pos: int, end: int) -> tuple[list[M], int]:
        """Decode the complete frames in ``view[pos:end]``; returns them and where they end."""
        out: list[M] = []
        while end - pos >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(view, pos)
            if size > self._max_frame:
                raise ProtocolError(
                    f"frame of {size} bytes exceeds the limit of {self._max_frame}",
                    code=E_FRAME_TOO_LARGE,
                )
            if size == 0:
                raise ProtocolError("empty frame")
            stop = pos + HEADER_SIZE + size
            if stop > end:
                self._need = stop - pos
                return out, pos
            out.extend(self._decode(view[pos + HEADER_SIZE : stop]))
            pos = stop
        self._need = HEADER_SIZE
        return out, pos

    def _decode(self, body: memoryview) -> list[M]:
        try:
            messages = self._decoder.decode(body)
        except (ValueError, RecursionError) as exc:  # DecodeError, bad UTF-8, too deep
            raise ProtocolError(f"malformed frame: {exc}") from exc
        if not messages:
            raise ProtocolError("frame holds no message")
        return messages


def server_decoder() -> FrameDecoder[ServerMessage]:
    """The decoder a client uses for what the daemon sends."""
    return FrameDecoder(ServerMessage, MAX_SERVER_FRAME)


def client_decoder(max_frame: int = MAX_CLIENT_FRAME) -> FrameDecoder[ClientMessage]:
    """The decoder the daemon uses for what a client sends."""
    return FrameDecoder(ClientMessage, max_frame)


def validate_channel(name: str) -> str:
    """Return ``name`` if PostgreSQL can LISTEN on it exactly as written, else raise ValueError.

    A channel name is 1 to 63 bytes of UTF-8 without NUL. Longer names would be silently
    truncated by LISTEN (and rejected by pg_notify), so they are refused rather than cut.
    """
    if not name:
        raise ValueError("channel name is empty")
    if "\x00" in name:
        raise ValueError(f"channel name {name!r} contains a NUL byte")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"channel name {name!r} is not valid UTF-8") from exc
    if size > MAX_CHANNEL_BYTES:
        raise ValueError(
            f"channel name {name!r} is {size} bytes long; PostgreSQL allows at most "
            f"{MAX_CHANNEL_BYTES}"
        )
    return name
