"""Fixtures for the PgBouncer configuration tests: files written to a temporary directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

WriteFile = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> WriteFile:
    """Write ``text`` to ``tmp_path / name`` (default pgbouncer.ini) and return the path."""

    def write_file(text: str, name: str = "pgbouncer.ini") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write_file
