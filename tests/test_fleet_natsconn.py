"""What a ``stream_info`` answer says about the server that gave it (pgbusd.fleet.natsconn).

The answers are shaped as a three-node cluster gave them with one node's routes cut
(tests/test_fleet_faults.py cuts one for real)."""

from __future__ import annotations

from typing import Any

from nats.js import api

from pgbusd.fleet.natsconn import CUT_OFF_AFTER, CutOffError, cut_off, unanswered

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
