"""The client's protocol engine without a socket: bytes in, changes and bytes out.

Every rule both clients follow is decided in ``pgbus._engine``; these tests drive it the way a
driver does (h11 and nats.py test their parsers this way), often one byte at a time, and read
what it answers. The end-to-end versions against both real clients are in test_clients.py.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgbus
from pgbus import protocol as p
from pgbus._engine import (
    NO_CHANGES,
    Attachment,
    Changes,
    Engine,
    PayloadQueue,
    check_timeout,
)

HELLO = p.Hello(p.PROTOCOL_VERSION, "d1", 1, ["a", "b"], p.MAX_CLIENT_FRAME)
#: The same channels from a daemon of another lineage (restarted after a crash): no resume.
RESTARTED = p.Hello(p.PROTOCOL_VERSION, "d2", 1, ["a", "b"], p.MAX_CLIENT_FRAME)


def sent(att: Attachment) -> list[p.ClientMessage]:
    """What the attachment wants written, decoded as the daemon would."""
    return p.client_decoder().feed(att.data_to_send())


def feed(att: Attachment, *messages: p.ServerMessage, bytewise: bool = False) -> Changes:
    data = p.encode_frame(*messages)
    if not bytewise:
        return att.receive_data(data)
    total = Changes()
    for i in range(len(data)):
        step = att.receive_data(data[i : i + 1])
        total.replies += step.replies
        total.state |= step.state
        total.drop |= step.drop
    return total


def sub(engine: Engine, channel: str = "a", buffer: int = 16, decode: Any = None) -> Any:
    return PayloadQueue(engine, channel, buffer, decode)


def attached(engine: Engine, hello: p.Hello = HELLO) -> Attachment:
    """A fresh attachment through its handshake, with every re-subscription acknowledged."""
    att = engine.attach()
    feed(att, hello)
    for msg in sent(att):
        if isinstance(msg, p.Subscribe):
            feed(att, p.Subscribed(msg.channel, 0))
    assert att.attached
    return att


# -- the handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_hello_is_answered_with_attach_and_the_bus_takes_the_daemon_generation(
    bytewise: bool,
) -> None:
    engine = Engine(name="w", pid=42)
    att = engine.attach()
    assert att.data_to_send() == b"", "the daemon speaks first"
    changes = feed(att, p.Hello(p.PROTOCOL_VERSION, "d1", 3, ["a"], 4096), bytewise=bytewise)
    assert sent(att) == [p.Attach(p.PROTOCOL_VERSION, 42, "w")]
    assert changes.state
    assert att.attached
    assert engine.attached
    assert (engine.generation, engine.daemon_id, engine.channels) == (3, "d1", ["a"])
    assert engine.attach_count == 1


def test_reattach_resubscribes_every_channel_and_is_attached_only_once_all_are_acknowledged() -> (
    None
):
    engine = Engine()
    first = attached(engine)
    for ch in ("a", "b"):
        assert engine.subscribe(sub(engine, ch)) is not None
    sent(first)
    feed(first, p.Subscribed("a", 0), p.Subscribed("b", 0))
    first.lost()
    assert not engine.attached
    assert engine.generation == 1

    second = engine.attach()
    feed(second, RESTARTED)
    assert sent(second) == [
        p.Attach(p.PROTOCOL_VERSION, engine.pid, ""),
        p.Subscribe("a"),
        p.Subscribe("b"),
    ]
    assert not feed(second, p.Subscribed("a", 5)).state
    assert not second.attached
    assert engine.generation == 1
    assert feed(second, p.Subscribed("b", 7)).state
    assert second.attached
    assert engine.generation == 2, "a re-attach is one generation step"


def test_a_second_attachment_while_one_is_live_is_refused() -> None:
    """One bus, one connection to the daemon, ever (two would deliver everything twice)."""
    engine = Engine()
    att = engine.attach()
    with pytest.raises(RuntimeError):
        engine.attach()
    feed(att, HELLO)
    with pytest.raises(RuntimeError):
        engine.attach()
    att.lost()
    engine.attach()


def test_a_daemon_that_says_hello_and_dies_leaves_the_subscriptions_for_the_next_attach() -> None:
    engine = Engine()
    att = attached(engine)
    s = sub(engine, "a")
    request = engine.subscribe(s)
    assert request is not None
    sent(att)
    feed(att, p.Subscribed("a", 0))
    att.lost()

    dying = engine.attach()
    feed(dying, RESTARTED)
    assert sent(dying)[1:] == [p.Subscribe("a")]
    changes = dying.lost()
    assert changes.state
    assert not engine.attached
    assert engine.generation == 1, "no step for a handshake that never finished"
    assert engine.subscriptions == {"a": [s]}
    assert dying.receive_data(p.encode_frame(p.Subscribed("a", 0))) is NO_CHANGES, "ended"

    last = attached(engine, RESTARTED)
    feed(last, p.Notification("a", "x", 1, 1, 1), p.Notification("a", "y", 1, 1, 2))
    assert s.drain() == ["x", "y"], "each notification once, from the one live attachment"
    assert engine.generation == 2


def test_a_daemon_of_another_protocol_version_is_dropped() -> None:
    engine = Engine()
    att = engine.attach()
    changes = feed(att, p.Hello(p.PROTOCOL_VERSION + 1, "d", 1, [], 4096))
    assert changes.drop
    assert att.ended
    assert isinstance(att.failure, pgbus.ProtocolError)
    assert att.failure.code == p.E_VERSION


@pytest.mark.parametrize(
    ("first", "why"),
    [
        (p.Generation(2), "expected hello"),
        (p.Subscribed("a", 1), "expected hello"),
        (p.Notification("a", "x", 1, 1, 1), "expected hello"),
    ],
)
def test_anything_but_hello_first_is_a_protocol_error(first: p.ServerMessage, why: str) -> None:
    att = Engine().attach()
    assert feed(att, first).drop
    assert why in str(att.failure)


def test_a_refusal_before_hello_is_reported_as_the_daemon_closing() -> None:
    att = Engine().attach()
    assert feed(att, p.Error(p.E_TOO_MANY_CLIENTS, "full", None, True)).drop
    assert isinstance(att.failure, pgbus.DaemonUnavailableError)
    assert "full" in str(att.failure)


# -- requests and replies ------------------------------------------------------------------------


def test_concurrent_subscribes_to_one_channel_share_one_request_and_both_get_the_refusal() -> None:
    engine = Engine()
    att = attached(engine)
    one, two = sub(engine), sub(engine)
    first = engine.subscribe(one)
    second = engine.subscribe(two)
    assert first is not None
    assert second is first
    assert sent(att) == [p.Subscribe("a")], "asked once"
    changes = feed(att, p.Error(p.E_FORBIDDEN, "uid 1 may not subscribe", "a"))
    assert changes.replies == [first]
    with pytest.raises(pgbus.RequestRefusedError) as err:
        first.result()
    assert err.value.code == p.E_FORBIDDEN
    assert engine.subscriptions == {}, "neither subscription stays behind"


def test_a_subscribe_on_a_confirmed_channel_needs_no_request() -> None:
    engine = Engine()
    att = attached(engine)
    request = engine.subscribe(sub(engine))
    assert request is not None
    feed(att, p.Subscribed("a", 3))
    sent(att)
    assert engine.subscribe(sub(engine)) is None
    assert sent(att) == []


def test_unknown_channel_is_refused_before_anything_is_sent() -> None:
    engine = Engine()
    att = attached(engine)
    with pytest.raises(pgbus.UnknownChannelError):
        engine.subscribe(sub(engine, "nope"))
    assert sent(att) == []
    assert engine.subscriptions == {}


def test_a_subscriber_that_gives_up_before_the_reply_is_unsubscribed_after_it() -> None:
    engine = Engine()
    att = attached(engine)
    s = sub(engine)
    request = engine.subscribe(s)
    engine.remove(s)  # the subscribe call timed out or was cancelled
    assert request is not None
    assert sent(att) == [p.Subscribe("a")]
    feed(att, p.Subscribed("a", 0))
    assert request.done
    assert sent(att) == [p.Unsubscribe("a")]


def test_the_last_subscription_of_a_channel_unsubscribes_it() -> None:
    engine = Engine()
    att = attached(engine)
    one, two = sub(engine), sub(engine)
    engine.subscribe(one)
    feed(att, p.Subscribed("a", 0))
    engine.subscribe(two)
    sent(att)
    engine.remove(one)
    assert sent(att) == []
    engine.remove(two)
    assert sent(att) == [p.Unsubscribe("a")]
    feed(att, p.Unsubscribed("a"))


def test_subscribing_while_detached_only_registers_and_the_next_attach_sends_it() -> None:
    engine = Engine()
    att = attached(engine)
    att.lost()
    s = sub(engine, "b")
    assert engine.subscribe(s) is None
    nxt = engine.attach()
    feed(nxt, HELLO)
    assert p.Subscribe("b") in sent(nxt)


def test_a_subscribe_lost_with_its_link_waits_for_the_next_attach_and_a_status_fails() -> None:
    """subscribe() returns once the daemon confirmed it: a link lost before the reply leaves
    the call waiting, and the next attachment's reply answers it."""
    engine = Engine()
    att = attached(engine)
    s = sub(engine)
    request = engine.subscribe(s)
    status = engine.request(p.StatusRequest())
    changes = att.lost(ConnectionResetError("reset"))
    assert set(changes.replies) == {status}
    assert request is not None
    assert not request.done
    assert engine.subscriptions == {"a": [s]}
    with pytest.raises(pgbus.DaemonUnavailableError):
        status.result()
    with pytest.raises(pgbus.DaemonUnavailableError):
        engine.request(p.StatusRequest())
    assert engine.subscribe(sub(engine)) is request, "a second subscriber waits for the same"

    nxt = engine.attach()
    feed(nxt, HELLO)
    assert sent(nxt)[1:] == [p.Subscribe("a")]
    changes = feed(nxt, p.Subscribed("a", 3))
    assert request in changes.replies
    assert isinstance(request.result(), p.Subscribed)


