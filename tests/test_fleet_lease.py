"""PublisherLease against a real nats-server: one holder, renewal, expiry, fencing margin."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import msgspec
import pytest
import structlog
from nats.aio.client import Client as NATS

from pgbusd.fleet import natsconn
from pgbusd.fleet.lease import KEY, LeaseValue, PublisherLease
from pgbusd.fleet.markers import Markers
from pgbusd.fleet.publishing import Term
from pgbusd.fleet.subjects import StreamSubjects
from tests.support.fleet_helpers import client, nats_server_fixture, unique_stream
from tests.support.natsserver import NatsServer

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


async def two_leases(url: str, ttl: float) -> tuple[PublisherLease, PublisherLease]:
    subjects = StreamSubjects(unique_stream())
    a_nc, b_nc = await client(url), await client(url)
    kv_a, ttl_a = await natsconn.lease_bucket(a_nc, subjects, ttl)
    kv_b, ttl_b = await natsconn.lease_bucket(b_nc, subjects, ttl)
    return PublisherLease(kv_a, "a", ttl_a), PublisherLease(kv_b, "b", ttl_b)


async def bucket_ttl(nc: NATS, subjects: StreamSubjects) -> float:
    info = await nc.jetstream().stream_info(f"KV_{subjects.lease_bucket}")
    return float(info.config.max_age or 0)


async def test_an_existing_lease_bucket_takes_the_configured_ttl(nats_server: NatsServer) -> None:
    """A bucket created with a 30 s TTL, then bridges redeployed with --lease-ttl 2: the
    bucket's values expire after 2 s from then on, not silently after 30."""
    subjects = StreamSubjects(unique_stream())
    nc = await client(nats_server.url)
    await natsconn.lease_bucket(nc, subjects, 30.0)
    assert await bucket_ttl(nc, subjects) == 30.0
    _kv, ttl = await natsconn.lease_bucket(nc, subjects, 2.0)
    assert ttl == 2.0
    assert await bucket_ttl(nc, subjects) == 2.0
    await nc.close()


async def test_a_standby_takes_a_silent_holders_lease_and_the_holder_learns_it_lost_it(
    nats_server: NatsServer,
) -> None:
    a, b = await two_leases(nats_server.url, 30.0)
    assert await a.try_acquire("ta")
    assert await b.read() is not None
    silent = b.seen_revision
    assert await a.renew()  # a beat: the revision b saw is gone
    assert not await b.try_acquire("tb", silent)
    await b.read()
    assert await b.try_acquire("tb", b.seen_revision)  # a stopped beating: b takes it over
    assert b.held
    assert not await a.renew()  # compare-and-set on a's revision fails
    assert not a.held


async def test_only_one_bridge_holds_the_lease(nats_server: NatsServer) -> None:
    a, b = await two_leases(nats_server.url, 5.0)
    assert await a.try_acquire("ta")
    assert not await b.try_acquire("tb")
    assert b.holder is not None
    assert (b.holder.bridge, b.holder.term) == ("a", "ta")
    assert a.held
    assert not b.held


async def test_a_renewed_lease_stays_and_a_released_one_passes_at_once(
    nats_server: NatsServer,
) -> None:
    a, b = await two_leases(nats_server.url, 1.0)
    assert await a.try_acquire("ta")
    deadline = time.monotonic() + 2.5  # more than twice the TTL
    while time.monotonic() < deadline:
        assert await a.renew()
        assert not await b.try_acquire("tb")
        await asyncio.sleep(0.2)
    await a.release()
    assert not a.held
    assert await b.try_acquire("tb")


async def test_a_release_after_a_renewal_whose_answer_never_came_still_frees_the_lease(
    nats_server: NatsServer,
) -> None:
    """A term that ends while a renewal is on its way (its task cancelled, the server stored
    it) holds a revision the key has passed: the release must still free the key, or a standby
    (this bridge itself, reconnected) waits for the holder to go silent. A later revision of
    another bridge's is left alone."""
    a, b = await two_leases(nats_server.url, 30.0)
    assert await a.try_acquire("ta")
    value = msgspec.json.encode(LeaseValue("a", "ta", time.time()))
    assert a.revision is not None
    await a.kv.update(KEY, value, last=a.revision)  # stored; its answer never reached a
    await a.release()
    assert await b.try_acquire("tb")  # free at once, no silence waited for
    assert await a.try_acquire("ta2") is False
    await b.kv.update(KEY, msgspec.json.encode(LeaseValue("b", "tb", 0.0)), last=b.revision)
    await b.release()  # b's revision is behind, and the key's is still b's term: freed
    assert await a.try_acquire("ta3")
    c = PublisherLease(a.kv, "a", 30.0)
    c.revision, c.term = 1, "ta"  # an old term of a's: the key is another term's now
    await c.release()
    assert await a.renew()


