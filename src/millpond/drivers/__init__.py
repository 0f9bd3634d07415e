"""Driver adapters: one per database driver, chosen by name."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from millpond.drivers.base import Driver, lost_connection
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


def is_disconnect(exc: BaseException) -> bool:
    """Does ``exc``, from any driver already imported, say the connection is gone?"""
    return any(check(exc) for check in _classifiers("is_disconnect")) or lost_connection(exc)


def never_sent(exc: BaseException) -> bool:
    """Was ``exc``, from any driver already imported, raised before anything was sent?"""
    return any(check(exc) for check in _classifiers("never_sent"))


def _classifiers(name: str) -> list[Callable[[BaseException], bool]]:
    """The named classifier of every driver adapter whose driver is imported."""
    found = []
    for module, adapter in (
        ("asyncpg", "millpond.drivers.asyncpg"),
        ("psycopg", "millpond.drivers.psycopg"),
    ):
        if module in sys.modules:
            found.append(getattr(importlib.import_module(adapter), name))
    return found


__all__ = ["DRIVERS", "Driver", "get_driver", "is_disconnect", "never_sent"]