def test_closing_the_bus_fails_a_subscribe_carried_to_the_next_attach() -> None:
    engine = Engine()
    att = attached(engine)
    request = engine.subscribe(sub(engine))
    att.lost()
    changes = engine.close()
    assert request is not None
    assert request in changes.replies
    with pytest.raises(pgbus.BusClosedError):
        request.result()


@pytest.mark.parametrize(
    "reply",
    [p.Unsubscribed("a"), p.StatusReply({}), p.Subscribed("b", 1), p.Hello(1, "x", 1, [], 1)],
)
def test_a_reply_that_does_not_match_the_request_is_a_protocol_error(
    reply: p.ServerMessage,
) -> None:
    engine = Engine()
    att = attached(engine)
    engine.subscribe(sub(engine))
    changes = feed(att, reply)
    assert changes.drop
    assert att.ended
    assert isinstance(att.failure, pgbus.ProtocolError)


def test_a_reply_nobody_asked_for_is_a_protocol_error() -> None:
    att = attached(Engine())
    assert feed(att, p.StatusReply({})).drop


def test_malformed_bytes_drop_the_link() -> None:
    att = attached(Engine())
    changes = att.receive_data(b"\x00\x00\x00\x02\xc1\xc1")
    assert changes.drop
    assert isinstance(att.failure, pgbus.ProtocolError)


