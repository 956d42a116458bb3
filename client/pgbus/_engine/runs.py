"""Notifications a run at a time: consecutive notifications on one channel, handed on at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any, Final

from pgbus import protocol as p
from pgbus._engine.clock import GenerationClock
from pgbus._engine.queue import PayloadQueue

_channel_of: Final = attrgetter("channel")
_seq_of: Final = attrgetter("seq")
_payload_of: Final = attrgetter("payload")

#: One step of :func:`runs`: consecutive notifications on one channel, or any other message.
Run = list[p.Notification] | p.ServerMessage


def runs(messages: list[p.ServerMessage]) -> Sequence[Run]:
    """Split ``messages`` (in order) into runs of notifications on one channel and the other
    messages between them. The daemon sends a loop turn's notifications on a channel as one
    frame, so the usual answer is the whole list as one run, found without a loop in Python."""
    if set(map(type, messages)) == {p.Notification} and len(set(map(_channel_of, messages))) == 1:
        return (messages,)  # type: ignore[return-value]  # every one is a Notification
    out: list[Run] = []
    run: list[p.Notification] = []
    for msg in messages:
        if type(msg) is p.Notification:
            if run and run[0].channel != msg.channel:
                out.append(run)
                run = []
            run.append(msg)
        else:
            if run:
                out.append(run)
                run = []
            out.append(msg)
    if run:
        out.append(run)
    return out


def deliver(
    clock: GenerationClock,
    subscriptions: Mapping[str, list[PayloadQueue[Any]]],
    run: list[p.Notification],
) -> bool:
    """Hand a run of notifications on one channel to the channel's subscriptions; returns True if
    the clock moved (a seq gap)."""
    subs = subscriptions.get(run[0].channel)
    if not subs:
        return False  # in flight before an Unsubscribe took effect: nobody's
    return push(clock, subs, run)


def push(
    clock: GenerationClock, subs: Sequence[PayloadQueue[Any]], run: list[p.Notification]
) -> bool:
    """Hand a run to ``subs`` (subscriptions of its channel); returns True if the clock moved."""
    moved = clock.on_run(run[0].channel, list(map(_seq_of, run)))
    payloads = list(map(_payload_of, run))
    for sub in subs:
        sub._push_many(payloads)
    return moved