async def test_a_renewal_whose_answer_was_lost_but_stored_keeps_the_lease(
    nats_server: NatsServer,
) -> None:
    """A renewal that timed out (a stream leader changing) was stored all the same: the next
    one, expecting the revision before it, is refused. The key is still this term's: the
    lease is kept, not given up as if another bridge held it (which cost the fleet a takeover
    and a generation step, seen in the cluster soak)."""
    a, b = await two_leases(nats_server.url, 30.0)
    assert await a.try_acquire("ta")
    value = msgspec.json.encode(LeaseValue("a", "ta", time.time()))
    assert a.revision is not None
    stored = await a.kv.update(KEY, value, last=a.revision)  # its answer never reached a
    assert await a.renew()
    assert a.held
    assert a.revision == stored
    assert await a.renew()  # and renews on from there
    assert not await b.try_acquire("tb")


async def test_a_renewal_on_its_way_when_the_lease_is_released_does_not_take_it_back(
    nats_server: NatsServer,
) -> None:
    """Release while a renewal is in flight: the server stores the renewal first, the release's
    delete expects the revision before it. The renewal must not make the lease this bridge's
    again (a renewer that went on beat for a term that was over, and no bridge ever took the
    lease: a fleet with nobody publishing), and the release must free the key."""
    a, b = await two_leases(nats_server.url, 30.0)
    assert await a.try_acquire("ta")
    renewal = asyncio.ensure_future(a.renew())
    await asyncio.sleep(0)  # its update is on its way
    await a.release()
    assert await renewal is False
    assert (a.revision, a.held) == (None, False)
    assert await b.try_acquire("tb")


async def test_a_standby_takes_at_once_a_lease_left_in_its_own_name(
    nats_server: NatsServer,
) -> None:
    """A term that could not release its lease (NATS unanswered then) leaves the key in this
    bridge's name: nobody renews it, and this bridge need not wait for it to go silent."""
    a, _ = await two_leases(nats_server.url, 30.0)
    assert await a.try_acquire("ta")
    a.forget()
    silent = await asyncio.wait_for(
        a.watch(30.0, lambda: True, asyncio.Event(), structlog.get_logger()), 5
    )
    assert silent is not None
    assert await a.try_acquire("ta2", silent)


async def test_a_term_whose_renewer_misses_its_cancellation_still_closes_and_releases(
    nats_server: NatsServer,
) -> None:
    """Python 3.11's wait_for can lose a cancellation (the answer came at the same moment):
    the renewer then goes on. The term must close all the same, and its lease be free."""
    a, b = await two_leases(nats_server.url, 30.0)
    a.heartbeat = 0.02
    renew = a.renew
    waiting = asyncio.Event()

    async def renew_missing_a_cancellation() -> bool:
        waiting.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)  # an answer that is slow to come
        return await renew()

    a.renew = renew_missing_a_cancellation  # type: ignore[method-assign]
    assert await a.try_acquire("ta")
    markers = Markers("pgbus.marker.S", _no_marker, "a", structlog.get_logger())
    term = Term("ta", a, markers, listening=lambda: True, hand_over_drain=0.0,
                log=structlog.get_logger())  # fmt: skip
    term.keep_lease()
    await asyncio.wait_for(waiting.wait(), 5)  # the renewer waits for its answer
    await asyncio.wait_for(term.close(), 5)
    assert await b.try_acquire("tb")


async def _no_marker(channel: str, payload: str) -> None:
    raise AssertionError("no marker in this test")


async def test_an_unrenewed_lease_expires_for_others_only_after_its_holder_stopped_counting(
    nats_server: NatsServer,
) -> None:
    a, b = await two_leases(nats_server.url, 1.0)
    assert await a.try_acquire("ta")
    valid_until = a.valid_until
    acquired_at = None
    while acquired_at is None:
        if await b.try_acquire("tb"):
            acquired_at = time.monotonic()
        await asyncio.sleep(0.01)
    assert acquired_at >= valid_until  # fencing: a stops before b can start
    assert not a.held
    assert not await a.renew()  # compare-and-set on a's revision fails
    assert a.revision is None


async def test_taking_over_at_the_moment_the_lease_expires_never_raises(
    nats_server: NatsServer,
) -> None:
    """nats-py's create() reads a taken key back to see whether it was deleted: when the
    holder's value expires between the two, it raised KeyNotFoundError out of try_acquire (a
    bridge's takeover logged as failed, demoted, retried). A standby polling at expiry meets
    that moment about one takeover in three; ten takeovers in a row meet it almost surely."""
    for _ in range(10):
        a, b = await two_leases(nats_server.url, 0.5)
        assert await a.try_acquire("ta")
        while not await b.try_acquire("tb"):
            pass
        assert b.held
