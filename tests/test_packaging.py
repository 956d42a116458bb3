"""What a non-editable install ships: every package of the daemon and of the client library.

An editable install (``make install``) finds any directory, so the suite passes even when a new
subpackage is missing from ``[tool.setuptools] packages``; a plain ``pip install`` (the systemd
units' install, docs/systemd.md) then ships without it and the daemon fails at start-up."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def packages_on_disk(top: Path, name: str) -> set[str]:
    """Every directory of ``top/name`` holding an ``__init__.py``, as a dotted name."""
    return {
        ".".join(init.parent.relative_to(top).parts) for init in (top / name).rglob("__init__.py")
    }


@pytest.mark.parametrize(("project", "name"), [(ROOT, "pgbusd"), (ROOT / "client", "pgbus")])
def test_every_package_on_disk_is_listed_for_the_install(project: Path, name: str) -> None:
    settings = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(settings["packages"]) == packages_on_disk(project, name)
