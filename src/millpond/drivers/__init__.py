"""Driver adapters: one per database driver, chosen by name."""

from __future__ import annotations

from typing import Any

from millpond.drivers.base import Driver
from millpond.errors import ConfigError

DRIVERS = ("asyncpg", "psycopg", "memory")


def get_driver(name: str, dsn: str | None, connect_kwargs: dict[str, Any]) -> Driver:
    """The adapter for ``name``; imports the driver only when it is asked for."""
    if name == "asyncpg":
        from millpond.drivers.asyncpg import AsyncpgDriver

        return AsyncpgDriver(dsn, connect_kwargs)
    if name == "psycopg":
        from millpond.drivers.psycopg import PsycopgDriver

        return PsycopgDriver(dsn, connect_kwargs)
    if name == "memory":
        from millpond.drivers.memory import MemoryDriver

        return MemoryDriver(dsn, connect_kwargs)
    raise ConfigError("driver", f"{name!r} is not one of {', '.join(DRIVERS)}")


__all__ = ["DRIVERS", "Driver", "get_driver"]