def test_goodbye_is_the_reason_the_link_ended() -> None:
    engine = Engine()
    att = attached(engine)
    feed(att, p.Goodbye("shutdown"))
    att.lost()
    assert "goodbye: shutdown" in str(att.failure)


# -- the generation ------------------------------------------------------------------------------


def test_ticks_move_the_generation_by_their_delta_and_a_seq_gap_by_one() -> None:
    engine = Engine()
    att = attached(engine)
    engine.subscribe(sub(engine))
    feed(att, p.Subscribed("a", 10))
    assert feed(att, p.Generation(3)).state
    assert engine.generation == 3
    assert not feed(att, p.Notification("a", "x", 1, 3, 11)).state
    assert feed(att, p.Notification("a", "y", 1, 3, 13)).state, "seq 12 is missing"
    assert engine.generation == 4


def test_reattach_to_a_daemon_not_yet_on_postgres_steps_at_its_first_tick() -> None:
    engine = Engine()
    attached(engine).lost()
    att = attached(engine, p.Hello(p.PROTOCOL_VERSION, "d2", 0, ["a"], 4096))
    assert engine.generation == 1
    feed(att, p.Generation(1))
    assert engine.generation == 2


# -- resume ------------------------------------------------------------------------------------


def _away(engine: Engine, *channels: str, seq: int = 4) -> list[Any]:
    """Attached, subscribed to ``channels`` with ``seq`` notifications each, then cut off."""
    att = attached(engine)
    subs = [sub(engine, ch) for ch in channels]
    for s in subs:
        engine.subscribe(s)
    feed(att, *(p.Subscribed(ch, 0) for ch in channels))
    feed(
        att,
        *(p.Notification(ch, f"{ch}{i}", 1, 1, i) for ch in channels for i in range(1, seq + 1)),
    )
    for s in subs:
        s.drain()
    att.lost()
    return subs


