"""The wire format without sockets: framing, batching, and a fuzzed decoder on both sides."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbus import protocol as p
from pgbus.errors import ProtocolError

SERVER_MESSAGES: list[p.Message] = [
    p.Hello(p.PROTOCOL_VERSION, "abc", 3, ["a", "b"], p.MAX_CLIENT_FRAME),
    p.Notification("ch", "payload é", 42, 3, 7),
    p.Generation(4),
    p.Subscribed("ch", 6),
    p.Unsubscribed("ch"),
    p.Error(p.E_UNKNOWN_CHANNEL, "no", "ch", False),
    p.StatusReply({"a": [1, 2, {"b": None}]}),
    p.Goodbye("shutdown"),
]
CLIENT_MESSAGES: list[p.Message] = [
    p.Attach(p.PROTOCOL_VERSION, 123, "w"),
    p.Subscribe("ch"),
    p.Unsubscribe("ch"),
    p.StatusRequest(),
]


def test_every_message_round_trips_through_one_frame() -> None:
    frame = p.encode_frame(*SERVER_MESSAGES)
    assert p.server_decoder().feed(frame) == SERVER_MESSAGES
    frame = p.encode_frame(*CLIENT_MESSAGES)
    assert p.client_decoder().feed(frame) == CLIENT_MESSAGES


@pytest.mark.parametrize("n", [1, 15, 16, 65535, 65536])
def test_batched_items_decode_as_one_list_for_every_array_header_size(n: int) -> None:
    item = p.encode_item(p.Generation(1))
    messages = p.server_decoder().feed(p.frame_items([item] * n))
    assert messages == [p.Generation(1)] * n


def test_bytes_arriving_one_at_a_time_give_the_same_messages() -> None:
    stream = p.encode_frame(*SERVER_MESSAGES[:4]) + p.encode_frame(*SERVER_MESSAGES[4:])
    decoder = p.server_decoder()
    got: list[p.ServerMessage] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == SERVER_MESSAGES
    assert decoder.buffered == 0


def _read_through_buffer(
    decoder: p.FrameDecoder[p.ServerMessage], stream: bytes, sizes: list[int]
) -> list[p.ServerMessage]:
    """Deliver ``stream`` as a socket read into the decoder's buffer would: at most ``size``
    bytes (and at most the space offered) per read, keeping every offered view alive."""
    got: list[p.ServerMessage] = []
    views: list[memoryview] = []  # a read may still hold the view it was given
    pos, i = 0, 0
    while pos < len(stream):
        view = decoder.get_buffer(0)
        views.append(view)
        assert len(view) > 0
        n = min(len(view), sizes[i % len(sizes)], len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        pos += n
        i += 1
        got += decoder.buffer_updated(n)
    return got


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload_sizes=st.lists(st.integers(0, 4000), min_size=1, max_size=40),
    per_frame=st.integers(1, 30),
    sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
)
def test_reading_into_the_decoder_buffer_gives_what_feeding_gives(
    payload_sizes: list[int], per_frame: int, sizes: list[int]
) -> None:
    notes = [p.Notification("ch", "x" * n, 1, 1, i) for i, n in enumerate(payload_sizes)]
    stream = b"".join(
        p.encode_frame(*notes[i : i + per_frame]) for i in range(0, len(notes), per_frame)
    )
    decoder = p.server_decoder()
    assert _read_through_buffer(decoder, stream, sizes) == notes
    assert decoder.buffered == 0


def test_a_frame_larger_than_the_buffer_grows_it_and_then_feed_and_reads_mix() -> None:
    big = p.Notification("ch", "y" * p.MAX_PAYLOAD_BYTES, 1, 1, 1)
    frame = p.encode_frame(*[big] * 120)  # about 960 KB: more than one read's space
    assert len(frame) > p.FrameDecoder.READ_SIZE
    decoder = p.server_decoder()
    half = len(frame) // 2
    assert decoder.feed(frame[:half]) == []
    assert _read_through_buffer(decoder, frame[half:] + frame[:10], [100_000]) == [big] * 120
    assert decoder.buffered == 10
    assert decoder.feed(frame[10:]) == [big] * 120
    assert decoder.buffered == 0


def test_length_prefix_over_the_limit_is_refused_before_the_body_arrives() -> None:
    decoder = p.client_decoder()
    with pytest.raises(ProtocolError) as err:
        decoder.feed((p.MAX_CLIENT_FRAME + 1).to_bytes(4, "big"))
    assert err.value.code == p.E_FRAME_TOO_LARGE


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xc1", "not msgpack"),
        (msgspec.msgpack.encode([["launch", 1]]), "unknown message type"),
        (msgspec.msgpack.encode([["subscribe", 5]]), "wrong field type"),
        (msgspec.msgpack.encode([["subscribe"]]), "missing field"),
        (msgspec.msgpack.encode({"t": "subscribe"}), "not an array"),
        (msgspec.msgpack.encode([]), "no message"),
        (msgspec.msgpack.encode([["hello", 1, "x", 0, [], 1]]), "a daemon message from a client"),
    ],
)
def test_malformed_frames_raise_protocol_error(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError):
        p.client_decoder().feed(len(body).to_bytes(4, "big") + body)


def test_empty_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        p.server_decoder().feed(b"\x00\x00\x00\x00")


def _check_fuzz(decoder: p.FrameDecoder[p.ServerMessage] | p.FrameDecoder[p.ClientMessage],
                data: bytes, cut: int, limit: int) -> None:  # fmt: skip
    try:
        decoder.feed(data[:cut])
        decoder.feed(data[cut:])
    except ProtocolError:
        return
    # Whatever is kept waiting is less than one frame: memory is bounded by the limit.
    assert decoder.buffered <= p.HEADER_SIZE + limit


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), cut=st.integers(0, 512))
def test_fuzz_any_bytes_decode_or_raise_protocol_error_server_side(data: bytes, cut: int) -> None:
    _check_fuzz(p.client_decoder(), data, cut, p.MAX_CLIENT_FRAME)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), cut=st.integers(0, 512))
def test_fuzz_any_bytes_decode_or_raise_protocol_error_client_side(data: bytes, cut: int) -> None:
    _check_fuzz(p.server_decoder(), data, cut, p.MAX_SERVER_FRAME)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)  # fmt: skip
_tags = st.sampled_from(["attach", "subscribe", "unsubscribe", "status?", "hello", "notify",
                         "gen", "subscribed", "error", "status", "bye", "x"])  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(_tags, st.lists(_msgpack_values, max_size=6)), max_size=4))
def test_fuzz_well_framed_msgpack_of_any_shape_decodes_or_raises_protocol_error(
    messages: list[tuple[str, list[object]]],
) -> None:
    body = msgspec.msgpack.encode([[tag, *fields] for tag, fields in messages])
    frame = len(body).to_bytes(4, "big") + body
    for decoder in (p.client_decoder(1 << 20), p.server_decoder()):
        try:
            decoded = decoder.feed(frame)
        except ProtocolError:
            continue
        assert all(isinstance(m, p.Message) for m in decoded)


@settings(max_examples=200)
@given(data=st.data())
def test_fuzz_mutated_valid_frames(data: st.DataObject) -> None:
    frame = bytearray(p.encode_frame(*CLIENT_MESSAGES))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    _check_fuzz(p.client_decoder(), bytes(frame), len(frame) // 2, p.MAX_CLIENT_FRAME)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("", False),
        ("a\x00b", False),
        ("a" * 63, True),
        ("a" * 64, False),
        ("é" * 31, True),
        ("é" * 32, False),
        ("MiXeD", True),
        ('x"; DROP TABLE t; --', True),
    ],
)
def test_channel_name_table(name: str, ok: bool) -> None:
    if ok:
        assert p.validate_channel(name) == name
    else:
        with pytest.raises(ValueError, match="channel name"):
            p.validate_channel(name)
