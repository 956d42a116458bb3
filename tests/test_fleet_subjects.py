"""Channel names to NATS subject tokens and back: a bijection onto valid, plain tokens."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgbusd.fleet.subjects import StreamSubjects, channel_token, token_channel

_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_~-]+")

channels = st.text(
    alphabet=st.characters(
        categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co", "Cn"],
        blacklist_characters="\x00",
    ),
    min_size=1,
    max_size=63,
).filter(lambda c: len(c.encode()) <= 63)


@given(channels)
def test_every_channel_round_trips_through_its_token(channel: str) -> None:
    assert token_channel(channel_token(channel)) == channel


@given(channels)
def test_every_token_is_one_valid_subject_token(channel: str) -> None:
    token = channel_token(channel)
    assert _PLAIN_TOKEN.fullmatch(token)
    assert len(token) <= 3 * 63
    subject = StreamSubjects("PGBUS").notes(channel)
    assert subject.split(".") == ["PGBUS", "n", token]
    assert StreamSubjects("PGBUS").channel_of(subject) == channel


@given(st.text(alphabet="AZaz09_-~.*> 2E7Ee", min_size=1, max_size=40))
def test_a_token_the_decoder_accepts_encodes_back_to_itself(token: str) -> None:
    try:
        channel = token_channel(token)
    except ValueError:
        return
    assert channel_token(channel) == token


@pytest.mark.parametrize(
    ("channel", "token"),
    [
        ("forge_changes", "forge_changes"),
        ("a.b", "a~2Eb"),
        ("jobs.*", "jobs~2E~2A"),
        ("x >y", "x~20~3Ey"),
        ("~", "~7E"),
        ("é", "~C3~A9"),
        ('x"; DROP TABLE t; --', "x~22~3B~20DROP~20TABLE~20t~3B~20--"),
    ],
)
def test_tokens_stay_readable(channel: str, token: str) -> None:
    assert channel_token(channel) == token


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "~41", "~2e", "~", "~2", "~C3", "~00", "a b", "*", ">", "x" * 64],
)
def test_non_canonical_or_invalid_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        token_channel(token)


@pytest.mark.parametrize("channel", ["", "\x00", "x" * 64, "é" * 32])
def test_invalid_channels_have_no_token(channel: str) -> None:
    with pytest.raises(ValueError, match="channel name"):
        channel_token(channel)


@pytest.mark.parametrize("stream", ["", "a.b", "a b", "a*", "x" * 33, "é"])
def test_stream_names_must_be_one_plain_token(stream: str) -> None:
    with pytest.raises(ValueError, match="stream name"):
        StreamSubjects(stream)


def test_the_marker_channel_is_a_valid_channel_for_the_longest_stream() -> None:
    subjects = StreamSubjects("S" * 32)
    assert channel_token(subjects.marker_channel)
    assert subjects.channel_of(subjects.ticks) is None
    assert subjects.channel_of("OTHER.n.abc") is None