def test_a_reattach_to_the_same_lineage_and_generation_resumes_without_a_step() -> None:
    engine = Engine()
    a, b = _away(engine, "a", "b")
    att = engine.attach()
    feed(att, HELLO)
    assert sent(att)[1:] == [p.Subscribe("a", 4), p.Subscribe("b", 4)]
    feed(att, p.Subscribed("a", 4), p.Notification("a", "a5", 1, 1, 5))
    changes = feed(att, p.Subscribed("b", 4))
    assert changes.state
    assert att.attached
    assert att.resumed
    assert engine.generation == 1, "nothing was missed: no step"
    feed(att, p.Notification("b", "b5", 1, 1, 5))
    assert (a.drain(), b.drain()) == (["a5"], ["b5"])


def test_a_resume_the_daemon_cannot_cover_on_one_channel_is_one_step() -> None:
    engine = Engine()
    _away(engine, "a", "b")
    att = engine.attach()
    feed(att, HELLO)
    feed(att, p.Subscribed("a", 4), p.Subscribed("b", 9))  # 5..9 on b are gone
    assert att.attached
    assert not att.resumed
    assert engine.generation == 2


@pytest.mark.parametrize(
    "hello",
    [RESTARTED, p.Hello(p.PROTOCOL_VERSION, "d1", 2, ["a", "b"], p.MAX_CLIENT_FRAME)],
    ids=["another-lineage", "another-generation"],
)
def test_no_resume_is_tried_across_lineages_or_generations(hello: p.Hello) -> None:
    engine = Engine()
    _away(engine, "a")
    att = engine.attach()
    feed(att, hello)
    assert sent(att)[1:] == [p.Subscribe("a")]
    feed(att, p.Subscribed("a", 4))
    assert not att.resumed
    assert engine.generation == 2, "one step, as for any re-attach"


def test_a_subscription_made_while_away_has_no_seq_so_the_reattach_steps() -> None:
    engine = Engine()
    _away(engine, "a")
    engine.subscribe(sub(engine, "b"))
    att = engine.attach()
    feed(att, HELLO)
    assert sent(att)[1:] == [p.Subscribe("a"), p.Subscribe("b")]
    feed(att, p.Subscribed("a", 4), p.Subscribed("b", 0))
    assert engine.generation == 2


def test_a_tick_during_a_resumed_handshake_is_one_step_at_its_end() -> None:
    """The daemon reconnected to PostgreSQL while the client resumed: the seqs continue, but
    what was committed during the reconnect is lost, so the resume must not hide the step."""
    engine = Engine()
    a, _ = _away(engine, "a", "b")
    att = engine.attach()
    feed(att, HELLO)
    assert sent(att)[1:] == [p.Subscribe("a", 4), p.Subscribe("b", 4)]
    assert not feed(att, p.Subscribed("a", 4), p.Generation(2)).state
    assert engine.generation == 1, "published once every subscription is back"
    changes = feed(att, p.Subscribed("b", 4))
    assert changes.state
    assert att.attached
    assert engine.generation == 2
    feed(att, p.Notification("a", "a5", 1, 2, 5))
    assert engine.generation == 2
    assert a.drain() == ["a5"]


@pytest.mark.parametrize(
    "meanwhile",
    [[p.Subscribed("a", 9)], [p.Subscribed("a", 4), p.Generation(2)]],
    ids=["resume-not-covered", "tick-during-handshake"],
)
def test_a_step_learnt_in_a_handshake_cut_off_is_owed_to_the_next_attach(
    meanwhile: list[p.ServerMessage],
) -> None:
    """What the first handshake learnt (the daemon no longer holds 5..9; the daemon reconnected
    to PostgreSQL) is not forgotten because it was cut before its end: the next attach, to the
    same lineage at the same generation, must not resume over it."""
    engine = Engine()
    _away(engine, "a", "b")
    att = engine.attach()
    feed(att, HELLO)
    feed(att, *meanwhile)
    assert not att.attached, "b is not back yet"
    att.lost()
    assert engine.generation == 1
    again = p.Hello(p.PROTOCOL_VERSION, "d1", engine.clock.daemon_generation, ["a", "b"], 4096)
    nxt = engine.attach()
    feed(nxt, again)
    assert sent(nxt)[1:] == [p.Subscribe("a"), p.Subscribe("b")], "no resume"
    feed(nxt, p.Subscribed("a", 9), p.Subscribed("b", 4))
    assert engine.generation == 2, "the owed step, once"


