"""The subjects of a fleet stream and the rule for stream names."""

from __future__ import annotations

import pytest

from pgbus.protocol import validate_channel
from pgbusd.fleet.subjects import StreamSubjects


def test_a_stream_has_one_subject_per_kind_under_its_name() -> None:
    subjects = StreamSubjects("PGBUS")
    assert (subjects.notes, subjects.ticks, subjects.checkpoints) == (
        "PGBUS.n",
        "PGBUS.g",
        "PGBUS.k",
    )
    assert subjects.all == "PGBUS.>"
    assert subjects.lease_bucket == "PGBUS_LEASE"


@pytest.mark.parametrize("stream", ["", "a.b", "a b", "a*", "x" * 33, "é"])
def test_stream_names_must_be_one_plain_token(stream: str) -> None:
    with pytest.raises(ValueError, match="stream name"):
        StreamSubjects(stream)


def test_the_marker_channel_is_a_valid_channel_for_the_longest_stream() -> None:
    assert validate_channel(StreamSubjects("S" * 32).marker_channel)
