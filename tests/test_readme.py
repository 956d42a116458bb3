"""The README's first client example works as printed, against a real daemon."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory

pytestmark = pytest.mark.postgres

README = Path(__file__).parent.parent / "README.md"


def first_client_example() -> str:
    match = re.search(r"\.venv/bin/python - <<'EOF'\n(.*?)\nEOF\n", README.read_text(), re.S)
    assert match, "the README's first client example"
    return match.group(1)


async def test_readme_example_prints_hi(daemon_factory: DaemonFactory, pg: Any) -> None:
    d = daemon_factory(["forge_changes"])
    await d.wait_generation(1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", first_client_example(),
        env={**os.environ, "PGBUSD_SOCKET": d.socket}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        prompt = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert prompt.startswith(b"waiting")
        await pg.execute("NOTIFY forge_changes, 'hi'")  # what the README tells the user to run
        assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"hi\n"
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_every_option_of_pgbusd_help_is_in_a_table_of_the_docs() -> None:
    """An operator finds each option, its variable and its default in a table (README.md, or
    docs/*.md for fleet mode), not only in --help."""
    from click.testing import CliRunner

    from pgbusd.cli import main

    help_text = CliRunner().invoke(main, ["--help"]).output
    options = set(re.findall(r"^\s+(--[a-z][a-z-]+)", help_text, re.M)) - {"--help", "--version"}
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    rows = [line for path in docs for line in path.read_text().splitlines() if line.startswith("|")]
    missing = sorted(o for o in options if not any(f"`{o}" in row for row in rows))
    assert not missing, f"options in no table: {missing}"