def test_a_subscribe_in_flight_across_a_reattach_does_not_break_the_resume_of_the_others() -> None:
    engine = Engine()
    (a,) = _away(engine, "a")
    att = engine.attach()
    feed(att, HELLO)
    feed(att, p.Subscribed("a", 4))
    late = sub(engine, "b")
    request = engine.subscribe(late)
    assert request is not None
    sent(att)
    feed(att, p.Goodbye(p.E_RELOAD))
    att.lost()  # a reload before the daemon answered the subscribe
    assert not request.done, "subscribe() still waits"

    nxt = engine.attach()
    feed(nxt, HELLO)
    assert sent(nxt)[1:] == [p.Subscribe("a", 4), p.Subscribe("b")]
    feed(nxt, p.Subscribed("a", 4), p.Notification("a", "a5", 1, 1, 5))
    changes = feed(nxt, p.Subscribed("b", 0))
    assert request in changes.replies
    assert nxt.resumed
    assert engine.generation == 1, "a reload moves no generation"
    assert a.drain() == ["a5"]


def test_after_a_protocol_error_the_next_attach_does_not_resume_it_steps() -> None:
    """A daemon that answers a resume with something broken must not be asked the same again
    (a livelock of handshakes): the client subscribes afresh, steps, and goes on."""
    engine = Engine()
    _away(engine, "a")
    att = engine.attach()
    feed(att, HELLO)
    feed(att, p.Subscribed("a", 4))
    changes = att.receive_data(b"\x00\x00\x00\x01\x90")  # an empty frame
    assert changes.drop
    att.lost()
    nxt = engine.attach()
    feed(nxt, HELLO)
    assert sent(nxt)[1:] == [p.Subscribe("a")], "no resume"
    feed(nxt, p.Subscribed("a", 9))
    assert engine.generation == 2
    nxt.lost()
    third = engine.attach()
    feed(third, HELLO)
    assert sent(third)[1:] == [p.Subscribe("a", 9)], "resuming again after a clean attach"


def test_a_channel_resubscribed_after_its_last_subscription_closed_starts_afresh() -> None:
    engine = Engine()
    att = attached(engine)
    a = sub(engine, "a")
    engine.subscribe(a)
    feed(att, p.Subscribed("a", 0), *(p.Notification("a", "x", 1, 1, i) for i in range(1, 5)))
    engine.remove(a)
    request = engine.subscribe(sub(engine, "a"))
    assert sent(att)[-2:] == [p.Unsubscribe("a"), p.Subscribe("a")]
    att.lost()  # before the daemon answered either
    nxt = engine.attach()
    feed(nxt, HELLO)
    assert sent(nxt)[1:] == [p.Subscribe("a")], "not a resume of the closed subscription's seqs"
    changes = feed(nxt, p.Subscribed("a", 7))
    assert request in changes.replies
    assert engine.generation == 1


def test_a_reload_goodbye_asks_for_an_immediate_reattach_once() -> None:
    engine = Engine()
    att = attached(engine)
    feed(att, p.Goodbye(p.E_RELOAD))
    att.lost()
    assert engine.retry_at_once
    engine.attach()
    assert not engine.retry_at_once


# -- payloads ------------------------------------------------------------------------------------


class Checked(msgspec.Struct):
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise RuntimeError("negative")  # not a ValueError: msgspec passes it through


@pytest.mark.parametrize(
    ("type_", "bad"),
    [
        (dict[str, Any], '{"a":' * 2000 + "1" + "}" * 2000),  # RecursionError inside msgspec
        (Checked, '{"n": -1}'),  # __post_init__ raises RuntimeError
        (Checked, "not json"),
    ],
)
def test_a_payload_that_fails_to_decode_in_any_way_raises_for_itself_alone(
    type_: Any, bad: str
) -> None:
    engine = Engine()
    att = attached(engine)
    typed = sub(engine, "a", decode=msgspec.json.Decoder(type_).decode)
    raw = sub(engine, "b")
    engine.subscribe(typed)
    engine.subscribe(raw)
    feed(att, p.Subscribed("a", 0), p.Subscribed("b", 0))
    good = '{"n": 1}' if type_ is Checked else '{"k": 1}'
    changes = feed(
        att,
        p.Notification("a", bad, 1, 1, 1),
        p.Notification("b", "other channel", 1, 1, 1),
        p.Notification("a", good, 1, 1, 2),
    )
    assert not changes.drop
    assert not att.ended
    assert engine.generation == 1
    with pytest.raises(pgbus.PayloadDecodeError) as err:
        typed._next()
    assert err.value.payload == bad
    assert typed._next() == msgspec.json.decode(good, type=type_)
    assert raw.drain() == ["other channel"]


