"""What a ``stream_info`` answer says about the server that gave it (pgbusd.fleet.natsconn).

The answers are shaped as a three-node cluster gave them with one node's routes cut
(tests/test_fleet_faults.py cuts one for real). At the end, against a real nats-server: the
stream and the lease bucket created again as they were found."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from nats.js import api

from pgbusd.fleet.natsconn import CUT_OFF_AFTER, CutOffError, StreamShape, cut_off, unanswered
from pgbusd.fleet.subjects import StreamSubjects
from tests.support.fleet_helpers import client, nats_server_fixture, unique_stream
from tests.support.natsserver import NatsServer

SILENT = int((CUT_OFF_AFTER + 1) * 1e9)
HEARD = 2_000_000  # 2 ms, in nanoseconds as NATS reports it


def info(cluster: dict[str, Any] | None) -> api.StreamInfo:
    response: dict[str, Any] = {
        "config": {"name": "s"},
        "state": {"messages": 0, "bytes": 0, "first_seq": 1, "last_seq": 0, "consumer_count": 0},
    }
    if cluster is not None:
        response["cluster"] = cluster
    answer: api.StreamInfo = api.StreamInfo.from_response(response)
    return answer


def replica(name: str, active: int, current: bool = True, offline: bool = False) -> dict[str, Any]:
    return {"name": name, "active": active, "current": current, "offline": offline}


def test_a_stream_of_one_server_is_never_cut_off() -> None:
    assert cut_off(info(None)) is None
    assert cut_off(info({"leader": "n0"})) is None


def test_a_leader_that_hears_from_its_replicas_is_not_cut_off() -> None:
    answer = info({"leader": "n0", "replicas": [replica("n1", HEARD), replica("n2", HEARD)]})
    assert cut_off(answer) is None


def test_one_silent_replica_of_two_leaves_a_quorum() -> None:
    answer = info(
        {"leader": "n0", "replicas": [replica("n1", HEARD), replica("n2", SILENT, False)]}
    )
    assert cut_off(answer) is None


def test_a_follower_with_no_leader_is_cut_off() -> None:
    answer = info({"replicas": [replica("n0", SILENT, False), replica("n1", SILENT, False)]})
    assert isinstance(cut_off(answer), CutOffError)


def test_a_leader_partitioned_away_is_cut_off() -> None:
    """It keeps answering as leader, each replica's ``active`` growing."""
    answer = info({"leader": "n0", "replicas": [replica("n1", SILENT), replica("n2", SILENT)]})
    assert isinstance(cut_off(answer), CutOffError)


def test_replicas_never_heard_from_and_not_current_are_silent() -> None:
    """A stale leader reports a replica it never heard from with ``active`` 0."""
    answer = info(
        {"leader": "n0", "replicas": [replica("n1", SILENT, False), replica("n2", 0, False)]}
    )
    assert isinstance(cut_off(answer), CutOffError)


def test_offline_replicas_are_silent() -> None:
    answer = info(
        {"leader": "n0", "replicas": [replica("n1", HEARD, offline=True), replica("n2", SILENT)]}
    )
    assert isinstance(cut_off(answer), CutOffError)


def test_a_cut_off_answer_counts_as_unanswered() -> None:
    """So the connection's watch moves it to another server."""
    assert unanswered(CutOffError("x"))
    assert not unanswered(ValueError("x"))


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


@pytest.mark.nats
async def test_a_stream_created_again_is_as_it_was_found(nats_server: NatsServer) -> None:
    """An operator's stream (one hour, 500 messages, 64 KiB at most, in memory) deleted with
    the lease bucket: a bridge creates both again as they were, not with the defaults. Settings
    the servers refuse (three replicas on one server) give the defaults, logged."""
    subjects = StreamSubjects(unique_stream())
    nc = await client(nats_server.url)
    js = nc.jetstream()
    given: dict[str, Any] = {"max_age": 3600.0, "max_msgs": 500, "max_msg_size": 65536}
    await js.add_stream(
        api.StreamConfig(
            name=subjects.stream, subjects=[subjects.all], storage=api.StorageType.MEMORY, **given
        )
    )
    shape = StreamShape()
    await shape.ensure(nc, subjects, 2.0, structlog.get_logger())  # found: remembered

    async def gone_and_again() -> tuple[api.StreamConfig, list[MutableMapping[str, Any]]]:
        await js.delete_stream(subjects.stream)
        await js.delete_key_value(subjects.lease_bucket)
        with structlog.testing.capture_logs() as logs:
            await shape.ensure(nc, subjects, 2.0, structlog.get_logger())
        return (await js.stream_info(subjects.stream)).config, logs

    config, logs = await gone_and_again()
    assert {name: getattr(config, name) for name in given} == given
    assert (config.storage, logs) == (api.StorageType.MEMORY, [])
    shape.stream["num_replicas"], shape.bucket_replicas = 3, 3
    config, logs = await gone_and_again()
    assert (config.num_replicas, config.storage) == (1, api.StorageType.FILE)
    assert [entry["event"].split(":")[0] for entry in logs] == [
        "the fleet stream cannot be created again as it was",
        "the lease bucket cannot be created again as it was",
    ]
    assert (await js.stream_info(f"KV_{subjects.lease_bucket}")).config.num_replicas == 1
    await nc.close()
