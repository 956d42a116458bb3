"""docs/protocol.md, the specification every client writer reads, against the code it describes.

Every message of client/pgbus/protocol.py has its row (tag, name, every field in order, each
field with a default marked optional), every error code its line, and the limits and version
are the code's: a change to the protocol that the document does not follow fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from pgbus import protocol as p

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()

MESSAGES: list[type[p.Message]] = [
    *p.ServerMessage.__args__,
    *p.ClientMessage.__args__,
]


def _row(message: type[p.Message]) -> str:
    """The table row the document must have for ``message``."""
    info = msgspec.inspect.type_info(message)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = []
    for field in info.fields:
        text = f"`{field.name}`"
        if not field.required:
            default = field.default
            if default is msgspec.NODEFAULT and field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            shown = {"None": "nil", "False": "false", "''": '`""`'}.get(
                repr(default), f"`{default!r}`"
            )
            text += f" (optional, {shown})"
        fields.append(text)
    tag = message.__struct_config__.tag
    return f"| `{tag}` | `{message.__name__}` | {', '.join(fields)} |".replace(" |  |", " | |")


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.__name__)
def test_every_message_has_its_row_with_every_field_in_order(message: type[p.Message]) -> None:
    row = _row(message).rstrip(" |")
    assert any(line.rstrip(" |") == row for line in DOC.splitlines()), f"missing row: {row}"


def test_every_row_of_the_tables_is_a_message_of_the_code() -> None:
    tags = {str(m.__struct_config__.tag) for m in MESSAGES}
    rows = re.findall(r"^\| `([^`]+)` \| `[A-Z]\w+` \|", DOC, flags=re.M)
    assert sorted(rows) == sorted(tags)


def test_every_error_code_is_documented_and_no_other() -> None:
    codes = {v for k, v in vars(p).items() if k.startswith("E_") and isinstance(v, str)}
    table = set(re.findall(r"^\| `([a-z_]+)` \| [^`|]", DOC, flags=re.M))
    assert table == codes


def test_the_limits_and_the_version_are_the_code_s() -> None:
    assert f"`{p.MAX_CLIENT_FRAME}` bytes for frames a client sends" in DOC
    assert f"`{p.MAX_SERVER_FRAME}` (1 MiB) for frames the daemon sends" in DOC
    assert f"The protocol version is `{p.PROTOCOL_VERSION}`" in DOC
    assert f"{p.MAX_CHANNEL_BYTES} bytes of UTF-8" in DOC