def test_a_refused_resubscription_ends_its_subscriptions_loudly() -> None:
    engine = Engine()
    att = attached(engine)
    kept, refused = sub(engine, "a"), sub(engine, "b")
    engine.subscribe(kept)
    engine.subscribe(refused)
    feed(att, p.Subscribed("a", 0), p.Subscribed("b", 0), p.Notification("b", "last", 1, 1, 1))
    att.lost()
    nxt = engine.attach()
    feed(nxt, p.Hello(p.PROTOCOL_VERSION, "d2", 1, ["a"], 4096))
    sent(nxt)
    feed(nxt, p.Subscribed("a", 0), p.Error(p.E_UNKNOWN_CHANNEL, "not registered", "b"))
    assert nxt.attached
    assert "b" not in engine.subscriptions
    assert refused._next() == "last", "what was received before is still delivered"
    for _ in range(2):  # and then the end, every time
        with pytest.raises(pgbus.SubscriptionRefusedError) as err:
            refused._next()
        assert err.value.channel == "b"
        assert err.value.code == p.E_UNKNOWN_CHANNEL
        assert isinstance(err.value.__cause__, pgbus.UnknownChannelError)
    assert not isinstance(err.value, pgbus.BusClosedError), "not 'closed by this process'"
    assert refused.closed
    assert not kept.closed


def test_close_ends_subscriptions_and_requests_as_closed_by_this_process() -> None:
    engine = Engine()
    att = attached(engine)
    s = sub(engine)
    request = engine.subscribe(s)
    changes = engine.close()
    assert changes.state
    assert request in changes.replies
    assert att.ended
    for failing in (request.result if request else None, s._next):
        assert failing is not None
        with pytest.raises(pgbus.BusClosedError):
            failing()
    with pytest.raises(pgbus.BusClosedError):
        engine.subscribe(sub(engine))
    with pytest.raises(pgbus.BusClosedError):
        engine.attach()


def test_a_failure_closes_the_bus_with_the_cause_chained() -> None:
    engine = Engine()
    s = sub(engine)
    attached(engine)
    engine.subscribe(s)
    bug = KeyError("bug")
    engine.close(bug)
    with pytest.raises(pgbus.BusClosedError) as err:
        s._next()
    assert err.value.__cause__ is bug


def test_the_notification_hook_sees_every_notification_in_order() -> None:
    engine = Engine()
    seen: list[tuple[str, int]] = []
    engine.on_notification = lambda msg: seen.append((msg.channel, msg.seq))
    att = attached(engine)
    engine.subscribe(sub(engine, "a"))
    feed(att, p.Subscribed("a", 0))
    feed(att, p.Notification("a", "x", 1, 1, 1), p.Notification("b", "y", 1, 1, 1))
    assert seen == [("a", 1), ("b", 1)]


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_result(cuts: list[int]) -> None:
    """Where the socket splits the bytes changes nothing: the same payloads, the same state."""
    stream = p.encode_frame(HELLO) + p.encode_frame(
        p.Generation(2), *(p.Notification("a", f"n{i}", 1, 2, i + 1) for i in range(20))
    )
    engine = Engine()
    s = sub(engine, "a", buffer=100)
    engine.subscriptions["a"] = [s]
    att = engine.attach()
    pos = 0
    for cut in [*cuts, len(stream)]:
        att.receive_data(stream[pos : pos + cut])
        pos += cut
        if pos >= len(stream):
            break
    att.receive_data(stream[pos:])
    feed(att, p.Subscribed("a", 0))  # the handshake's re-subscription, acknowledged late
    assert s.drain() == [f"n{i}" for i in range(20)]
    assert engine.generation == 2
    assert att.attached


# -- timeouts ------------------------------------------------------------------------------------


def test_timeouts_nan_is_refused_infinity_is_for_ever_and_negative_is_a_poll() -> None:
    with pytest.raises(ValueError, match="NaN"):
        check_timeout(math.nan)
    assert check_timeout(math.inf) is None
    assert check_timeout(None) is None
    assert check_timeout(-1) == 0.0
    assert check_timeout(1e10) == 1e10
