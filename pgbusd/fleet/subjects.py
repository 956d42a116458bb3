"""Channel names to NATS subjects and back: one bijective, readable mapping.

A PostgreSQL channel name is 1 to 63 bytes of UTF-8 without NUL; every other character is
allowed, including the ones NATS gives a meaning to (``.`` separates tokens, ``*`` and ``>``
are wildcards, whitespace ends a subject). A NATS subject token, to be safe with every client
and tool, should stay within ``[A-Za-z0-9_-]``. So a channel becomes one token by this rule:

- each byte of the channel's UTF-8 encoding that is an ASCII letter, digit, ``_`` or ``-``
  stands for itself;
- every other byte (``~`` included) is written ``~XX``, its value in two *uppercase* hex digits.

``forge_changes`` stays ``forge_changes``; ``a.b`` becomes ``a~2Eb``; ``é`` becomes ``~C3~A9``.
The mapping is injective (``~`` never stands for itself, so every ``~`` opens an escape) and
the decoder accepts only the *canonical* form (uppercase hex, no escape of a byte that could
stand for itself, valid UTF-8, a valid channel name), so it is a bijection between channel
names and the tokens it produces: a subject that the decoder accepts names exactly one channel,
and encoding that channel gives the same subject back. A token is at most 3 x 63 = 189 bytes.

Subjects of a stream live under a prefix that is the stream's name (itself a valid token)::

    <STREAM>.n.<token>   batches of notifications of one channel (fleet.schema.Batch)
    <STREAM>.g           generation ticks: the gap markers (fleet.schema.Tick)
    <STREAM>.k           checkpoints: the full per-channel seq vector (fleet.schema.Checkpoint)

and the stream captures ``<STREAM>.>``. A consumer that wants only some channels can filter on
``<STREAM>.n.<token>`` (plus the two control subjects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pgbus.protocol import validate_channel

_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_HEX: Final = "0123456789ABCDEF"
_TOKEN: Final = re.compile(r"(?:[A-Za-z0-9_-]|~[0-9A-F]{2})+")
#: Stream names become the subject prefix: one plain token (JetStream also forbids '.', '*',
#: '>', whitespace and path separators in them).
_STREAM: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")

#: The escapes of every byte, precomputed (the encoder runs once per channel, but cheaply).
_ESCAPE: Final = tuple(chr(b) if b in _SAFE else f"~{b:02X}" for b in range(256))


def channel_token(channel: str) -> str:
    """The subject token of ``channel`` (raises ValueError for an invalid channel name)."""
    validate_channel(channel)
    return "".join([_ESCAPE[b] for b in channel.encode("utf-8")])


def token_channel(token: str) -> str:
    """The channel whose token is ``token``; ValueError unless ``token`` is canonical."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{token!r} is not a channel token")
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            byte = int(token[i + 1 : i + 3], 16)
            if byte in _SAFE:
                raise ValueError(f"{token!r}: byte {byte:#04x} must not be escaped")
            out.append(byte)
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    try:
        channel = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{token!r} does not decode to UTF-8") from exc
    validate_channel(channel)
    return channel


def validate_stream_name(name: str) -> str:
    """Return ``name`` if it can name the stream (and prefix its subjects), else ValueError."""
    if not _STREAM.fullmatch(name):
        raise ValueError(
            f"stream name {name!r} must be 1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    return name


@dataclass(frozen=True)
class StreamSubjects:
    """The subjects of one fleet stream (see the module docstring)."""

    stream: str

    def __post_init__(self) -> None:
        validate_stream_name(self.stream)

    @property
    def all(self) -> str:
        """What the stream captures."""
        return f"{self.stream}.>"

    @property
    def ticks(self) -> str:
        return f"{self.stream}.g"

    @property
    def checkpoints(self) -> str:
        return f"{self.stream}.k"

    @property
    def lease_bucket(self) -> str:
        """The key-value bucket holding the publisher lease (a separate stream, KV_<bucket>)."""
        return f"{self.stream}_LEASE"

    @property
    def marker_channel(self) -> str:
        """The PostgreSQL channel the bridges of this stream send their markers on."""
        return f"pgbus.marker.{self.stream}"

    def notes(self, channel: str) -> str:
        """The subject of ``channel``'s batches."""
        return f"{self.stream}.n.{channel_token(channel)}"

    def channel_of(self, subject: str) -> str | None:
        """The channel of a batch subject of this stream; None for any other subject."""
        head = f"{self.stream}.n."
        if not subject.startswith(head):
            return None
        try:
            return token_channel(subject[len(head) :])
        except ValueError:
            return None
